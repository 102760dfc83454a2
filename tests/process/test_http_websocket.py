"""WebSockets end to end: the real master, the real ``websockets`` client library.

The close on drain is checked twice: with the library (it must see the code it was sent and a
clean closing handshake) and with a raw socket (the TCP connection must end with a FIN after
the handshake, never a reset).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import struct

import pytest
from harness import APPS, base_config, http_get
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.sync.client import connect


def _config(workdir, **sections):
    return base_config(
        workdir,
        app={"target": "echoapp:app", "directory": str(APPS)},
        workers={"count": 1, "graceful_timeout_s": 60},
        **sections,
    )


def test_upgrade_is_101_and_text_bytes_and_200kb_echo(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    with connect(f"ws://127.0.0.1:{m.port}/ws", open_timeout=10, close_timeout=10) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers["Upgrade"].lower() == "websocket"
        ws.send("héllo")
        assert ws.recv(timeout=10) == "héllo"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=10) == b"\x00\x01\xff"
        big = os.urandom(200_000)
        ws.send(big)
        assert ws.recv(timeout=10) == big
    # The client closed with 1000; the app saw it.
    _, seen = http_get(m.port, "/seen")
    assert seen["ws_disconnect"] == [1000]


def test_message_over_max_size_closes_with_1009(start_master, workdir):
    m = start_master(_config(workdir, websocket={"max_message_bytes": 4096}))
    m.ready()
    with connect(f"ws://127.0.0.1:{m.port}/ws", open_timeout=10, close_timeout=10) as ws:
        ws.send(b"a" * 4096)
        assert ws.recv(timeout=10) == b"a" * 4096
        ws.send(b"a" * 4097)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_disabled_websockets_reach_the_app_as_http(start_master, workdir):
    m = start_master(_config(workdir, websocket={"enabled": False}))
    m.ready()
    sock = _raw_upgrade(m.port)
    head = _read_head(sock)
    assert head.startswith(b"HTTP/1.1 200 "), head
    sock.close()


def test_sigterm_closes_websockets_with_1001_and_a_fin(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    with connect(f"ws://127.0.0.1:{m.port}/ws", open_timeout=10, close_timeout=10) as lib:
        raw = _raw_upgrade(m.port)
        head = _read_head(raw)
        assert head.startswith(b"HTTP/1.1 101 "), head
        lib.send("before")
        assert lib.recv(timeout=10) == "before"
        mark = m.logs.mark()
        m.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosedOK) as closed:
            lib.recv(timeout=30)
        assert closed.value.rcvd.code == 1001 and closed.value.rcvd_then_sent
        assert _raw_close_handshake(raw) == 1001
    assert m.wait(30) == 0
    exited = m.logs.wait_for("worker.exited", since=mark)
    assert exited["exit_code"] == 0 and exited.get("signal") is None


def test_a_replaced_worker_closes_websockets_with_1012(start_master, workdir):
    """SIGUSR2 is how the master tells a worker it is being replaced (the service goes on)."""
    m = start_master(_config(workdir))
    m.ready()
    (pid,) = m.worker_pids()
    with connect(f"ws://127.0.0.1:{m.port}/ws", open_timeout=10, close_timeout=10) as ws:
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
        raw = _raw_upgrade(m.port)
        assert _read_head(raw).startswith(b"HTTP/1.1 101 ")
        mark = m.logs.mark()
        os.kill(pid, signal.SIGUSR2)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        # A complete closing handshake: the server's 1012, then our answer.
        assert closed.value.rcvd.code == 1012 and closed.value.rcvd_then_sent
        assert _raw_close_handshake(raw) == 1012
    m.logs.wait_for("worker.exited", since=mark, pid=pid)


def test_rolling_reload_closes_websockets_with_1012(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    (pid,) = m.worker_pids()
    with connect(f"ws://127.0.0.1:{m.port}/ws", open_timeout=10, close_timeout=10) as ws:
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
        mark = m.logs.mark()
        m.signal(signal.SIGHUP)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        code = closed.value.rcvd.code
    exited = m.logs.wait_for("worker.exited", since=mark, pid=pid)
    # The old worker ended well before its 60 s graceful timeout, by itself.
    assert exited["exit_code"] == 0 and exited["reason"] == "replaced"
    assert code == 1012


# --- raw WebSocket client pieces (RFC 6455), for what the library hides ---------------------


def _raw_upgrade(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection ended inside a frame"
        data += chunk
    return data


def _raw_close_handshake(sock: socket.socket) -> int:
    """Read the server's close frame, answer it, and require a FIN (not a reset) after."""
    first, second = _recv_exact(sock, 2)
    assert first & 0x0F == 0x8, f"expected a close frame, got opcode {first & 0x0F}"
    length = second & 0x7F
    payload = _recv_exact(sock, length)
    (code,) = struct.unpack("!H", payload[:2])
    mask = os.urandom(4)
    echo = bytes(b ^ mask[i % 4] for i, b in enumerate(payload[:2]))
    sock.sendall(bytes([0x88, 0x80 | 2]) + mask + echo)
    try:
        rest = sock.recv(65536)
    except ConnectionResetError:  # pragma: no cover - what this test exists to catch
        pytest.fail("the server reset the connection after the closing handshake")
    assert rest == b"", rest
    sock.close()
    return code
