"""The balanced acceptor's count follows a connection to its end: HTTP, through the PROXY
gate's hand-over, and into the WebSocket protocol.

One forked engine (the real ``asgi.serve`` on a shared :class:`LoadBoard`), a real
``websockets`` client: while the WebSocket is open the worker's lane counts it, and once it is
closed the count is back to zero (a leaked count would make the worker look busy forever and
starve it of connections).
"""

from __future__ import annotations

import socket

from forked_engine import forked_engine  # type: ignore[import-not-found]
from websockets.sync.client import connect

from appliance.engines.settings import EngineSettings
from appliance.http.proxy import ProxyPolicy, parse_network


def test_websocket_connection_is_counted_until_it_closes():
    with forked_engine(EngineSettings(graceful_timeout_s=5)) as engine:
        with connect(f"ws://127.0.0.1:{engine.port}/ws", open_timeout=10) as ws:
            ws.send("x")
            assert ws.recv(timeout=10) == "x"
            assert engine.count() == 1
        engine.wait_count(0)


def _get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before a response"
        data += chunk
    return data


def test_http_connection_is_counted_until_it_closes():
    """Our HTTP protocol reports its end through the acceptor's on_lost hook."""
    with forked_engine(EngineSettings(graceful_timeout_s=5)) as engine:
        with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as client:
            assert _get(client).startswith(b"HTTP/1.1 200")
            assert engine.count() == 1
        engine.wait_count(0)


def test_proxy_protocol_connection_is_counted_through_the_hand_over():
    """The PROXY gate hands the connection to the HTTP protocol; a refused one ends at the
    gate. Either way the count returns to zero."""
    policy = ProxyPolicy("http", (parse_network("127.0.0.1"),))
    with forked_engine(EngineSettings(graceful_timeout_s=5, proxy=(policy,))) as engine:
        with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as client:
            client.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 80\r\n")
            assert _get(client).startswith(b"HTTP/1.1 200")
            assert engine.count() == 1
        engine.wait_count(0)
        with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as client:
            client.sendall(b"NOT A PROXY HEADER\r\n\r\n")
            assert client.recv(1) == b""  # refused: closed by the gate
        engine.wait_count(0)
