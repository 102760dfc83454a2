"""``http.readiness_path``: the pool's readiness, answered by the worker before the app.

Kubernetes' ``readinessProbe``, nginx and HAProxy's ``http-check`` ask over HTTP whether to
send traffic. The answer is the master's, not this worker's: every worker reads the
:class:`~appliance.engines.balance.Readiness` word the master keeps in the shared
:class:`~appliance.engines.balance.LoadBoard`, so all of them say the same thing at the same
moment, and ``appliance drain`` turns every answer to 503 before the command returns. A worker
that is itself stopping (SIGTERM, or its master died) says ``stopping`` whatever the word says.

The app never sees the path (any method, any query string); every other request, and the
lifespan scope, go to the app untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from appliance.engines.balance import Readiness

__all__ = ["ReadinessApp"]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_BODIES = {
    Readiness.READY: b"ready\n",
    Readiness.STARTING: b"starting\n",
    Readiness.DRAINED: b"drained\n",
    Readiness.MAINT: b"maintenance\n",
    Readiness.STOPPING: b"stopping\n",
}


class ReadinessApp:
    """An ASGI app that answers ``path`` itself (200 only when ready) and passes the rest on."""

    def __init__(self, app: Any, path: str, readiness: Callable[[], Readiness]) -> None:
        self.app = app
        self.path = path
        self.readiness = readiness

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope.get("type") != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        state = self.readiness()
        body = _BODIES.get(state, b"starting\n")
        await send(
            {
                "type": "http.response.start",
                "status": 200 if state is Readiness.READY else 503,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body}
        )
