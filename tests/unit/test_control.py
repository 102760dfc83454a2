"""The control socket over a real unix socket, with the server stepped by the test itself."""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from appliance.control import (
    MAX_LINE,
    BadRequest,
    ControlClient,
    ControlConn,
    ControlError,
    ControlServer,
    ControlUnavailable,
    Request,
    error_reply,
    format_status,
    ok_reply,
    parse_request,
    progress_reply,
)

STATUS: dict[str, Any] = {
    "phase": "running",
    "generation": 2,
    "target": 2,
    "ready": 2,
    "pid": 123,
    "config_digest": "abc123",
    "started_at_unix": 1_700_000_000.0,
    "workers": [
        {
            "id": 0,
            "pid": 201,
            "generation": 2,
            "state": "ready",
            "uptime_s": 3.2,
            "requests": 10,
            "in_flight": 0,
            "rss_mb": 21.5,
        },
        {
            "id": 1,
            "pid": 202,
            "generation": 2,
            "state": "ready",
            "uptime_s": 7384.0,
            "requests": 12345,
            "in_flight": 3,
            "rss_mb": 22.25,
        },
    ],
    "reload": {
        "state": "idle",
        "last": {
            "ok": True,
            "generation": 2,
            "error": None,
            "finished_unix": 1_700_000_100.0,
            "replaced": 2,
        },
    },
}

Handler = Callable[[ControlConn, Request], None]


def default_handler(conn: ControlConn, request: Request) -> None:
    if request.cmd == "status":
        conn.send(ok_reply(status=STATUS))
    elif request.cmd == "reload":
        for n in (1, 2):
            conn.send(progress_reply(replaced=n, of=2, generation=3))
        conn.send(ok_reply(reload={"generation": 3, "replaced": 2}))
    elif request.cmd == "scale":
        conn.send(ok_reply(workers=request.args["workers"]))


def step(
    server: ControlServer, until: Callable[[], bool], handler: Handler = default_handler
) -> None:
    """Run the server side the way the master's loop will: one selector, non-blocking calls."""
    deadline = time.monotonic() + 10
    conns: dict[int, ControlConn] = {}
    with selectors.DefaultSelector() as sel:
        sel.register(server.fileno(), selectors.EVENT_READ, None)
        while not until():
            remaining = deadline - time.monotonic()
            assert remaining > 0, "control conversation did not finish in time"
            for key, events in sel.select(min(remaining, 0.05)):
                if key.data is None:
                    conn = server.accept()
                    if conn is not None:
                        conns[conn.fileno()] = conn
                        sel.register(conn.fileno(), selectors.EVENT_READ, conn)
                    continue
                conn = key.data
                if events & selectors.EVENT_WRITE:
                    conn.flush()
                if events & selectors.EVENT_READ:
                    items = conn.read_requests()
                    if items is None:
                        sel.unregister(conn.fileno())
                        conns.pop(conn.fileno(), None)
                        conn.close()
                        continue
                    for item in items:
                        if isinstance(item, BadRequest):
                            conn.send(error_reply(item.error))
                        else:
                            handler(conn, item)
                if conn.fileno() >= 0:
                    wanted = selectors.EVENT_READ | (
                        selectors.EVENT_WRITE if conn.wants_write else 0
                    )
                    sel.modify(conn.fileno(), wanted, conn)
        for conn in conns.values():
            conn.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer.bind(str(tmp_path / "run" / "control.sock"))
    yield srv
    srv.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


def _run(server: ControlServer, pool: ThreadPoolExecutor, fn: Callable[[], Any]) -> Any:
    future: Future[Any] = pool.submit(fn)
    step(server, future.done)
    return future.result()


# --- parse_request ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"cmd":"status"}\n', Request("status", {})),
        (b'{"cmd": "reload"}', Request("reload", {})),
        (b'{"cmd":"scale","workers":4}', Request("scale", {"workers": 4})),
    ],
)
def test_parse_request_valid(line: bytes, expected: Request) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1,2]", "expected a JSON object, got list"),
        (b'{"workers":2}', 'missing "cmd"'),
        (b'{"cmd":"explode"}', "unknown cmd 'explode' (known: reload, scale, status)"),
        (b'{"cmd":"scale"}', 'scale: "workers" must be an integer >= 1 (got None)'),
        (b'{"cmd":"scale","workers":true}', "(got True)"),
        (b'{"cmd":"scale","workers":0}', "(got 0)"),
        (b'{"cmd":"scale","workers":2,"x":1}', "unexpected arguments ['x']"),
        (b'{"cmd":"status","verbose":1}', "status: takes no arguments"),
        (b"\xff\xfe", "malformed JSON"),
    ],
)
def test_parse_request_invalid(line: bytes, needle: str) -> None:
    result = parse_request(line)
    assert isinstance(result, BadRequest)
    assert needle in result.error


# --- server ----------------------------------------------------------------------------------


