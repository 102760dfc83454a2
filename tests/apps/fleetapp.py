"""The fleet demo app (tests/system/test_fleet.py, docs/scaling.md): state lives outside the
workers, in Redis, so any worker of any host may answer any user.

``GET /hit/USER`` increments the counter ``fleet:count:USER`` in Redis and answers
``{"user", "count", "host", "pid", "client"}``: the new value, the host name, the worker's pid
and the client address the server saw (through the PROXY protocol: the balancer's client).
Anything else is 404. Redis is ``FLEET_REDIS`` (``HOST:PORT``, default 127.0.0.1:6379).

Dependency-free: a few lines of RESP over one asyncio connection per worker process. The
connection is opened on first use, in the worker (never before the fork: a connection
inherited by several workers would mix their replies), and serialised with a lock. When the
conversation with Redis breaks, the request gets 503 and the connection is dropped; whether
that increment happened is unknown, which is exactly what the client counts as a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from typing import Any

__all__ = ["app"]

_USER = re.compile(r"^/hit/([A-Za-z0-9_-]{1,64})$")
_HOST = socket.gethostname()
_TIMEOUT_S = 5.0


class RedisError(RuntimeError):
    pass


#: What a broken conversation with Redis raises (the connection is then dropped).
_BROKEN = (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError,
           asyncio.LimitOverrunError, ValueError)


def _command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def _reply(reader: asyncio.StreamReader) -> Any:
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind == b":":
        return int(rest)
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode(errors="replace"))
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else (await reader.readexactly(size + 2))[:-2]
    raise RedisError(f"unexpected reply {line[:40]!r}")


class _Redis:
    """One connection per worker process, opened lazily after the fork."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host, int(port)
        self._pid = 0
        self._lock: asyncio.Lock | None = None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, *args: str) -> Any:
        if self._pid != os.getpid():   # first use in this process (or a fork of it)
            self._pid, self._lock, self._streams = os.getpid(), asyncio.Lock(), None
        assert self._lock is not None
        async with self._lock:
            try:
                if self._streams is None:
                    self._streams = await asyncio.wait_for(
                        asyncio.open_connection(self._host, self._port), _TIMEOUT_S)
                reader, writer = self._streams
                writer.write(_command(*args))
                return await asyncio.wait_for(_reply(reader), _TIMEOUT_S)
            except _BROKEN:
                if self._streams is not None:
                    self._streams[1].close()
                self._streams = None
                raise


_redis = _Redis(os.environ.get("FLEET_REDIS", "127.0.0.1:6379"))


async def _send(send: Any, status: int, doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    match = _USER.match(scope["path"])
    if match is None:
        await _send(send, 404, {"error": "try GET /hit/USER"})
        return
    user = match.group(1)
    client = scope.get("client")
    try:
        count = await _redis.call("INCR", f"fleet:count:{user}")
    except (*_BROKEN, RedisError) as exc:
        await _send(send, 503, {"error": f"redis: {type(exc).__name__}: {exc}", "host": _HOST})
        return
    await _send(send, 200, {"user": user, "count": count, "host": _HOST, "pid": os.getpid(),
                            "client": client[0] if client else None})
