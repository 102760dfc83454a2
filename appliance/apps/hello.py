"""The built-in app, served when no ``app.target`` is configured.

``GET /`` says which worker answered (pid, generation, config digest): the quickest way to see
a rolling reload happen. ``GET /healthz`` answers 200 for load balancers and probes. It is
plain ASGI with no framework, so it costs nothing to import in the master.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.worker.info import current

__all__ = ["app"]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/healthz":
        await _respond(send, 200, b"ok\n", b"text/plain; charset=utf-8")
        return
    if path != "/":
        await _respond(send, 404, b"not found\n", b"text/plain; charset=utf-8")
        return
    me = current()
    doc = {
        "server": "appliance",
        "pid": os.getpid(),
        "worker_id": me.worker_id if me else None,
        "generation": me.generation if me else None,
        "config_digest": me.config_digest if me else None,
    }
    await _respond(send, 200, json.dumps(doc).encode() + b"\n", b"application/json")