def test_bind_creates_private_dir_and_socket(tmp_path: Path, server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    assert server.accept() is None  # non-blocking, nobody waiting


def test_bind_replaces_stale_socket_and_refuses_live_one(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    first = ControlServer.bind(path)
    try:
        with pytest.raises(ControlError, match="address already in use"):
            ControlServer.bind(path)
    finally:
        first.close()
    assert not os.path.exists(path)


def test_status_round_trip(server: ControlServer, pool: ThreadPoolExecutor) -> None:
    client = ControlClient(server.path, timeout=5)
    reply = _run(server, pool, lambda: client.call("status"))
    assert reply == {"ok": True, "status": STATUS}


def test_reload_streams_progress(server: ControlServer, pool: ThreadPoolExecutor) -> None:
    client = ControlClient(server.path, timeout=5)
    lines = _run(server, pool, lambda: list(client.stream("reload")))
    assert lines == [
        {"progress": {"replaced": 1, "of": 2, "generation": 3}},
        {"progress": {"replaced": 2, "of": 2, "generation": 3}},
        {"ok": True, "reload": {"generation": 3, "replaced": 2}},
    ]
    final = _run(server, pool, lambda: client.call("reload"))
    assert final["ok"] is True


def test_scale_and_unknown_command_via_client(
    server: ControlServer, pool: ThreadPoolExecutor
) -> None:
    client = ControlClient(server.path, timeout=5)
    assert _run(server, pool, lambda: client.call("scale", workers=3)) == {
        "ok": True,
        "workers": 3,
    }
    reply = _run(server, pool, lambda: client.call("nope"))
    assert reply["ok"] is False
    assert "unknown cmd 'nope'" in reply["error"]


def _raw_conversation(path: str, lines: list[bytes], replies: int) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        reader = sock.makefile("rb")
        for chunk in lines:
            sock.sendall(chunk)
        return [json.loads(reader.readline()) for _ in range(replies)]


def test_malformed_request_keeps_connection_usable(
    server: ControlServer, pool: ThreadPoolExecutor
) -> None:
    replies = _run(
        server,
        pool,
        lambda: _raw_conversation(
            server.path,
            [b"this is not json\n", b'{"cmd":"sta', b'tus"}\n', b"\n"],  # split across sends
            2,
        ),
    )
    assert replies[0]["ok"] is False
    assert "malformed JSON" in replies[0]["error"]
    assert replies[1] == {"ok": True, "status": STATUS}


def test_overlong_line_is_rejected_then_connection_recovers(
    server: ControlServer, pool: ThreadPoolExecutor
) -> None:
    huge = b"x" * (MAX_LINE * 3) + b"\n"
    replies = _run(
        server,
        pool,
        lambda: _raw_conversation(server.path, [huge, b'{"cmd":"status"}\n'], 2),
    )
    assert replies[0] == {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
    assert replies[1]["ok"] is True


def test_conn_reports_peer_and_close(server: ControlServer) -> None:
    client = socket.socket(socket.AF_UNIX)
    client.connect(server.path)
    conn = None
    deadline = time.monotonic() + 5
    while conn is None:
        assert time.monotonic() < deadline
        conn = server.accept()
    try:
        assert conn.peer is not None
        assert conn.peer.pid == os.getpid()
        assert conn.read_requests() == []  # nothing yet, does not block
        client.close()
        deadline = time.monotonic() + 5
        while (items := conn.read_requests()) == []:
            assert time.monotonic() < deadline
        assert items is None
        assert conn.send(ok_reply()) is False  # EPIPE: the peer is gone
    finally:
        conn.close()
    assert conn.fileno() == -1
    assert conn.send(ok_reply()) is False


def test_close_unlinks_only_our_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    srv = ControlServer.bind(path)
    os.unlink(path)
    Path(path).write_text("not ours")
    srv.close()
    srv.close()
    assert Path(path).read_text() == "not ours"


# --- client errors ---------------------------------------------------------------------------


def test_client_socket_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with pytest.raises(ControlUnavailable) as info:
        ControlClient(path, timeout=1).call("status")
    assert str(info.value) == (
        f"no appliance master is listening on {path} (is the service running?)"
    )


def test_client_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    with pytest.raises(ControlUnavailable, match="no appliance master is listening"):
        ControlClient(path, timeout=1).call("status")


def test_client_master_closes_without_reply(
    server: ControlServer, pool: ThreadPoolExecutor
) -> None:
    def hang_up(conn: ControlConn, _request: Request) -> None:
        conn.close()

    client = ControlClient(server.path, timeout=5)
    future = pool.submit(lambda: client.call("status"))
    step(server, future.done, handler=hang_up)
    with pytest.raises(ControlError, match="closed .* before replying"):
        future.result()


def test_client_timeout(server: ControlServer) -> None:
    client = ControlClient(server.path, timeout=0.2)
    with pytest.raises(ControlError, match="no reply from the master"):
        client.call("status")  # nobody steps the server: it never answers


# --- format_status ---------------------------------------------------------------------------


def test_format_status_table() -> None:
    text = format_status(STATUS, now=1_700_000_160.0)
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "running"]
    assert "generation  2" in text
    assert "2 ready / 2 target" in text
    assert (
        "last ok, generation 2, 2 worker(s) replaced, 2023-11-14 22:15:00 UTC (1m00s ago)" in text
    )
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == [
        "ID",
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "REQUESTS",
        "IN-FLIGHT",
        "RSS",
        "MiB",
    ]
    assert table[1].split() == ["0", "201", "2", "ready", "3.2s", "10", "0", "21.5"]
    assert table[2].split() == ["1", "202", "2", "ready", "2h03m", "12345", "3", "22.2"]
    # columns line up
    assert len({len(row) for row in table}) == 1


def test_format_status_failed_reload_and_missing_keys() -> None:
    status = {
        "phase": "reloading",
        "reload": {
            "state": "in_progress",
            "last": {"ok": False, "error": "worker 1 failed to boot", "finished_unix": None},
        },
        "workers": [{"id": 0}],
    }
    text = format_status(status)
    assert "in progress; last FAILED: worker 1 failed to boot" in text
    assert "- ready / - target" in text
    assert text.splitlines()[-1].split()[:4] == ["0", "-", "-", "-"]


def test_format_status_empty() -> None:
    text = format_status({})
    assert "reload      -" in text
    assert "none since start" in format_status({"reload": {"state": "idle", "last": None}})
    assert text.endswith("no workers")
