"""The balanced acceptor's count follows a connection into the WebSocket protocol.

One forked engine (the real ``asgi.serve`` on a shared :class:`LoadBoard`), a real
``websockets`` client: while the WebSocket is open the worker's lane counts it, and once it is
closed the count is back to zero (a leaked count would make the worker look busy forever and
starve it of connections).
"""

from __future__ import annotations

from forked_engine import forked_engine  # type: ignore[import-not-found]
from websockets.sync.client import connect

from appliance.engines.settings import EngineSettings


def test_websocket_connection_is_counted_until_it_closes():
    with forked_engine(EngineSettings(graceful_timeout_s=5)) as engine:
        with connect(f"ws://127.0.0.1:{engine.port}/ws", open_timeout=10) as ws:
            ws.send("x")
            assert ws.recv(timeout=10) == "x"
            assert engine.count() == 1
        engine.wait_count(0)
