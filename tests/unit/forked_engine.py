"""One real engine (``asgi.serve`` of tests/apps/echoapp.py) forked on a lane of a shared
:class:`LoadBoard`, for the tests that watch the balanced acceptor's count."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.engines.balance import LoadBoard
from appliance.engines.settings import EngineSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps"))


@dataclass
class Engine:
    port: int
    board: LoadBoard
    lane: int

    def count(self) -> int:
        return self.board.value(self.lane)

    def wait_count(self, want: int) -> None:
        deadline = time.monotonic() + 20
        while self.count() != want:
            assert time.monotonic() < deadline, f"lane count {self.count()}, wanted {want}"
            time.sleep(0.01)  # shared memory has no event to wait on; a deadline bounds it


@contextlib.contextmanager
def forked_engine(settings: EngineSettings) -> Iterator[Engine]:
    """Serve until the block ends (SIGTERM: drain), then check the engine exited 0."""
    import echoapp

    board = LoadBoard(capacity=2)
    lane = board.claim()
    assert lane is not None
    listener = socket.create_server(("127.0.0.1", 0))
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
                settings,
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
            engine = Engine(listener.getsockname()[1], board, lane)
            engine.wait_count(0)
            yield engine
    finally:
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        listener.close()
    assert os.waitstatus_to_exitcode(status) == 0
