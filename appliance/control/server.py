"""The master's half of the control socket: a listening socket and its accepted connections.

Non-blocking and loop-less: the master registers :meth:`ControlServer.fileno` and each
:meth:`ControlConn.fileno` with its one selector and calls :meth:`ControlServer.accept`,
:meth:`ControlConn.read_requests` and :meth:`ControlConn.flush` when they are ready. Nothing
here closes a file descriptor the master has registered; see :class:`ControlConn`.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.control.protocol import (
    MAX_LINE,
    MAX_REPLY_LINE,
    BadRequest,
    ControlError,
    Request,
    encode_line,
    parse_request,
)
from appliance.sockets import remove_stale_socket

__all__ = ["ControlConn", "ControlServer", "PeerCred"]


@dataclass(frozen=True, slots=True)
class PeerCred:
    """Who connected (SO_PEERCRED), for the log line of each request."""

    pid: int
    uid: int
    gid: int


class ControlConn:
    """One accepted client. Non-blocking; reads and writes only when the selector says so.

    Ownership contract (the master's loop relies on it):

    * A ``ControlConn`` never closes its socket by itself. When the peer hangs up, a read or
      write fails, or more than ``MAX_REPLY_LINE`` (1 MiB) of replies pile up unread, it only
      marks itself :attr:`broken`: :meth:`send` and :meth:`flush` return False,
      :meth:`read_requests` returns None, and :attr:`wants_write` turns False.
    * :meth:`fileno` stays the same open descriptor until the owner calls :meth:`close`, so the
      number cannot be reused by the next ``accept()`` while the owner's selector still holds
      it. The owner may therefore check :attr:`broken` whenever convenient, e.g. once per loop
      iteration, but must then unregister the fd from its selector *first* and call
      :meth:`close` *second*.
    * After :meth:`close`, :meth:`fileno` is -1 and every call is a harmless no-op.
    """

    __slots__ = ("_broken", "_discarding", "_inbuf", "_outbuf", "_sock", "peer")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._discarding = False  # inside an over-long line, dropping until its newline
        self._broken = False
        self.peer = _peer_cred(sock)

    def fileno(self) -> int:
        """The socket's descriptor, valid (even when broken) until :meth:`close`; then -1."""
        return -1 if self._sock is None else self._sock.fileno()

    @property
    def broken(self) -> bool:
        """True once the conversation is over: unregister the fd, then :meth:`close`."""
        return self._broken or self._sock is None

    @property
    def wants_write(self) -> bool:
        """True while replies wait in the buffer: register for EVENT_WRITE and call flush()."""
        return bool(self._outbuf) and not self.broken

    def read_requests(self) -> list[Request | BadRequest] | None:
        """Parse whatever complete lines have arrived; None (and :attr:`broken`) once the peer
        closed or the read failed.

        One recv() per call: the selector is level-triggered, so unread data wakes us again,
        and a chatty client cannot hold the master's loop.
        """
        if self._sock is None or self._broken:
            return None
        try:
            chunk = self._sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:  # ECONNRESET and friends
            self._break()
            return None
        if not chunk:
            self._break()
            return None
        return self._split(chunk)

    def _split(self, chunk: bytes) -> list[Request | BadRequest]:
        items: list[Request | BadRequest] = []
        self._inbuf += chunk
        while True:
            newline = self._inbuf.find(b"\n")
            if newline < 0:
                if len(self._inbuf) > MAX_LINE and not self._discarding:
                    items.append(BadRequest(f"request line longer than {MAX_LINE} bytes"))
                    self._discarding = True
                if self._discarding:
                    self._inbuf.clear()
                return items
            line = bytes(self._inbuf[:newline])
            del self._inbuf[: newline + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > MAX_LINE:
                items.append(BadRequest(f"request line longer than {MAX_LINE} bytes"))
            elif line.strip():
                items.append(parse_request(line))

    def send(self, obj: Mapping[str, Any]) -> bool:
        """Queue one reply (see :mod:`.protocol` for its builders) and try to write it now.

        False when the connection is (now) :attr:`broken`: the peer is gone, or it let more
        than ``MAX_REPLY_LINE`` bytes of replies pile up without reading them.
        """
        if self.broken:
            return False
        data = encode_line(obj)
        if len(self._outbuf) + len(data) > MAX_REPLY_LINE:
            self._break()
            return False
        self._outbuf += data
        return self.flush()

    def flush(self) -> bool:
        """Write as much of the buffer as the socket takes; False once :attr:`broken`."""
        if self._sock is None or self._broken:
            return False
        while self._outbuf:
            try:
                sent = self._sock.send(self._outbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:  # EPIPE, ECONNRESET
                self._break()
                return False
            del self._outbuf[:sent]
        return True

    def _break(self) -> None:
        self._broken = True
        self._outbuf.clear()
        self._inbuf.clear()

    def close(self) -> None:
        """Close the socket (the owner's call, after unregistering :meth:`fileno`)."""
        sock, self._sock = self._sock, None
        self._break()
        if sock is not None:
            sock.close()


def _peer_cred(sock: socket.socket) -> PeerCred | None:
    size = struct.calcsize("3i")
    try:
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
        )
    except OSError:
        return None
    return PeerCred(pid=pid, uid=uid, gid=gid)


class ControlServer:
    """The listening control socket (the master's side)."""

    __slots__ = ("_inode", "_owner_pid", "_sock", "path")

    def __init__(self, sock: socket.socket, path: str, inode: tuple[int, int]) -> None:
        self._sock: socket.socket | None = sock
        self.path = path
        self._inode = inode
        self._owner_pid = os.getpid()

    @classmethod
    def bind(cls, path: str, *, backlog: int = 16) -> ControlServer:
        """Create the socket at *path*: parent dir (0700 if we create it), stale socket
        removed, mode 0600, listening and non-blocking.

        Every failure raises :class:`ControlError` (never a bare ``OSError``) with one line
        ``control socket PATH: reason``; a live socket at *path* reads "another master is
        listening there".
        """
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except FileExistsError as exc:  # exist_ok covers directories only
            raise ControlError(f"control socket {path}: {parent} is not a directory") from exc
        except (OSError, ValueError) as exc:
            raise ControlError(
                f"control socket {path}: cannot create {parent}: {_reason(exc)}"
            ) from exc
        try:
            remove_stale_socket(path)
        except FileExistsError as exc:
            raise ControlError(f"control socket {path}: {_stale_reason(exc)}") from exc
        except TimeoutError as exc:  # listening, with a full backlog: someone is there
            raise ControlError(
                f"control socket {path}: a process is listening there but does not accept "
                "connections (another master, stuck?)"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ControlError(f"control socket {path}: {_reason(exc)}") from exc
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise ControlError(f"control socket {path}: {_reason(exc)}") from exc
        try:
            sock.bind(path)
        except (OSError, ValueError) as exc:
            sock.close()
            raise ControlError(f"control socket {path}: {_reason(exc)}") from exc
        try:
            os.chmod(path, 0o600)  # before listen(): nobody can connect in between
            st = os.stat(path)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            _unlink_quietly(path)  # we created it a moment ago
            raise ControlError(f"control socket {path}: {_reason(exc)}") from exc
        return cls(sock, path, (st.st_dev, st.st_ino))

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def accept(self) -> ControlConn | None:
        """Accept one pending client, or None if there is none (or it vanished already)."""
        if self._sock is None:
            return None
        try:
            conn, _addr = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        return ControlConn(conn)

    def close(self) -> None:
        """Close, and unlink the path if it is still the socket this process created."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        if os.getpid() != self._owner_pid:
            return  # a forked worker closing its inherited copy
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode and stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return "another master is listening there"
        if exc.strerror:
            return exc.strerror
    return str(exc) or type(exc).__name__


def _stale_reason(exc: FileExistsError) -> str:
    """Why ``remove_stale_socket`` left the path alone (its own text repeats the path)."""
    if exc.errno == errno.EADDRINUSE:
        return "another master is listening there"
    return "exists and is not a socket; refusing to replace it"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
