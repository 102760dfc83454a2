"""The master <-> template channel: the one owner of its format, both ends.

A ``SOCK_SEQPACKET`` socket pair per generation's template process: each message is one
datagram holding one JSON object (boundaries kept, never torn), and the report pipe a new
worker writes to travels with its ``spawn`` as an ``SCM_RIGHTS`` descriptor.

Master -> template::

    {"t": "spawn", "key": K, "slot": S, "lane": L|null}   + the worker's report pipe (write end)

Template (or the short-lived process that forks the worker) -> master::

    {"t": "ready"}                                        the template imported what it had to
    {"t": "boot_error", "error": "..."}                   it could not (it exits next)
    {"t": "forked", "key": K, "pid": P}                   worker K runs as pid P
    {"t": "spawn_failed", "key": K, "error": "..."}       fork() failed for worker K

Anything else decodes to :class:`Bad`, never an exception.
"""

from __future__ import annotations

import array
import json
import socket
from dataclasses import dataclass

__all__ = [
    "MAX_MESSAGE",
    "Bad",
    "BootError",
    "Forked",
    "Message",
    "Ready",
    "Spawn",
    "SpawnFailed",
    "decode",
    "encode",
    "pair",
    "receive",
    "send",
]

MAX_MESSAGE = 8192


@dataclass(frozen=True, slots=True)
class Spawn:
    key: int
    slot: int
    lane: int | None


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class BootError:
    error: str


@dataclass(frozen=True, slots=True)
class Forked:
    key: int
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    key: int
    error: str


@dataclass(frozen=True, slots=True)
class Bad:
    excerpt: str


Message = Spawn | Ready | BootError | Forked | SpawnFailed


def encode(msg: Message) -> bytes:
    match msg:
        case Spawn(key=key, slot=slot, lane=lane):
            obj: dict[str, object] = {"t": "spawn", "key": key, "slot": slot, "lane": lane}
        case Ready():
            obj = {"t": "ready"}
        case BootError(error=error):
            obj = {"t": "boot_error", "error": error[: MAX_MESSAGE // 4]}
        case Forked(key=key, pid=pid):
            obj = {"t": "forked", "key": key, "pid": pid}
        case SpawnFailed(key=key, error=error):
            obj = {"t": "spawn_failed", "key": key, "error": error[: MAX_MESSAGE // 4]}
    return json.dumps(obj, separators=(",", ":")).encode()


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def decode(data: bytes) -> Message | Bad:
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        match obj.get("t"):
            case "spawn":
                lane = obj.get("lane")
                return Spawn(
                    _int(obj["key"]), _int(obj["slot"]), None if lane is None else _int(lane)
                )
            case "ready":
                return Ready()
            case "boot_error":
                return BootError(str(obj.get("error", "unknown")))
            case "forked":
                return Forked(_int(obj["key"]), _int(obj["pid"]))
            case "spawn_failed":
                return SpawnFailed(_int(obj["key"]), str(obj.get("error", "unknown")))
    except (ValueError, TypeError, KeyError, RecursionError):
        pass
    return Bad(data[:200].decode("utf-8", "replace"))


def pair() -> tuple[socket.socket, socket.socket]:
    """(master end, template end); both blocking, close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, msg: Message, fd: int | None = None) -> bool:
    """Send one message (with ``fd`` attached); False if the peer is gone or not reading."""
    ancillary = []
    if fd is not None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    try:
        sock.sendmsg([encode(msg)], ancillary, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
    except OSError:
        return False
    return True


def receive(sock: socket.socket) -> tuple[Message | Bad, int | None] | None:
    """One message and the descriptor it carried; None at EOF (the peer closed).

    Raises BlockingIOError on a non-blocking socket with nothing to read. A message that
    carried more than one descriptor keeps the first; the rest are closed.
    """
    import os

    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data and not fds:
        return None
    fd = fds[0] if fds else None
    for extra in fds[1:]:
        os.close(extra)
    return decode(data), fd
