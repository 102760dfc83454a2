"""The control socket over a real unix socket, with the server stepped by the test itself.

``step()`` plays the master: one selector, non-blocking calls, and the ownership contract of
``ControlConn`` (check ``broken`` after every call; unregister first, close second).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from control_status_doc import STATUS  # type: ignore[import-not-found]

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
    ok_reply,
    reload_ok_reply,
    reload_progress,
    scale_reply,
    status_reply,
)
from appliance.control.protocol import MAX_REPLY_LINE

Handler = Callable[[ControlConn, Request], None]


def default_handler(conn: ControlConn, request: Request) -> None:
    if request.cmd == "status":
        conn.send(status_reply(STATUS))
    elif request.cmd == "reload":
        for n in (1, 2):
            conn.send(reload_progress(3, n, 2, f"{n}/2 workers replaced"))
        conn.send(reload_ok_reply(3, "2 worker(s) replaced"))
    elif request.cmd == "scale":
        conn.send(scale_reply(request.args["workers"]))


def step(
    server: ControlServer, until: Callable[[], bool], handler: Handler = default_handler
) -> None:
    """Run the server side the way the master's loop does: one selector, non-blocking calls."""
    deadline = time.monotonic() + 10
    conns: dict[int, ControlConn] = {}

    def drop(conn: ControlConn) -> None:
        sel.unregister(conn.fileno())  # first: the fd is still open, so still ours
        del conns[conn.fileno()]
        conn.close()

    with selectors.DefaultSelector() as sel:
        sel.register(server.fileno(), selectors.EVENT_READ, None)
        while not until():
            remaining = deadline - time.monotonic()
            assert remaining > 0, "control conversation did not finish in time"
            for key, events in sel.select(min(remaining, 0.05)):
                if key.data is None:
                    new = server.accept()
                    if new is not None:
                        assert new.fileno() not in conns, "fd reused while still registered"
                        conns[new.fileno()] = new
                        sel.register(new.fileno(), selectors.EVENT_READ, new)
                    continue
                conn = conns.get(key.fd)
                if conn is None or conn is not key.data:
                    continue  # dropped earlier in this batch
                if events & selectors.EVENT_WRITE:
                    conn.flush()
                if events & selectors.EVENT_READ and not conn.broken:
                    for item in conn.read_requests() or []:
                        if isinstance(item, BadRequest):
                            conn.send(error_reply(item.error))
                        else:
                            handler(conn, item)
            for conn in list(conns.values()):  # the contract allows one sweep per iteration
                if conn.broken:
                    drop(conn)
                    continue
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
                sel.modify(conn.fileno(), wanted, conn)
        for conn in list(conns.values()):
            drop(conn)


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
        with pytest.raises(ControlError) as info:
            ControlServer.bind(path)
        assert str(info.value) == f"control socket {path}: another master is listening there"
    finally:
        first.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("case", ["not-a-socket", "parent-is-a-file", "too-long", "nul"])
def test_bind_failures_are_one_line_control_errors(tmp_path: Path, case: str) -> None:
    """``appliance serve`` prints these as they are: never an OSError or a traceback."""
    (tmp_path / "file").write_text("x")
    path, reason = {
        "not-a-socket": (
            str(tmp_path / "file"),
            "exists and is not a socket; refusing to replace it",
        ),
        "parent-is-a-file": (
            str(tmp_path / "file" / "control.sock"),
            f"{tmp_path / 'file'} is not a directory",
        ),
        "too-long": (str(tmp_path / ("x" * 120)), "AF_UNIX path too long"),
        "nul": (str(tmp_path / "a\0b"), "embedded null byte"),
    }[case]
    with pytest.raises(ControlError) as info:
        ControlServer.bind(path)
    assert str(info.value) == f"control socket {path}: {reason}"
    assert not isinstance(info.value, OSError)


def test_status_round_trip(server: ControlServer, pool: ThreadPoolExecutor) -> None:
    client = ControlClient(server.path, timeout=5)
    reply = _run(server, pool, lambda: client.call("status"))
    assert reply == {"ok": True, "status": STATUS}


