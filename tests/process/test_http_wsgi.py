"""WSGI apps: chunked bodies, disconnects, endless streams, exc_info, files, stuck threads."""

from __future__ import annotations

import json
import socket
import threading
import time

from harness import APPS, base_config, http_get


def _config(workdir, threads=10, **workers):
    return base_config(
        workdir,
        app={"target": "wsgiecho:application", "interface": "wsgi", "directory": str(APPS)},
        workers={"count": 1, **workers},
        wsgi={"threads": threads},
    )


def _response(raw_sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while True:
        chunk = raw_sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_chunked_request_body_is_readable(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
        s.sendall(
            b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert json.loads(body) == {"terminated": True, "content_length": None, "body": "hello world"}


def test_disconnected_endless_streams_are_closed_and_do_not_wedge_the_worker(start_master, workdir):
    m = start_master(_config(workdir, threads=2))
    m.ready()
    for i in range(10):
        s = socket.create_connection(("127.0.0.1", m.port), timeout=30)
        s.sendall(b"GET /stream?%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
        s.close()  # the client goes away in the middle of the stream
    # Two threads, ten abandoned streams: at least eight must have been stopped (and closed)
    # for /seen to get a thread; the last ones are stopped at their next chunk.
    deadline = time.monotonic() + 30
    while True:
        status, seen = http_get(m.port, "/seen", timeout=30)
        assert status == 200
        if len(seen["closed"]) == 10 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling the app's record with a deadline
    assert sorted(seen["closed"], key=int) == [str(i) for i in range(10)]


def test_exc_info_before_the_body_replaces_the_headers_and_logs_no_error(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
        s.sendall(b"GET /error HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error"), head
    assert body == b"error page\n"
    assert http_get(m.port, "/seen")[0] == 200
    errors = [e for e in m.logs.events if e.get("level") in ("error", "critical")]
    assert errors == [] and "handled by the app" not in m.logs.text()


def test_file_wrapper(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
        s.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 200 OK")
    raw = body.split(b"\r\n")
    # chunked: size line, data, ...; join the data parts
    data, i = b"", 0
    while int(raw[i], 16):
        size = int(raw[i], 16)
        chunk = b"\r\n".join(raw[i + 1 :])[:size]
        data += chunk
        rest = b"\r\n".join(raw[i + 1 :])[size + 2 :]
        raw, i = rest.split(b"\r\n"), 0
    assert data == (APPS / "wsgiecho.py").read_bytes()


def test_a_worker_whose_threads_are_all_stuck_is_replaced(start_master, workdir):
    m = start_master(_config(workdir, threads=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0))
    m.ready()
    (pid,) = m.worker_pids()
    threading.Thread(target=_quiet_get, args=(m.port, "/block?60"), daemon=True).start()
    hung = m.logs.wait_for("worker.hung", timeout=30, pid=pid)
    assert hung["silent_s"] >= 1.0
    m.logs.wait_for("worker.exited", pid=pid)
    m.logs.wait_for("worker.ready", count=2)
    assert m.get("/")[0] == 200


def _quiet_get(port: int, path: str) -> None:
    try:
        http_get(port, path, timeout=60)
    except Exception:  # noqa: BLE001 - the worker is replaced under this request on purpose
        pass

