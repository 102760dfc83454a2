"""ASGI variants: ``hello`` (short body naming the pid) and ``cpu`` (fixed ~2 ms of work)."""

import os

from bench.apps.work import cpu_work

_HEADERS = [(b"content-type", b"text/plain")]


async def _send_body(send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": _HEADERS + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def hello(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    await _send_body(send, b"hello from pid=%d\n" % os.getpid())


async def cpu(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    x = cpu_work()
    await _send_body(send, b"cpu %d from pid=%d\n" % (x, os.getpid()))
