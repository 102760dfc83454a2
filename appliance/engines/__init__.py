"""How a worker serves: uvicorn's protocol and event loop on the sockets the master owns.

:func:`preload_engine` runs in the master before the first fork so that a replacement worker
starts without importing uvicorn, uvloop, httptools or a2wsgi again (copy-on-write pages).
"""

from __future__ import annotations

__all__ = ["preload_engine"]


def preload_engine() -> None:
    """Import the serving stack (not the app) in the master."""
    import a2wsgi  # noqa: F401
    import httptools  # noqa: F401
    import uvicorn.config
    import uvicorn.lifespan.on
    import uvicorn.protocols.http.httptools_impl
    import uvicorn.protocols.websockets.websockets_sansio_impl
    import uvicorn.server  # noqa: F401
    import uvloop  # noqa: F401

    from appliance.engines import asgi, h1  # noqa: F401
