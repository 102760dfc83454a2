"""``[http] access_log``, ``limit_concurrency`` and ``accept`` through the real master and our
protocol.

Both follow uvicorn's rules (the protocol keeps its interface): an access line per response in
uvicorn's format under the ``uvicorn.access`` event, and a 503 with ``Connection: close``
once the worker's connections (this one included) or requests in flight reach the limit.
"""

from __future__ import annotations

import json
import socket

import pytest
from harness import APPS, base_config


def _request(sock: socket.socket, target: bytes) -> bytes:
    sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside the body"
        body += chunk
    return head


def _serve(start_master, workdir, **http):
    """A ready master serving echoapp with one worker and these ``[http]`` settings."""
    m = start_master(
        base_config(
            workdir,
            app={"target": "echoapp:app", "directory": str(APPS)},
            workers={"count": 1},
            http=http,
        )
    )
    m.ready()
    return m


def test_access_log_writes_one_uvicorn_style_line_per_response(start_master, workdir):
    m = _serve(start_master, workdir, access_log=True)
    since = m.logs.mark()
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as sock:
        assert _request(sock, b"/a%20b?x=1").startswith(b"HTTP/1.1 200 ")
        port = sock.getsockname()[1]
    line = m.logs.wait_for("uvicorn.access", since=since)
    assert line["message"] == f'127.0.0.1:{port} - "GET /a%20b?x=1 HTTP/1.1" 200'


def test_no_access_log_by_default(start_master, workdir):
    m = _serve(start_master, workdir)
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as sock:
        assert _request(sock, b"/").startswith(b"HTTP/1.1 200 ")
        # A second answer on the same connection: the first one's log line, if any, came
        # before it (the worker logs at the response's start).
        assert _request(sock, b"/").startswith(b"HTTP/1.1 200 ")
    m.signal(15)
    assert m.wait() == 0
    assert m.logs.find("uvicorn.access") == []


def test_limit_concurrency_answers_503_past_the_limit(start_master, workdir):
    m = _serve(start_master, workdir, limit_concurrency=2)
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as first:
        assert _request(first, b"/").startswith(b"HTTP/1.1 200 ")
        # The first connection stays open (idle): with this one, the worker has 2.
        with socket.create_connection(("127.0.0.1", m.port), timeout=10) as second:
            head = _request(second, b"/")
            assert head.startswith(b"HTTP/1.1 503 ")
            assert b"connection: close" in head.lower()
            assert second.recv(1) == b""  # closed after the answer
        m.logs.wait_for("uvicorn.server", where=lambda e: "concurrency" in e.get("message", ""))


def _addresses_seen(m, family: int, host: str) -> tuple[dict, tuple]:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((host, m.port))
        sock.sendall(b"GET /addresses HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return json.loads(data.partition(b"\r\n\r\n")[2]), sock.getsockname()


@pytest.mark.parametrize("accept", ["balanced", "kernel"])
@pytest.mark.parametrize(
    ("bind", "family", "dial"),
    [
        ("127.0.0.1:0", socket.AF_INET, "127.0.0.1"),  # one address: the acceptor knows it
        ("0.0.0.0:0", socket.AF_INET, "127.0.0.1"),  # a wildcard: asked per connection
        ("[::]:0", socket.AF_INET6, "::1"),
    ],
)
def test_scope_addresses_are_the_connection_s_own(
    start_master, workdir, accept, bind, family, dial
):
    """ASGI's ``client`` and ``server`` are the two ends of the connection, whichever way it
    was accepted (the balanced acceptor passes what ``accept`` told it; uvicorn's rule asks
    the transport)."""
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    m = start_master(
        base_config(
            workdir,
            listen=[{"name": "http", "address": bind}],
            app={"target": "echoapp:app", "directory": str(APPS)},
            workers={"count": 1},
            http={"accept": accept},
        )
    )
    m.ready()
    seen, mine = _addresses_seen(m, family, dial)
    assert seen["client"] == [mine[0], mine[1]]
    assert seen["server"] == [dial, m.port]
