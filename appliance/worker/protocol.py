"""The worker -> master report pipe: the one owner of its format, both ends.

One JSON object per line, each under PIPE_BUF (4096 bytes), so a line is written atomically
and never interleaved or torn. A worker that cannot write because the master is not reading
drops the heartbeat rather than block its event loop.

The messages, as typed values (the worker builds them, the master decodes them; nobody writes
the keys by hand)::

    {"t": "ready"}                                              Ready()
    {"t": "hb", "req": N, "inflight": M, "conns": C, "rss": F}  Beat(N, M, C, F)
    {"t": "draining"}                                           Draining()
    {"t": "boot_error", "error": "..."}                         BootError("...")

Anything else decodes to :class:`Invalid` (with a short excerpt), never an exception: the
pipe is an input like any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

__all__ = [
    "MAX_LINE",
    "Beat",
    "BootError",
    "Draining",
    "Invalid",
    "Message",
    "MessageReader",
    "Ready",
    "decode",
    "encode",
    "send",
]

MAX_LINE = 4096
_EXCERPT = 200


@dataclass(frozen=True, slots=True)
class Ready:
    """The engine accepts connections."""


@dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat from the serving loop, with its counters."""

    requests: int
    in_flight: int
    connections: int = 0
    rss_mb: float = 0.0


@dataclass(frozen=True, slots=True)
class Draining:
    """Listening sockets closed: no new connections from here on."""


@dataclass(frozen=True, slots=True)
class BootError:
    """Why the worker cannot boot (the app raised at import, lifespan startup failed)."""

    error: str


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line that is not a message of this protocol."""

    excerpt: str


Message = Ready | Beat | Draining | BootError


def _fields(msg: Message) -> dict[str, object]:
    match msg:
        case Ready():
            return {"t": "ready"}
        case Beat(requests=req, in_flight=inflight, connections=conns, rss_mb=rss):
            return {"t": "hb", "req": req, "inflight": inflight, "conns": conns, "rss": rss}
        case Draining():
            return {"t": "draining"}
        case BootError(error=error):
            return {"t": "boot_error", "error": error}


def encode(msg: Message) -> bytes:
    """One line under :data:`MAX_LINE`; a long boot error is cut to fit."""
    line = json.dumps(_fields(msg), separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE and isinstance(msg, BootError):
        return encode(BootError(msg.error[: MAX_LINE // 8] + "..."))
    return line


def send(fd: int, msg: Message) -> bool:
    """Write one message; ``False`` if the pipe is full or the master is gone."""
    try:
        os.write(fd, encode(msg))
    except (BlockingIOError, BrokenPipeError):
        return False
    return True


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(value)
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise TypeError(value)
    return float(value)


def decode(line: bytes) -> Message | Invalid:
    """Parse one line (without its newline)."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        match obj.get("t"):
            case "ready":
                return Ready()
            case "hb":
                return Beat(
                    _int(obj.get("req", 0)),
                    _int(obj.get("inflight", 0)),
                    _int(obj.get("conns", 0)),
                    _float(obj.get("rss", 0.0)),
                )
            case "draining":
                return Draining()
            case "boot_error":
                return BootError(str(obj.get("error", "unknown")))
    except (ValueError, TypeError, RecursionError):
        pass
    return Invalid(line[:_EXCERPT].decode("utf-8", "replace"))


class MessageReader:
    """Reassembles lines from a non-blocking pipe; a line over the limit is one Invalid."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Message | Invalid]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out: list[Message | Invalid] = []
        if len(self._buf) > MAX_LINE:
            out.append(Invalid(self._buf[:_EXCERPT].decode("utf-8", "replace")))
            self._buf = b""
        out[:0] = [decode(line) for line in lines if line]
        return out
