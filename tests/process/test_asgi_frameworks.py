"""Starlette and FastAPI (from the package registry) served by the real master, checked the way
their users' clients see them: http.client, raw sockets, curl and the websockets library.

One master with one worker serves each framework for the whole module (tests/apps/
asgi_frameworks.py). One worker makes the app's rendezvous deterministic: a test holds a
response open on a gate, and its second request (``/release/NAME``) reaches the same
process. Every name a test uses is its own, so the tests do not depend on their order.
Nothing here sleeps: a test waits for a response, a log event the app wrote, or an app-side
note (``/seen/NAME`` answers once the app recorded it), each with a deadline.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self

import pytest
from harness import APPS, Master, base_config, http_get, short_tmpdir, uvicorn_server, write_config

starlette = pytest.importorskip("starlette")
pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.sync.client import connect

#: The file ``/file`` serves: a few hundred KiB, more than one read and one write.
FILE_BYTES = bytes(range(256)) * 1200
#: An upload larger than the protocol's read-pause mark: it arrives while the app reads it.
MIB = bytes(range(256)) * 4096
TIMEOUT_S = 15.0


# --- the servers ----------------------------------------------------------------------------


@contextmanager
def _serving(target: str, workers: int = 1) -> Iterator[Master]:
    directory = short_tmpdir()
    served = directory / "served.bin"
    served.write_bytes(FILE_BYTES)
    config = base_config(
        directory,
        app={
            "target": target,
            "directory": str(APPS),
            "env": {"ASGI_FRAMEWORKS_FILE": str(served)},
        },
        workers={"count": workers},
    )
    master = Master(write_config(directory, config))
    try:
        master.ready()
        yield master
    finally:
        master.kill_group()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def star() -> Iterator[Master]:
    with _serving("asgi_frameworks:starlette_app") as master:
        yield master


@pytest.fixture(scope="module")
def fast() -> Iterator[Master]:
    with _serving("asgi_frameworks:fastapi_app") as master:
        yield master


@pytest.fixture
def name() -> str:
    """A rendezvous name of this test alone (gates and notes live as long as the worker)."""
    return uuid.uuid4().hex[:12]


# --- clients --------------------------------------------------------------------------------


def _request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.msg, resp.read()
    finally:
        conn.close()


def _post_json(port: int, path: str, body: bytes) -> tuple[int, Any]:
    status, _, answer = _request(port, "POST", path, body, {"content-type": "application/json"})
    return status, json.loads(answer)


class _Raw:
    """A raw connection: write exact bytes, read until a marker or the end, within a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.deadline = time.monotonic() + TIMEOUT_S
        self.data = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        self.sock.settimeout(max(0.01, self.deadline - time.monotonic()))
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def until(self, marker: bytes, start: int = 0) -> int:
        """Read until ``marker`` is in the data (at or after ``start``); its end offset."""
        while (at := self.data.find(marker, start)) < 0:
            chunk = self._recv()
            assert chunk, f"connection ended before {marker!r}: {self.data[-400:]!r}"
            self.data += chunk
        return at + len(marker)

    def response(self) -> tuple[bytes, dict[str, str], bytes]:
        """One response with a Content-Length (consumed): status line, fields, body."""
        end = self.until(b"\r\n\r\n")
        status, *lines = self.data[: end - 4].split(b"\r\n")
        fields = {}
        for line in lines:
            key, _, value = line.decode("latin-1").partition(":")
            fields[key.lower()] = value.strip()
        length = int(fields["content-length"])
        while len(self.data) < end + length:
            chunk = self._recv()
            assert chunk, f"connection ended inside the body: {self.data[-400:]!r}"
            self.data += chunk
        body, self.data = self.data[end : end + length], self.data[end + length :]
        return status, fields, body

    def rest(self) -> bytes:
        while chunk := self._recv():
            self.data += chunk
        return self.data


def _get(path: str, *fields: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *fields, "", ""]).encode()


def _head(path: str, *fields: str) -> bytes:
    return b"HEAD" + _get(path, *fields)[3:]


def _fate(raw: _Raw, probe: str) -> str:
    """After a response: does the connection still serve a request (``open``) or is it over?"""
    try:
        raw.send(_get(probe, "Connection: close"))
    except (BrokenPipeError, ConnectionResetError):
        return "closed"
    data = raw.rest()
    if not data:
        return "closed"
    return "open" if data.startswith(b"HTTP/1.1 200 ") else f"answered {data[:40]!r}"