def test_reload_streams_progress(server: ControlServer, pool: ThreadPoolExecutor) -> None:
    client = ControlClient(server.path, timeout=5)
    lines = _run(server, pool, lambda: list(client.stream("reload")))
    assert lines == [
        {
            "progress": {
                "generation": 3,
                "replaced": 1,
                "total": 2,
                "message": "1/2 workers replaced",
            }
        },
        {
            "progress": {
                "generation": 3,
                "replaced": 2,
                "total": 2,
                "message": "2/2 workers replaced",
            }
        },
        {"ok": True, "reload": {"generation": 3, "message": "2 worker(s) replaced"}},
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


def _accepted(server: ControlServer) -> tuple[socket.socket, ControlConn]:
    """A connected client socket and the server's ControlConn for it."""
    client = socket.socket(socket.AF_UNIX)
    client.connect(server.path)
    deadline = time.monotonic() + 5
    while (conn := server.accept()) is None:
        assert time.monotonic() < deadline
    return client, conn


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_conn_reports_peer_and_close(server: ControlServer) -> None:
    client, conn = _accepted(server)
    try:
        assert conn.peer is not None
        assert conn.peer.pid == os.getpid()
        assert conn.read_requests() == []  # nothing yet, does not block
        assert not conn.broken
        client.close()
        deadline = time.monotonic() + 5
        while (items := conn.read_requests()) == []:
            assert time.monotonic() < deadline
        assert items is None
        assert conn.broken
        assert conn.send(ok_reply()) is False  # the peer is gone
    finally:
        conn.close()
    assert conn.fileno() == -1
    assert conn.broken
    assert conn.send(ok_reply()) is False
    assert conn.flush() is False
    assert conn.read_requests() is None
    conn.close()  # twice is harmless


# --- the ownership contract: a ControlConn never closes its socket itself -------------------


def test_send_over_the_limit_marks_broken_and_keeps_the_fd(server: ControlServer) -> None:
    client, conn = _accepted(server)
    try:
        fd = conn.fileno()
        chunk = error_reply("x" * 60_000)  # the peer never reads: the socket buffer fills
        sent = 0
        while conn.send(chunk):
            sent += 1
            assert sent < 1000, "the out-buffer limit never hit"
        assert conn.broken
        assert not conn.wants_write
        assert conn.fileno() == fd  # not closed behind the owner's back ...
        assert _fd_is_open(fd)
        client.setblocking(False)
        received = b""
        with pytest.raises(BlockingIOError):  # ... the peer sees no EOF, only what was sent
            while chunk_in := client.recv(1 << 20):
                received += chunk_in
        assert len(received) < MAX_REPLY_LINE + 100_000
        assert conn.send(ok_reply()) is False
        assert conn.flush() is False
    finally:
        conn.close()
        client.close()
    assert conn.fileno() == -1


def test_flush_to_a_vanished_peer_marks_broken_and_keeps_the_fd(server: ControlServer) -> None:
    client, conn = _accepted(server)
    try:
        fd = conn.fileno()
        client.close()
        assert conn.flush() is True  # nothing queued: nothing to find out yet
        assert conn.send(ok_reply()) is False  # EPIPE
        assert conn.broken
        assert conn.fileno() == fd
        assert _fd_is_open(fd)
        assert conn.read_requests() is None
    finally:
        conn.close()


def test_read_error_marks_broken_and_keeps_the_fd(server: ControlServer) -> None:
    client, conn = _accepted(server)
    try:
        fd = conn.fileno()
        client.sendall(b'{"cmd":"status"}\n')
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # with unread data on our side: our reads see ECONNRESET or EOF
        deadline = time.monotonic() + 5
        while not conn.broken:
            assert time.monotonic() < deadline
            conn.read_requests()
        assert conn.fileno() == fd
        assert _fd_is_open(fd)
    finally:
        conn.close()


def test_a_reply_with_a_huge_error_fits_and_keeps_the_connection(
    server: ControlServer, pool: ThreadPoolExecutor
) -> None:
    def huge_error(conn: ControlConn, request: Request) -> None:
        if request.cmd == "reload":
            conn.send(error_reply("config problem; " * 150_000))  # 2.4 MB of text
        else:
            default_handler(conn, request)

    future = pool.submit(
        _raw_conversation, server.path, [b'{"cmd":"reload"}\n{"cmd":"status"}\n'], 2
    )
    step(server, future.done, handler=huge_error)
    failed, status = future.result()
    assert failed["ok"] is False
    assert failed["error"].startswith("config problem; config problem; ")
    assert failed["error"].endswith("more bytes)")
    assert len(failed["error"]) <= 64 * 1024
    assert status == {"ok": True, "status": STATUS}


def test_a_client_that_never_reads_is_dropped_by_the_owner(
    server: ControlServer, pool: ThreadPoolExecutor
) -> None:
    def flood() -> int:
        """Send requests without reading; then drain what came until the master hangs up."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(server.path)
            with contextlib.suppress(OSError):  # EPIPE once the owner dropped us
                sock.sendall(b'{"cmd":"status"}\n' * 20_000)  # ~15 MB of replies asked for
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(1 << 16):
                    received += len(chunk)
            return received

    received = _run(server, pool, flood)
    assert 0 < received <= MAX_REPLY_LINE + (4 << 20)  # the limit plus the kernel's buffers


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
        with socket.socket(fileno=os.dup(conn.fileno())) as dup:
            dup.shutdown(socket.SHUT_RDWR)  # the client sees EOF; the owner closes later

    client = ControlClient(server.path, timeout=5)
    future = pool.submit(lambda: client.call("status"))
    step(server, future.done, handler=hang_up)
    with pytest.raises(ControlError, match="closed .* before replying"):
        future.result()


def test_client_timeout(server: ControlServer) -> None:
    client = ControlClient(server.path, timeout=0.2)
    with pytest.raises(ControlError, match="no reply from the master"):
        client.call("status")  # nobody steps the server: it never answers


# --- the client against a confused master ----------------------------------------------------


@contextlib.contextmanager
def raw_master(
    path: str, *replies: bytes, interval: float = 0.0, hang_up: bool = False
) -> Iterator[None]:
    """A fake master in a thread: accept one client, read its request, send *replies* (raw
    bytes, *interval* apart), then hang up or hold the connection until the test is done."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.makefile("rb").readline()
            try:
                for reply in replies:
                    conn.sendall(reply)
                    if done.wait(interval):
                        return
            except OSError:
                return  # the client gave up
            if not hang_up:
                done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)
        listener.close()


