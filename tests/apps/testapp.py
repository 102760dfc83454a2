"""An ASGI app for the process tests: slow, loop-blocking and crashing routes.

Never ship routes like these in a real app; they exist so tests can hold a request in flight,
wedge a worker's event loop, or kill a worker from inside.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from urllib.parse import parse_qs

from appliance.worker.info import current

IMPORT_PID = os.getpid()
VERSION = "v1"


async def _send(send, status: int, doc: dict) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    seconds = float(query.get("s", "0"))
    path = scope["path"]
    if path == "/sleep":
        await asyncio.sleep(seconds)
    elif path == "/block":
        time.sleep(seconds)  # wedges the event loop on purpose
    elif path == "/crash":
        os._exit(7)
    if path == "/env":
        await _send(send, 200, {"env": sorted(os.environ)})
        return
    me = current()
    await _send(
        send,
        200,
        {
            "pid": os.getpid(),
            "import_pid": IMPORT_PID,
            "generation": me.generation if me else None,
            "worker_id": me.worker_id if me else None,
            "version": VERSION,
            "path": path,
        },
    )