def _digest(data: bytes) -> dict[str, Any]:
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _app_says(master: Master, where: Callable[[str], bool]) -> str:
    """Wait for a line the app logged (logger ``asgi_frameworks``); its message."""
    event = master.logs.wait_for(
        "asgi_frameworks", timeout=TIMEOUT_S, where=lambda e: where(e.get("message", ""))
    )
    return event["message"]


# --- 1. FastAPI -----------------------------------------------------------------------------


def test_fastapi_echoes_a_pydantic_model(fast):
    status, answer = _post_json(fast.port, "/items", b'{"name": "widget", "price": 9.5}')
    assert (status, answer) == (200, {"name": "widget", "price": 9.5, "tags": []})
    item = {"name": "gadget", "price": 3, "tags": ["a", "é"]}
    status, answer = _post_json(fast.port, "/items", json.dumps(item).encode())
    assert (status, answer) == (200, {**item, "price": 3.0})


def test_fastapi_answers_an_invalid_body_with_its_422(fast):
    status, answer = _post_json(fast.port, "/items", b'{"name": "widget", "price": "cheap"}')
    assert status == 422
    [error] = answer["detail"]
    assert error["type"] == "float_parsing" and error["loc"] == ["body", "price"]
    status, answer = _post_json(fast.port, "/items", b'{"name": ')
    assert status == 422
    assert [e["type"] for e in answer["detail"]] == ["json_invalid"]


def test_fastapi_path_parameter_is_percent_decoded(fast):
    status, _, body = _request(fast.port, "GET", "/users/caf%C3%A9%20au%20lait")
    assert status == 200
    assert json.loads(body) == {"name": "café au lait", "raw_path": "/users/caf%C3%A9%20au%20lait"}


def test_fastapi_query_parameters(fast):
    status, _, body = _request(fast.port, "GET", "/search?q=a+b&limit=5&tag=x&tag=y%26z")
    assert status == 200
    assert json.loads(body) == {"q": "a b", "limit": 5, "tag": ["x", "y&z"]}
    assert json.loads(_request(fast.port, "GET", "/search?q=only")[2]) == {
        "q": "only",
        "limit": 10,
        "tag": [],
    }
    status, _, body = _request(fast.port, "GET", "/search?limit=many")
    assert status == 422
    assert sorted(e["type"] for e in json.loads(body)["detail"]) == ["int_parsing", "missing"]


def test_fastapi_dependency_reads_a_header(fast):
    status, _, body = _request(fast.port, "GET", "/me", headers={"X-User": "ada"})
    assert (status, json.loads(body)) == (200, {"user": "ada"})
    status, _, body = _request(fast.port, "GET", "/me")
    assert (status, json.loads(body)) == (401, {"detail": "who are you?"})


def test_fastapi_head_on_a_get_route_is_405_without_a_body(fast):
    # FastAPI's routes answer only the methods they declare (Starlette's own Route adds HEAD
    # to GET: see the FileResponse test). The 405 has a JSON body; HEAD must not carry it:
    # the bytes right behind its head are the next response's.
    with _Raw(fast.port) as raw:
        raw.send(_head("/conn") + _get("/conn", "Connection: close"))
        data = raw.rest()
    head, _, after = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), data
    assert b"\r\nallow: GET" in head
    assert b"\r\ncontent-length: 31" in head  # what the GET's 405 body would be
    assert after.startswith(b"HTTP/1.1 200 "), data