_CONFUSED = {
    "not-utf8": (b"\xff\xfe garbage\n", "unreadable reply from the master on {path}: not UTF-8: "),
    "not-json": (b"{not json\n", "unreadable reply from the master on {path}: not JSON: b'{not"),
    "not-object": (b"[1, 2]\n", "expected a JSON object, got list: b'[1, 2]'"),
    "nested": (b"[" * 100_000 + b"\n", "not JSON: b'[[[["),  # deeper than the decoder's stack
    "cut": (b'{"ok": tr', "the master closed {path} in the middle of a reply"),
    "closed": (b"", "the master closed {path} before replying"),
    "5MiB": (
        b"x" * (5 << 20),
        "reply too long: the master on {path} sent a line of more than 4 MiB",
    ),
    "5MiB-line": (b"x" * (5 << 20) + b"\n", "reply too long"),
}


@pytest.mark.parametrize("case", sorted(_CONFUSED))
def test_client_turns_confused_replies_into_one_line_errors(tmp_path: Path, case: str) -> None:
    reply, needle = _CONFUSED[case]
    path = str(tmp_path / "control.sock")
    hang_up = case in {"cut", "closed"}
    with raw_master(path, reply, hang_up=hang_up), pytest.raises(ControlError) as info:
        ControlClient(path, timeout=5).call("status")
    message = str(info.value)
    assert needle.replace("{path}", path) in message
    assert "\n" not in message
    assert len(message) < 400  # the garbage is quoted in a short excerpt at most


def test_client_timeout_bounds_the_whole_conversation(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    progress = b'{"progress": {"message": "still going"}}\n'
    started = time.monotonic()
    with raw_master(path, *[progress] * 100, interval=0.05):
        client = ControlClient(path, timeout=0.5)
        seen: list[dict[str, Any]] = []
        with pytest.raises(ControlError) as info:
            seen.extend(client.stream("reload"))
    assert 0.4 < time.monotonic() - started < 3
    assert seen, "progress lines arrived before the deadline"
    assert str(info.value) == f"no final reply from the master on {path} within 0.5s"
