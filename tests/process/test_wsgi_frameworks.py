"""Flask and Django (from the package registry) served as WSGI apps, checked as their users
would: hello, paths and headers as the framework sees them, uploads, streamed responses."""

from __future__ import annotations

import json
import socket

import pytest
from harness import APPS, base_config, http_get

pytest.importorskip("flask")
pytest.importorskip("django")


def _start(start_master, workdir, target):
    m = start_master(
        base_config(
            workdir,
            app={"target": target, "interface": "wsgi", "directory": str(APPS)},
            workers={"count": 1},
        )
    )
    m.ready()
    return m


def _raw(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_flask_hello_has_a_content_length_and_keeps_alive(start_master, workdir):
    m = _start(start_master, workdir, "wsgi_frameworks:flask_app")
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
        for _ in range(3):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"hello from flask"):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            assert b"content-length: 16\r\n" in data.lower()


def test_flask_sees_the_path_decoded_and_headers_with_underscores_dropped(start_master, workdir):
    m = _start(start_master, workdir, "wsgi_frameworks:flask_app")
    head, body = _raw(
        m.port,
        b"GET /path/caf%C3%A9/x%20y?q=1 HTTP/1.1\r\nHost: x\r\nX-Real-Thing: yes\r\n"
        b"X_Forwarded_For: 6.6.6.6\r\nConnection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200 "), head
    seen = json.loads(body)
    assert seen["path"] == "/path/café/x y"
    assert seen["rest"] == "café/x y"
    assert seen["remote"] == "127.0.0.1"
    assert seen["headers"]["HTTP_X_REAL_THING"] == "yes"
    assert "HTTP_X_FORWARDED_FOR" not in seen["headers"]


@pytest.mark.parametrize("chunked", [False, True])
def test_flask_reads_a_large_upload(start_master, workdir, chunked):
    m = _start(start_master, workdir, "wsgi_frameworks:flask_app")
    payload = bytes(range(256)) * 4096  # 1 MiB: arrives while the app reads it
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
        body = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(payload[i : i + 65536]), payload[i : i + 65536])
                for i in range(0, len(payload), 65536)
            )
            + b"0\r\n\r\n"
        )
    else:
        framing = b"Content-Length: %d\r\n" % len(payload)
        body = payload
    head, answer = _raw(
        m.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + framing + b"\r\n" + body,
    )
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(answer) == {"length": len(payload)}


def test_flask_stream_sends_its_first_part_before_the_app_makes_the_second(start_master, workdir):
    m = _start(start_master, workdir, "wsgi_frameworks:flask_app")
    gate = workdir / "gate"
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
        s.sendall(
            b"GET /stream?gate=%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            % str(gate).encode()
        )
        data = b""
        while b"first\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        assert b"second" not in data  # the app is still waiting for the gate
        gate.touch()
        while chunk := s.recv(65536):
            data += chunk
    assert b"transfer-encoding: chunked" in data.lower()
    assert b"second\n" in data


def test_django_hello_and_query(start_master, workdir):
    m = _start(start_master, workdir, "wsgi_frameworks:django_app")
    assert http_get(m.port, "/hello") == (200, "hello from django")
    status, body = http_get(m.port, "/echo?x=%C3%A9t%C3%A9")
    assert status == 200 and body == {"x": "été", "path": "/echo"}