def test_fastapi_keeps_the_connection_alive_across_requests(fast):
    conn = http.client.HTTPConnection("127.0.0.1", fast.port, timeout=TIMEOUT_S)
    try:
        ports = []
        for method, path, body in [
            ("GET", "/conn", None),
            ("POST", "/items", b'{"name": "a", "price": 1}'),
            ("GET", "/search?q=x", None),
            ("POST", "/items", b'{"price": "bad"}'),  # a 422 keeps the connection too
            ("GET", "/me", None),  # and so does a 401
            ("GET", "/conn", None),
        ]:
            conn.request(method, path, body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            assert not resp.will_close, (path, resp.getheaders())
            assert conn.sock is not None
            ports.append(conn.sock.getsockname()[1])
            if path == "/conn":
                ports.append(answer["client_port"])  # the server saw this same connection
        assert len(set(ports)) == 1, ports
    finally:
        conn.close()


# --- 2. and 3. streaming and disconnects (Starlette) -----------------------------------------


def test_stream_sends_its_first_part_before_the_app_makes_the_second(star, name):
    with _Raw(star.port) as raw:
        raw.send(_get(f"/stream/{name}", "Connection: close"))
        raw.until(b"first\n")
        head = raw.data.partition(b"\r\n\r\n")[0].lower()
        assert b"transfer-encoding: chunked" in head
        assert b"x-stamp: starlette" in head  # BaseHTTPMiddleware streams, it does not buffer
        assert b"second" not in raw.data  # the generator waits for the gate we hold
        assert http_get(star.port, f"/release/{name}") == (200, "released")
        data = raw.rest()
    assert data.endswith(b"second\n\r\n0\r\n\r\n"), data


def test_stream_is_cancelled_when_the_client_goes(star, name):
    with _Raw(star.port) as raw:
        raw.send(_get(f"/stream-forever/{name}"))
        raw.until(b"first\n")
    # Starlette listens for http.disconnect beside the stream and cancels the generator.
    message = _app_says(star, lambda m: m.startswith(f"stream {name} ended by "))
    assert message == f"stream {name} ended by CancelledError"


def test_is_disconnected_sees_the_client_go(fast, name):
    # FastAPI's app: behind Starlette's BaseHTTPMiddleware is_disconnected() is always False.
    with _Raw(fast.port) as raw:
        raw.send(_get(f"/hold/{name}"))
        _app_says(fast, lambda m: m == f"hold {name} waiting")
    message = _app_says(fast, lambda m: m.startswith(f"hold {name} ") and "waiting" not in m)
    assert message == f"hold {name} disconnected"


# --- 4. request bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/body", "/stream-body"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_reads_a_1mib_upload(star, route, framing):
    if framing == "chunked":  # http.client frames an iterable body with chunked coding
        body: Any = (MIB[i : i + 65536] for i in range(0, len(MIB), 65536))
    else:
        body = MIB
    status, fields, answer = _request(star.port, "POST", route, body)
    assert status == 200, answer
    seen = json.loads(answer)
    assert {k: seen[k] for k in ("length", "sha256")} == _digest(MIB)
    assert fields["x-stamp"] == "starlette"


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/apt-packages.txt)")
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(TIMEOUT_S), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S + 10,
        check=False,
    )


def test_multipart_form_with_a_file_and_a_field_through_curl(star, tmp_path):
    upload = tmp_path / "upload.bin"
    upload.write_bytes(FILE_BYTES)
    done = _curl(
        *("-F", f"file=@{upload};type=application/x-test", "-F", "note=héllo"),
        f"http://127.0.0.1:{star.port}/form",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "file": {"filename": "upload.bin", "content_type": "application/x-test"}
        | _digest(FILE_BYTES),
        "note": "héllo",
    }


def test_curl_gets_100_continue_before_it_sends_a_large_body(star, tmp_path):
    upload = tmp_path / "big.bin"
    upload.write_bytes(MIB * 2)  # past curl's threshold for Expect: 100-continue (1 MiB)
    done = _curl(
        "-v",
        *("--expect100-timeout", str(TIMEOUT_S)),  # wait for the 100, never go without it
        *("-H", "Content-Type: application/octet-stream"),
        *("--data-binary", f"@{upload}"),
        f"http://127.0.0.1:{star.port}/body",
    )
    assert done.returncode == 0, done.stderr
    assert "> Expect: 100-continue" in done.stderr
    assert "< HTTP/1.1 100 Continue" in done.stderr, done.stderr
    assert json.loads(done.stdout) == _digest(MIB * 2)


# --- 5. BaseHTTPMiddleware and a BackgroundTask -------------------------------------------


def test_background_task_runs_after_the_response_on_a_connection_that_goes_on(star, name):
    conn = http.client.HTTPConnection("127.0.0.1", star.port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", f"/background/{name}")
        resp = conn.getresponse()
        # The whole response is here while its background task still waits for our gate.
        assert (resp.status, resp.read()) == (200, b"scheduled")
        assert resp.getheader("x-stamp") == "starlette"
        for path, answer in [
            (f"/release/{name}", b"released"),
            (f"/seen/{name}", b'{"seen":"ran"}'),
        ]:
            conn.request("GET", path)  # same connection, while the task of the first runs
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, answer)
            assert resp.getheader("x-stamp") == "starlette"
    finally:
        conn.close()


# --- 6. FileResponse ------------------------------------------------------------------------


