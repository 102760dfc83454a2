"""An ASGI app that leaves an orphan behind, as apps that daemonise a helper do.

``/orphan`` forks a child that forks a grandchild and exits at once (the classic double fork):
the grandchild, named ``apl-orphan``, is re-parented to the nearest subreaper or PID 1 and
exits once the file named by the query's ``gate`` exists (at most 30 s; at once without
one). Someone must reap it, or it stays a zombie. Everything else: 200 ``{}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import time

_PR_SET_NAME = 15


def _orphan(gate: str) -> int:
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        ctypes.CDLL(None).prctl(_PR_SET_NAME, b"apl-orphan", 0, 0, 0)
        deadline = time.monotonic() + 30
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)
    os.waitpid(child, 0)  # the middle process is ours; the grandchild is nobody's
    return child


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    doc: dict[str, object] = {}
    if scope["path"] == "/orphan":
        query = scope.get("query_string", b"").decode()
        gate = query.removeprefix("gate=") if query.startswith("gate=") else ""
        doc["middle"] = _orphan(gate)
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
