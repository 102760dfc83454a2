"""The balanced acceptor's count follows a connection into the WebSocket protocol.

One forked engine (the real ``asgi.serve`` on a shared :class:`LoadBoard`), a real
``websockets`` client: while the WebSocket is open the worker's lane counts it, and once it is
closed the count is back to zero (a leaked count would make the worker look busy forever and
starve it of connections).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

from websockets.sync.client import connect

from appliance.engines.balance import LoadBoard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps"))


def _wait_value(board: LoadBoard, lane: int, want: int) -> None:
    deadline = time.monotonic() + 20
    while board.value(lane) != want:
        assert time.monotonic() < deadline, f"lane count {board.value(lane)}, wanted {want}"
        time.sleep(0.01)  # shared memory has no event to wait on; a deadline bounds it


def test_websocket_connection_is_counted_until_it_closes():
    import echoapp

    from appliance.engines.settings import EngineSettings

    board = LoadBoard(capacity=2)
    lane = board.claim()
    assert lane is not None
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(report_r)
            from appliance.engines import asgi

            code = asgi.serve(
                echoapp.app,
                [listener],
                EngineSettings(graceful_timeout_s=5),
                report_fd=report_w,
                alive_fd=None,
                board=board,
                lane=lane,
            )
        finally:
            os._exit(code)
    os.close(report_w)
    try:
        with os.fdopen(report_r, "rb", buffering=0) as pipe:
            data = b""
            while b'"ready"' not in data:
                chunk = pipe.read(4096)
                assert chunk, "engine exited before ready"
                data += chunk
            _wait_value(board, lane, 0)
            with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
                ws.send("x")
                assert ws.recv(timeout=10) == "x"
                assert board.value(lane) == 1
            _wait_value(board, lane, 0)
    finally:
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        listener.close()
    assert os.waitstatus_to_exitcode(status) == 0
