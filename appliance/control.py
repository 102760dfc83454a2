"""The control socket: ``appliance status`` / ``appliance reload`` talk to the running master.

Transport: a unix stream socket, mode 0600 (only the service user and root may connect), in
a directory we create 0700 when it is missing. Messages are newline-delimited JSON objects in
UTF-8, at most 64 KiB per request line.

Protocol (stable; clients in the field depend on it):

* A request is one object with a ``"cmd"`` string and its arguments beside it::

      {"cmd": "status"}
      {"cmd": "reload"}
      {"cmd": "scale", "workers": 4}

* Every request gets exactly one *final* reply, an object with a boolean ``"ok"``::

      {"ok": true, "status": {...}}                  (status)
      {"ok": true, "reload": {...}}                  (reload, when it finished)
      {"ok": true, "workers": 4}                     (scale: the new target pool size)
      {"ok": false, "error": "reason"}               (any command that failed)

* Before its final reply a command may send any number of ``{"progress": {...}}`` lines
  (reload reports each worker replaced). A line without ``"ok"`` is never final.
* An unknown command, malformed JSON or a line over the limit gets
  ``{"ok": false, "error": "..."}`` and the connection stays usable.
* Requests on one connection are answered in order; a client may send the next request after
  the final reply of the previous one.

The server half is non-blocking and owns no loop: the master registers
:meth:`ControlServer.fileno` and each :meth:`ControlConn.fileno` with its one selector and
calls :meth:`ControlServer.accept`, :meth:`ControlConn.read_requests` and
:meth:`ControlConn.flush` when they are ready. The client half is blocking, for the CLI.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.sockets import remove_stale_socket

__all__ = [
    "COMMANDS",
    "MAX_LINE",
    "BadRequest",
    "ControlClient",
    "ControlConn",
    "ControlError",
    "ControlServer",
    "ControlUnavailable",
    "PeerCred",
    "Request",
    "error_reply",
    "format_status",
    "ok_reply",
    "parse_request",
    "progress_reply",
]

MAX_LINE = 64 * 1024
"""Longest request line accepted; requests are tiny, so anything longer is a confused client."""
_MAX_OUTBUF = 1 << 20
"""A peer that lets a MiB of replies pile up is not reading; we drop it rather than buffer."""
COMMANDS = frozenset({"status", "reload", "scale"})


class ControlError(Exception):
    """The control socket could not be set up or the conversation failed."""


class ControlUnavailable(ControlError):
    """No master to talk to (socket missing, nobody listening, or not allowed to connect)."""


# --- requests and replies --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request: the command and its arguments (everything but ``cmd``)."""

    cmd: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A line that is not a valid request; answer it with ``error_reply(bad.error)``."""

    error: str


def parse_request(line: bytes) -> Request | BadRequest:
    """Validate one request line (without or with its trailing newline)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return BadRequest(f"malformed JSON: {exc}")
    if not isinstance(obj, dict):
        return BadRequest(f"expected a JSON object, got {type(obj).__name__}")
    cmd = obj.pop("cmd", None)
    if not isinstance(cmd, str):
        return BadRequest('missing "cmd" (a string: one of ' + ", ".join(sorted(COMMANDS)) + ")")
    if cmd not in COMMANDS:
        return BadRequest(f"unknown cmd {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    if cmd == "scale":
        workers = obj.get("workers")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            return BadRequest(f'scale: "workers" must be an integer >= 1 (got {workers!r})')
        if set(obj) != {"workers"}:
            return BadRequest(f"scale: unexpected arguments {sorted(set(obj) - {'workers'})}")
    elif obj:
        return BadRequest(f"{cmd}: takes no arguments (got {sorted(obj)})")
    return Request(cmd=cmd, args=obj)


def ok_reply(**fields: Any) -> dict[str, Any]:
    """Final success reply, e.g. ``ok_reply(status=status_dict)``."""
    return {"ok": True, **fields}


def error_reply(error: str) -> dict[str, Any]:
    """Final failure reply."""
    return {"ok": False, "error": error}


def progress_reply(**fields: Any) -> dict[str, Any]:
    """A non-final progress line, e.g. ``progress_reply(replaced=1, of=4, generation=3)``."""
    return {"progress": fields}


# --- server side -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerCred:
    """Who connected (SO_PEERCRED), for the log line of each request."""

    pid: int
    uid: int
    gid: int


class ControlConn:
    """One accepted client. Non-blocking; reads and writes only when the selector says so."""

    __slots__ = ("_discarding", "_eof", "_inbuf", "_outbuf", "_sock", "peer")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._discarding = False  # inside an over-long line, dropping until its newline
        self._eof = False
        self.peer = _peer_cred(sock)

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    @property
    def wants_write(self) -> bool:
        """True while replies wait in the buffer: register for EVENT_WRITE and call flush()."""
        return bool(self._outbuf) and self._sock is not None

    def read_requests(self) -> list[Request | BadRequest] | None:
        """Parse whatever complete lines have arrived; None once the peer closed.

        One recv() per call: the selector is level-triggered, so unread data wakes us again,
        and a chatty client cannot hold the master's loop.
        """
        if self._sock is None or self._eof:
            return None
        try:
            chunk = self._sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:  # ECONNRESET and friends
            self._eof = True
            return None
        if not chunk:
            self._eof = True
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
        """Queue one JSON line and try to write it now; False if the peer is gone or stuck."""
        if self._sock is None:
            return False
        data = json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
        if len(self._outbuf) + len(data) > _MAX_OUTBUF:
            self.close()
            return False
        self._outbuf += data
        return self.flush()

    def flush(self) -> bool:
        """Write as much of the buffer as the socket takes; False if the peer is gone."""
        if self._sock is None:
            return False
        while self._outbuf:
            try:
                sent = self._sock.send(self._outbuf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:  # EPIPE, ECONNRESET
                self.close()
                return False
            del self._outbuf[:sent]
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._outbuf.clear()
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
        removed, mode 0600, listening and non-blocking. Errors: :class:`ControlError`."""
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ControlError(
                f"control socket {path}: cannot create {parent}: {exc.strerror}"
            ) from exc
        try:
            remove_stale_socket(path)
        except FileExistsError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror}") from exc
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror}") from exc
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)  # before listen(): nobody can connect in between
            st = os.stat(path)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
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


# --- client side -----------------------------------------------------------------------------


class ControlClient:
    """Blocking client for the CLI. *timeout* bounds each wait for a line, so a reload that
    keeps sending progress lines may take longer than *timeout* in total."""

    __slots__ = ("path", "timeout")

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ControlUnavailable(
                f"no appliance master is listening on {self.path} (is the service running?)"
            ) from exc
        except PermissionError as exc:
            sock.close()
            raise ControlUnavailable(
                f"permission denied connecting to {self.path}: the control socket is mode 0600, "
                "run as the service's user or root"
            ) from exc
        except TimeoutError as exc:
            sock.close()
            raise ControlUnavailable(f"connecting to {self.path} timed out") from exc
        except OSError as exc:
            sock.close()
            raise ControlUnavailable(
                f"cannot connect to {self.path}: {exc.strerror or exc}"
            ) from exc
        return sock

    def stream(self, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send one request; yield every reply line, the last one being the final reply."""
        sock = self._connect()
        try:
            request = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
            try:
                sock.sendall(request)
            except OSError as exc:
                raise ControlError(f"sending to {self.path} failed: {exc.strerror or exc}") from exc
            reader = sock.makefile("rb")
            while True:
                try:
                    line = reader.readline()
                except TimeoutError as exc:
                    raise ControlError(
                        f"no reply from the master on {self.path} within {self.timeout:g}s"
                    ) from exc
                except OSError as exc:
                    raise ControlError(f"reading from {self.path} failed: {exc}") from exc
                if not line:
                    raise ControlError(f"the master closed {self.path} before replying")
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ControlError(f"unreadable reply from the master: {line[:200]!r}") from exc
                if not isinstance(obj, dict):
                    raise ControlError(f"unexpected reply from the master: {line[:200]!r}")
                yield obj
                if "ok" in obj:
                    return
        finally:
            sock.close()

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its final reply (progress lines are skipped)."""
        final: dict[str, Any] = {}
        for obj in self.stream(cmd, **args):
            final = obj
        return final


# --- the status table ------------------------------------------------------------------------


def _human_duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(seconds)
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _when(unix: object, now: float | None) -> str:
    if not isinstance(unix, (int, float)) or isinstance(unix, bool):
        return ""
    text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
    if now is not None:
        text += f" ({_human_duration(max(0.0, now - unix))} ago)"
    return text


def _reload_line(reload: object, now: float | None) -> str:
    if not isinstance(reload, Mapping):
        return "-"
    parts: list[str] = []
    if reload.get("state") == "in_progress":
        text = "in progress"
        if reload.get("generation") is not None:
            text += (
                f": generation {_cell(reload.get('generation'))}, "
                f"{_cell(reload.get('replaced'))}/{_cell(reload.get('total'))} workers replaced"
            )
        parts.append(text)
    last = reload.get("last")
    if isinstance(last, Mapping):
        when = _when(last.get("finished_unix"), now)
        if last.get("ok"):
            text = f"last ok, generation {_cell(last.get('generation'))}"
            if last.get("replaced") is not None:
                text += f", {_cell(last.get('replaced'))} worker(s) replaced"
            elif last.get("message"):
                text += f" ({last.get('message')})"
        else:
            text = f"last FAILED: {_cell(last.get('error'))}"
        if when:
            text += f", {when}"
        parts.append(text)
    elif not parts:
        parts.append("none since start")
    return "; ".join(parts)


_COLUMNS = (
    ("ID", "id"),
    ("PID", "pid"),
    ("GEN", "generation"),
    ("STATE", "state"),
    ("UPTIME", "uptime_s"),
    ("REQUESTS", "requests"),
    ("IN-FLIGHT", "in_flight"),
    ("RSS MiB", "rss_mb"),
)


def format_status(status: Mapping[str, Any], *, now: float | None = None) -> str:
    """Render the ``status`` reply as the ``appliance status`` table; missing keys show as -.

    *now* (unix time) adds "... ago" to the last reload; omitted, times are absolute.
    """
    header = [
        ("phase", _cell(status.get("phase"))),
        ("master pid", _cell(status.get("pid"))),
        ("generation", _cell(status.get("generation"))),
        ("workers", f"{_cell(status.get('ready'))} ready / {_cell(status.get('target'))} target"),
        ("config", _cell(status.get("config_digest"))),
        ("reload", _reload_line(status.get("reload"), now)),
    ]
    started = _when(status.get("started_at_unix"), now)
    if started:
        header.insert(2, ("started", started))
    width = max(len(label) for label, _ in header)
    lines = [f"{label:<{width}}  {value}" for label, value in header]

    workers = status.get("workers")
    rows: list[list[str]] = []
    if isinstance(workers, list):
        for worker in workers:
            if not isinstance(worker, Mapping):
                continue
            rows.append(
                [
                    _human_duration(worker.get("uptime_s"))
                    if key == "uptime_s"
                    else _cell(worker.get(key))
                    for _title, key in _COLUMNS
                ]
            )
    lines.append("")
    if not rows:
        lines.append("no workers")
        return "\n".join(lines)
    titles = [title for title, _ in _COLUMNS]
    widths = [max(len(titles[i]), *(len(row[i]) for row in rows)) for i in range(len(titles))]
    numeric = {"id", "pid", "generation", "uptime_s", "requests", "in_flight", "rss_mb"}

    def fmt(cells: list[str]) -> str:
        out = []
        for (_, key), cell, w in zip(_COLUMNS, cells, widths, strict=True):
            out.append(cell.rjust(w) if key in numeric else cell.ljust(w))
        return "  ".join(out).rstrip()

    lines.append(fmt(titles))
    lines.extend(fmt(row) for row in rows)
    return "\n".join(lines)