def test_file_response_get_and_head(star):
    status, fields, body = _request(star.port, "GET", "/file")
    assert status == 200
    assert int(fields["content-length"]) == len(FILE_BYTES) and body == FILE_BYTES
    assert fields["accept-ranges"] == "bytes" and fields["x-stamp"] == "starlette"
    with _Raw(star.port) as raw:
        raw.send(_head("/file") + _get("/state", "Connection: close"))
        data = raw.rest()
    head, _, after = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data[:400]
    assert b"\r\ncontent-length: %d\r\n" % len(FILE_BYTES) in head + b"\r\n"
    assert after.startswith(b"HTTP/1.1 200 "), after[:400]  # no body behind the HEAD's head


def _supports_ranges() -> bool:
    major, minor = (int(part) for part in starlette.__version__.split(".")[:2])
    return (major, minor) >= (0, 39)  # FileResponse answers Range since Starlette 0.39


@pytest.mark.skipif(not _supports_ranges(), reason="this Starlette's FileResponse has no ranges")
def test_file_response_range(star):
    status, fields, body = _request(star.port, "GET", "/file", headers={"Range": "bytes=1000-1999"})
    assert status == 206
    assert fields["content-range"] == f"bytes 1000-1999/{len(FILE_BYTES)}"
    assert body == FILE_BYTES[1000:2000]
    status, fields, _ = _request(star.port, "GET", "/file", headers={"Range": "bytes=999999-"})
    assert status == 416
    assert fields["content-range"] == f"bytes */{len(FILE_BYTES)}"


# --- 7. an exception in a route -----------------------------------------------------------


def _boom(port: int) -> tuple[bytes, dict[str, str], bytes, str]:
    with _Raw(port) as raw:
        raw.send(_get("/boom"))
        status, fields, body = raw.response()
        return status, fields, body, _fate(raw, "/state")


def test_exception_is_a_500_and_ends_the_connection_as_underuvicorn_server(star):
    mark = star.logs.mark()
    status, fields, body, fate = _boom(star.port)
    assert (status, body) == (b"HTTP/1.1 500 Internal Server Error", b"Internal Server Error")
    star.logs.wait_for("app.exception", since=mark, timeout=TIMEOUT_S)
    # Starlette answered, then re-raised: the server closes the connection (uvicorn too).
    with uvicorn_server("asgi_frameworks:starlette_app") as port:
        reference = _boom(port)
    assert fate == reference[3] == "closed"
    unique = {"date", "server"}
    assert (status, {k: v for k, v in fields.items() if k not in unique}, body) == (
        reference[0],
        {k: v for k, v in reference[1].items() if k not in unique},
        reference[2],
    )


# --- 8. lifespan ----------------------------------------------------------------------------


def test_lifespan_runs_once_per_worker_and_its_state_reaches_requests():
    with _serving("asgi_frameworks:starlette_app", workers=2) as master:
        master.logs.wait_for(
            "asgi_frameworks",
            count=2,
            timeout=TIMEOUT_S,
            where=lambda e: e.get("message", "").startswith("lifespan startup"),
        )
        workers = master.worker_pids()
        assert len(workers) == 2
        for _ in range(4):
            status, seen = http_get(master.port, "/state")
            assert status == 200 and seen["pid"] in workers
            assert seen["startup_pid"] == seen["pid"]
            assert seen["startups"] == [seen["pid"]]
        startups = [
            e["pid"]
            for e in master.logs.find("asgi_frameworks")
            if e.get("message", "").startswith("lifespan startup")
        ]
        assert sorted(startups) == workers


# --- 9. WebSockets --------------------------------------------------------------------------


def test_starlette_websocket_echoes_and_sees_the_client_close(star, name):
    with connect(f"ws://127.0.0.1:{star.port}/ws/{name}", open_timeout=10, close_timeout=10) as ws:
        ws.send("héllo")
        assert ws.recv(timeout=TIMEOUT_S) == "héllo"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=TIMEOUT_S) == b"\x00\x01\xff"
    assert http_get(star.port, f"/seen/{name}") == (200, {"seen": 1000})


def test_starlette_websocket_server_closes_with_a_code(star, name):
    with connect(f"ws://127.0.0.1:{star.port}/ws/{name}", open_timeout=10, close_timeout=10) as ws:
        ws.send("close")
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=TIMEOUT_S)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "asked to")


def test_fastapi_websocket_with_a_path_parameter(fast):
    with connect(f"ws://127.0.0.1:{fast.port}/ws/lobby", open_timeout=10, close_timeout=10) as ws:
        assert ws.recv(timeout=TIMEOUT_S) == "joined lobby"
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT_S) == "lobby: hi"
        with pytest.raises(ConnectionClosedOK) as closed:
            ws.recv(timeout=TIMEOUT_S)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
