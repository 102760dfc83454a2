"""journald's native protocol: structured entries as datagrams on /run/systemd/journal/socket.

Why native rather than text on stderr: each field becomes queryable (``journalctl
EVENT=worker.exited WORKER_ID=2``), a traceback stays one entry instead of one per line, and
PRIORITY is exact rather than guessed from a ``<N>`` prefix.

The wire format (systemd.journal-fields(7), "Native Journal Protocol") is a sequence of fields:

* ``KEY=value\\n`` when the value has no newline;
* ``KEY\\n`` + the value's length as a 64-bit little-endian integer + the raw value + ``\\n``
  otherwise (binary-safe; used for multi-line MESSAGE such as tracebacks).

An entry too large for one datagram (EMSGSIZE: the socket send buffer, ~208 KiB by default) is
written to a sealed memfd and the fd is passed with SCM_RIGHTS, which journald accepts in place
of the datagram payload. We chose that over truncation because the big entries are exactly the
ones an operator needs whole (a deep traceback, a stack dump of a hung worker).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Mapping

from appliance._systemd_env import SystemdEnvError

__all__ = [
    "DEFAULT_JOURNAL_SOCKET",
    "JournalSender",
    "encode_entry",
    "field_name",
    "stderr_is_journal",
]

DEFAULT_JOURNAL_SOCKET = "/run/systemd/journal/socket"

_INVALID_CHARS = re.compile(r"[^A-Z0-9_]")
_MAX_FIELD_NAME = 64  # journald drops longer names


def field_name(key: str) -> str:
    """Turn an event key into a valid journal field name.

    journald accepts ``[A-Z0-9_]``, at most 64 characters, not starting with a digit, and
    reserves a leading ``_`` for fields it adds itself (``_PID``, ``_SYSTEMD_UNIT``, ...), which
    a client must not forge. So: uppercase, other characters become ``_``, leading underscores
    are stripped, and a name that would be empty or start with a digit gets an ``F_`` prefix.
    """
    name = _INVALID_CHARS.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:_MAX_FIELD_NAME]


def _value_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):  # before int: bool is an int
        return b"true" if value else b"false"
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace")
    return str(value).encode("utf-8", "backslashreplace")


def encode_entry(fields: Mapping[str, object]) -> bytes:
    """Serialize one journal entry. Keys go through :func:`field_name`; None values are left
    out (the journal has no null, and an absent field reads the same in ``journalctl``)."""
    parts: list[bytes] = []
    for key, value in fields.items():
        if value is None:
            continue
        name = field_name(key).encode("ascii")
        data = _value_bytes(value)
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


def stderr_is_journal(env: Mapping[str, str], stderr_fd: int) -> bool:
    """True when *stderr_fd* is the stream systemd connected to the journal.

    systemd sets JOURNAL_STREAM="DEV:INODE" for a service whose stderr (or stdout) goes to the
    journal. Comparing it with fstat(stderr) matters: the variable is inherited by anything
    the service runs, including a shell where stderr was redirected to a file.
    """
    raw = env.get("JOURNAL_STREAM")
    if not raw:
        return False
    dev_text, sep, ino_text = raw.partition(":")
    try:
        if not sep:
            raise ValueError(raw)
        dev, ino = int(dev_text, 10), int(ino_text, 10)
    except ValueError:
        raise SystemdEnvError(
            f"JOURNAL_STREAM={raw!r} is not DEVICE:INODE (two decimal numbers)"
        ) from None
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalSender:
    """Sends entries to journald over one unconnected datagram socket.

    Unconnected (``sendto`` per entry) so that a journald restart, which recreates the socket
    file, costs nothing: the next entry simply reaches the new socket. After fork a worker may
    keep using the inherited copy, or :meth:`close` it and build its own.
    """

    __slots__ = ("_path", "_sock")

    def __init__(self, path: str = DEFAULT_JOURNAL_SOCKET) -> None:
        self._path = path
        self._sock: socket.socket | None = None

    @property
    def path(self) -> str:
        return self._path

    def send(self, fields: Mapping[str, object]) -> bool:
        """Send one entry; False when journald could not take it (caller falls back to stderr).

        Any OSError (no journald, socket gone, out of memory for a memfd) is a False, never an
        exception: logging must not take the process down. Non-OSErrors are bugs and surface.
        """
        data = encode_entry(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                self._sock.sendto(data, self._path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_via_memfd(data)
        except OSError:
            return False
        return True

    def _send_via_memfd(self, data: bytes) -> None:
        """journald reads a sealed memfd passed with SCM_RIGHTS in an otherwise empty datagram;
        the seals prove we cannot change it while it is being read."""
        assert self._sock is not None
        fd = os.memfd_create("appliance-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
            )
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            self._sock.sendmsg([], rights, 0, self._path)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the socket (idempotent); a later :meth:`send` opens a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
