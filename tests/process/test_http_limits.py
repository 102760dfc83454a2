"""Request limits, timeouts, trailers and RFC 9112 rejections, over raw sockets.

Each test writes exact bytes and asserts the exact status line, the ``Connection: close``
header and, where the request reached the app, what the app saw (``echoapp`` answers with the
headers it had after reading the whole body).
"""

from __future__ import annotations

import json
import signal
import socket
import threading


import pytest
from harness import APPS, base_config


@pytest.fixture
def server(start_master, workdir):
    def start(**http):
        m = start_master(
            base_config(
                workdir,
                app={"target": "echoapp:app", "directory": str(APPS)},
                workers={"count": 1, "graceful_timeout_s": 60},
                http=http,
            )
        )
        m.ready()
        return m

    return start


def _exchange(port: int, raw: bytes, timeout: float = 30) -> tuple[bytes, dict[str, str], bytes]:
    """Send ``raw``, read until the server closes; return (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return _read_response(sock)


def _read_response(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection ended before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _assert_closed(sock: socket.socket) -> None:
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass


def _refused(port: int, raw: bytes, status: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        line, headers, body = _read_response(sock)
        assert line.startswith(b"HTTP/1.1 " + status + b" "), (line, body)
        assert headers["connection"] == "close"
        _assert_closed(sock)
    return body


# --- limits -----------------------------------------------------------------------------


def test_request_line_at_the_limit_is_served_one_byte_more_is_414(server):
    m = server()
    # "GET " + target + " HTTP/1.1" == 4094 bytes
    target = b"/echo?" + b"a" * (4094 - len(b"GET  HTTP/1.1") - len(b"/echo?"))
    ok = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    line, _, body = _exchange(m.port, ok)
    assert line == b"HTTP/1.1 200 OK", body
    assert json.loads(body)["path"] == "/echo"
    body = _refused(
        m.port, b"GET " + target + b"a HTTP/1.1\r\nHost: x\r\n\r\n", b"414"
    )
    assert body == b"request line longer than 4094 bytes\n"


def test_header_field_limits_431(server):
    m = server()
    field = b"X-Big: " + b"v" * (8190 - len(b"X-Big: "))
    ok = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + field + b"\r\nConnection: close\r\n\r\n"
    line, _, body = _exchange(m.port, ok)
    assert line == b"HTTP/1.1 200 OK"
    assert ["x-big", "v" * (8190 - 7)] in json.loads(body)["headers"]
    assert _refused(
        m.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + field + b"v\r\n\r\n", b"431"
    ) == b"a header field is longer than 8190 bytes\n"
    many = b"".join(b"X-%d: y\r\n" % i for i in range(99))  # + Host = 100 fields
    line, _, _ = _exchange(m.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + many + b"Connection: close\r\n\r\n")
    assert line == b"HTTP/1.1 431 Request Header Fields Too Large"  # 101 with Connection
    line, _, _ = _exchange(m.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert line == b"HTTP/1.1 200 OK"


def test_limits_come_from_the_config(server):
    m = server(max_request_line_bytes=100, max_header_fields=3, max_header_field_bytes=100)
    _refused(m.port, b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414")
    _refused(m.port, b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", b"431")
    _refused(m.port, b"GET / HTTP/1.1\r\nHost: x\r\nA: " + b"1" * 100 + b"\r\n\r\n", b"431")


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_200_mib_header_is_refused_without_growing_the_worker(server):
    m = server()
    (pid,) = m.worker_pids()
    before = _vm_hwm_kib(pid)
    sock = socket.create_connection(("127.0.0.1", m.port), timeout=60)
    sent = [0]

    def flood() -> None:
        block = b"a" * (1 << 20)
        try:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            for _ in range(200):
                sock.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass  # the server closed after its answer and the linger

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    line, headers, body = _read_response(sock)
    assert line == b"HTTP/1.1 431 Request Header Fields Too Large", body
    assert headers["connection"] == "close"
    assert body.startswith(b"request head larger than ")
    writer.join(60)
    sock.close()
    after = _vm_hwm_kib(pid)
    # The peak resident size grew by less than 8 MiB while the peer sent up to 200 MiB.
    assert after - before < 8 * 1024, (before, after, sent[0])
    assert _exchange(m.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == (
        b"HTTP/1.1 200 OK"
    )


# --- timeouts -----------------------------------------------------------------------------


def test_a_head_that_never_completes_gets_408(server):
    m = server(request_head_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        line, headers, body = _read_response(sock)
        assert line == b"HTTP/1.1 408 Request Timeout"
        assert headers["connection"] == "close"
        assert body == b"request head not received within 0.5 s\n"
        _assert_closed(sock)


def test_a_connection_that_sends_nothing_is_closed_at_the_idle_timeout(server):
    m = server(keepalive_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as sock:
        assert sock.recv(100) == b""  # closed, no answer


def test_a_stalled_body_gets_408_and_the_app_sees_a_disconnect(server):
    m = server(request_body_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as sock:
        sock.sendall(b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        line, headers, _ = _read_response(sock)
        assert line == b"HTTP/1.1 408 Request Timeout"
        assert headers["connection"] == "close"
        _assert_closed(sock)
    _, _, body = _exchange(m.port, b"GET /seen HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert json.loads(body)["http_disconnect"] == ["/stalled"]


def test_draining_closes_a_half_received_head_at_once(server):
    """A peer that sent half a head must not hold a stop for the graceful timeout (60 s)."""
    m = server(request_head_timeout_s=3600, keepalive_timeout_s=3600)
    sock = socket.create_connection(("127.0.0.1", m.port), timeout=30)
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    # Make sure the worker has read it: a second connection's request is answered after it.
    assert _exchange(m.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == (
        b"HTTP/1.1 200 OK"
    )
    mark = m.logs.mark()
    m.signal(signal.SIGTERM)
    _assert_closed(sock)
    sock.close()
    assert m.wait(30) == 0
    exited = m.logs.wait_for("worker.exited", since=mark)
    assert exited["exit_code"] == 0 and exited.get("signal") is None


# --- trailers and RFC 9112 ------------------------------------------------------------------


def test_chunked_trailer_fields_never_become_request_headers(server):
    m = server()
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: good\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        b"5\r\nhello\r\n0\r\nHost: evil\r\nX-Trailer: 1\r\n\r\n"
    )
    line, _, body = _exchange(m.port, raw)
    assert line == b"HTTP/1.1 200 OK"
    seen = json.loads(body)
    assert seen["body_bytes"] == 5
    assert seen["headers"] == [
        ["host", "good"],
        ["transfer-encoding", "chunked"],
        ["connection", "close"],
    ]


@pytest.mark.parametrize(
    "opening",
    [b"5\r\nhello\r\n0\r\nX-Flood: ", b"5;ext="],
    ids=["trailer-field", "chunk-extension"],
)
def test_an_endless_trailer_or_chunk_line_is_refused_without_growing_the_worker(server, opening):
    m = server()
    (pid,) = m.worker_pids()
    before = _vm_hwm_kib(pid)
    sock = socket.create_connection(("127.0.0.1", m.port), timeout=60)

    def flood() -> None:
        block = b"a" * (1 << 20)
        try:
            sock.sendall(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + opening
            )
            for _ in range(64):
                sock.sendall(block)
        except OSError:
            pass  # the server closed after its answer and the linger

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    line, headers, body = _read_response(sock)
    writer.join(60)
    sock.close()
    assert line == b"HTTP/1.1 431 Request Header Fields Too Large", body
    assert body.startswith(b"chunk framing or trailer section larger than ")
    assert headers["connection"] == "close"
    assert _vm_hwm_kib(pid) - before < 8 * 1024
    assert _exchange(m.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == (
        b"HTTP/1.1 200 OK"
    )


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400", b"more than one Host header field\n"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400", b"an HTTP/1.1 request needs a Host header field\n"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", b"505", b"HTTP/2.0 is not supported; use HTTP/1.1\n"),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", b"400", b"the target * is only allowed with OPTIONS\n"),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
            b"Transfer-Encoding is not allowed in an HTTP/1.0 request\n",
        ),
        # Smuggling shapes llhttp already refuses; they must stay refused, and closed.
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"400",
            None,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"400", None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", b"400", None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", b"400", None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", b"400", None),
    ],
    ids=["two-hosts", "no-host", "http2", "asterisk", "te-in-1.0", "cl-and-te", "two-cl", "te-list", "te-space", "te-junk"],
)
def test_rfc9112_rejections(server, raw, status, reason):
    m = server()
    body = _refused(m.port, raw, status)
    if reason is not None:
        assert body == reason


def test_options_asterisk_is_allowed(server):
    m = server()
    line, _, body = _exchange(m.port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert line == b"HTTP/1.1 200 OK" and json.loads(body)["method"] == "OPTIONS"


def test_keep_alive_then_pipelined_requests_still_work(server):
    m = server()
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as sock:
        sock.sendall(
            b"GET /echo?1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    got = []
    while data:  # the responses back to back, each framed by its Content-Length
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got.append((head.split(b"\r\n")[0], rest[:length]))
        data = rest[length:]
    assert [line for line, _ in got] == [b"HTTP/1.1 200 OK"] * 3
    assert [json.loads(body)["body_bytes"] for _, body in got] == [0, 3, 0]
