"""PROXY protocol listeners end to end: raw sockets, the websockets library, Debian's haproxy.

Every master here has two listeners: ``http`` (plain) and ``pp`` (``proxy_protocol = true``).
``echoapp`` answers with the ``client``, ``server`` and ``scheme`` of its scope (and
``echoapp:wsgi_app`` with ``REMOTE_ADDR`` and friends), so each test asserts what the app
saw. Refusals are observed as the connection ending without a byte, and as the worker's
``worker.proxy_rejected`` event.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from harness import APPS, base_config, cli, write_config
from websockets.sync.client import connect

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
GET = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
HAPROXY = "/usr/sbin/haproxy"


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(
    source: tuple[str, int] | None = None,
    destination: tuple[str, int] | None = None,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header: PROXY with the addresses, or LOCAL without them."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


def _config(workdir, *, app="echoapp:app", interface="asgi", pp=None, **sections):
    return base_config(
        workdir,
        app={"target": app, "interface": interface, "directory": str(APPS)},
        listen=[
            {"name": "http", "address": "127.0.0.1:0"},
            {"name": "pp", "address": "127.0.0.1:0", "proxy_protocol": True, **(pp or {})},
        ],
        workers={"count": 1, "graceful_timeout_s": 10},
        **sections,
    )


def _ports(m) -> dict[str, int]:
    return {
        entry["name"]: int(entry["address"].rsplit(":", 1)[1]) for entry in m.started()["listeners"]
    }


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, Any]:
    """One response from ``sock`` (``buffer`` keeps what came behind it): status, body
    (decoded when it is JSON)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection ended before a response head: {bytes(buffer)!r}")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.decode("latin-1").partition(":") for line in lines)
    }
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection ended in a response body"
        rest += chunk
    buffer[:] = rest[length:]
    body = rest[:length]
    return status, json.loads(body) if headers.get("content-type") == "application/json" else body


def _assert_closed_without_answer(sock: socket.socket) -> None:
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return
    assert data == b"", f"the server answered {data!r}"


def _rejected(m, since: int, *, source: str = "127.0.0.1", **match):
    return m.logs.wait_for(
        "worker.proxy_rejected", since=since, source=source, listener="pp", **match
    )


@pytest.mark.parametrize("accept", ["balanced", "kernel"])
def test_v1_and_v2_headers_give_the_app_the_client_on_every_request(start_master, workdir, accept):
    m = start_master(_config(workdir, http={"accept": accept}))
    m.ready()
    ports = _ports(m)
    cases = [
        (v1(("203.0.113.7", 40001), ("198.51.100.1", 443)), "203.0.113.7", 40001),
        (v2(("203.0.113.8", 40002), ("198.51.100.1", 443)), "203.0.113.8", 40002),
        (v1(("2001:db8::7", 40003), ("2001:db8::1", 443)), "2001:db8::7", 40003),
        (v2(("2001:db8::8", 40004), ("2001:db8::1", 443)), "2001:db8::8", 40004),
        # TLVs (here a NOOP and an authority) are skipped
        (
            v2(("203.0.113.9", 40005), ("198.51.100.1", 443), tlvs=b"\x04\x00\x02..\x02\x00\x01x"),
            "203.0.113.9",
            40005,
        ),
    ]
    for header, host, port in cases:
        with _connect(ports["pp"]) as sock:
            # The header and the first request in one write: the bytes behind the header
            # are HTTP; the second request on the same (keep-alive) connection keeps it.
            sock.sendall(header + GET)
            buffer = bytearray()
            status, doc = _read_response(sock, buffer)
            assert status == b"HTTP/1.1 200 OK", doc
            assert doc["client"] == [host, port]
            assert doc["server"][1] == 443
            sock.sendall(GET)
            status, doc = _read_response(sock, buffer)
            assert status == b"HTTP/1.1 200 OK"
            assert doc["client"] == [host, port]
    # LOCAL (a balancer's health check): the connection's own addresses.
    with _connect(ports["pp"]) as sock:
        sock.sendall(v2() + GET)
        status, doc = _read_response(sock, bytearray())
        assert status == b"HTTP/1.1 200 OK"
        assert doc["client"] == list(sock.getsockname())
        assert doc["server"] == ["127.0.0.1", ports["pp"]]
    # v1 UNKNOWN, and a header that arrives in pieces.
    with _connect(ports["pp"]) as sock:
        sock.sendall(b"PROXY UNKN")
        sock.sendall(b"OWN whatever\r\nGET /echo HT")
        sock.sendall(b"TP/1.1\r\nHost: x\r\n\r\n")
        status, doc = _read_response(sock, bytearray())
        assert status == b"HTTP/1.1 200 OK"
        assert doc["client"] == list(sock.getsockname())
    # The listener without proxy_protocol: unaffected, and a PROXY header is not HTTP there.
    with _connect(ports["http"]) as sock:
        sock.sendall(GET)
        status, doc = _read_response(sock, bytearray())
        assert status == b"HTTP/1.1 200 OK"
        assert doc["client"] == list(sock.getsockname())
    with _connect(ports["http"]) as sock:
        sock.sendall(v1(("203.0.113.7", 1), ("198.51.100.1", 2)) + GET)
        status, _ = _read_response(sock, bytearray())
        assert status == b"HTTP/1.1 400 Bad Request"
    assert m.logs.find("worker.proxy_rejected") == []


def test_wsgi_app_gets_remote_addr_from_the_header(start_master, workdir):
    m = start_master(_config(workdir, app="echoapp:wsgi_app", interface="wsgi"))
    m.ready()
    with _connect(_ports(m)["pp"]) as sock:
        sock.sendall(v2(("192.0.2.44", 51000), ("192.0.2.1", 8443)) + GET)
        status, doc = _read_response(sock, bytearray())
    assert status == b"HTTP/1.1 200 OK", doc
    assert doc["REMOTE_ADDR"] == "192.0.2.44"
    assert doc["REMOTE_PORT"] == "51000"
    assert (doc["SERVER_NAME"], doc["SERVER_PORT"]) == ("192.0.2.1", "8443")


def test_websocket_gets_the_client_from_the_header(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    port = _ports(m)["pp"]
    sock = _connect(port)
    sock.sendall(v1(("198.51.100.23", 45678), ("198.51.100.1", 443)))
    with connect(
        f"ws://127.0.0.1:{port}/ws-client", sock=sock, open_timeout=10, close_timeout=10
    ) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["client"] == ["198.51.100.23", 45678]
        assert first["server"] == ["198.51.100.1", 443]
        assert first["scheme"] == "ws"
        ws.send("still here")
        assert ws.recv(timeout=10) == "still here"


def test_missing_and_malformed_headers_are_closed_and_logged_once_per_source(start_master, workdir):
    m = start_master(_config(workdir))
    m.ready()
    port = _ports(m)["pp"]
    since = m.logs.mark()
    # An HTTP request where the header should be: refused at its first byte.
    with _connect(port) as sock:
        sock.sendall(GET)
        _assert_closed_without_answer(sock)
    first = _rejected(m, since)
    assert first["reason"] == "not a PROXY protocol header"
    assert first["suppressed"] == 0
    assert first["worker_id"] == 0
    # More bad connections from the same source: each closed, none logged again.
    for bad in (
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 80\r\n",  # a port with a leading zero
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 80\r\n",  # two spaces
        b"PROXY TCP4 1.2.3.4 5.6.7.8 " + b"1" * 80,  # no CRLF within 107 bytes
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than any header we accept
        V2_SIGNATURE + b"\x31",  # version 3
    ):
        with _connect(port) as sock:
            sock.sendall(bad)
            _assert_closed_without_answer(sock)
    # Another source (untrusted: only 127.0.0.1 and ::1 are, by default) is logged on its
    # own; its line comes after any the worker wrote for the connections above.
    with _connect(port, source="127.0.0.2") as sock:
        sock.sendall(v1(("203.0.113.7", 1), ("198.51.100.1", 2)) + GET)
        _assert_closed_without_answer(sock)
    other = _rejected(m, since, source="127.0.0.2")
    assert other["reason"] == "the peer is not in proxy_trusted"
    assert len(m.logs.find("worker.proxy_rejected", since=since, source="127.0.0.1")) == 1
    # The worker serves on: both listeners still answer.
    with _connect(port) as sock:
        sock.sendall(v1(("203.0.113.7", 1), ("198.51.100.1", 2)) + GET)
        assert _read_response(sock, bytearray())[0] == b"HTTP/1.1 200 OK"
    assert m.get("/echo")[0] == 200


def test_untrusted_peer_is_closed_even_with_a_valid_header(start_master, workdir):
    m = start_master(_config(workdir, pp={"proxy_trusted": ["10.77.0.0/16"]}))
    m.ready()
    since = m.logs.mark()
    with _connect(_ports(m)["pp"]) as sock:
        sock.sendall(v2(("203.0.113.7", 1), ("198.51.100.1", 2)) + GET)
        _assert_closed_without_answer(sock)
    assert _rejected(m, since)["reason"] == "the peer is not in proxy_trusted"
    assert m.get("/echo")[0] == 200  # the plain listener is not affected


def test_a_header_that_does_not_arrive_in_the_head_timeout_is_closed(start_master, workdir):
    m = start_master(_config(workdir, http={"request_head_timeout_s": 0.5}))
    m.ready()
    since = m.logs.mark()
    with _connect(_ports(m)["pp"]) as sock:
        sock.sendall(b"PROXY TCP4 1.2.3.4 ")  # and then nothing
        _assert_closed_without_answer(sock)
    assert _rejected(m, since)["reason"] == "no PROXY header within 0.5 s"


def test_unix_listener_believes_every_peer(start_master, workdir):
    path = workdir / "pp.sock"
    cfg = _config(workdir)
    cfg["listen"][1] = {
        "name": "pp",
        "address": f"unix:{path}",
        "proxy_protocol": True,
        "proxy_trusted": ["10.77.0.0/16"],  # no address matches a unix peer; not asked
    }
    m = start_master(cfg)
    m.ready()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(v2(("192.0.2.61", 50123), ("192.0.2.1", 80)) + GET)
        status, doc = _read_response(sock, bytearray())
    assert status == b"HTTP/1.1 200 OK"
    assert doc["client"] == ["192.0.2.61", 50123]
    since = m.logs.mark()
    with socket.socket(socket.AF_UNIX) as sock:  # the header is still required
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(GET)
        _assert_closed_without_answer(sock)
    assert _rejected(m, since, source="unix")["reason"] == "not a PROXY protocol header"


def test_proxy_trusted_changes_by_rolling_reload(start_master, workdir):
    cfg = _config(workdir, pp={"proxy_trusted": ["10.77.0.0/16"]})
    m = start_master(cfg)
    m.ready()
    port = _ports(m)["pp"]
    since = m.logs.mark()
    with _connect(port) as sock:
        sock.sendall(v1(("203.0.113.7", 1), ("198.51.100.1", 2)) + GET)
        _assert_closed_without_answer(sock)
    _rejected(m, since)
    cfg["listen"][1]["proxy_trusted"] = ["10.77.0.0/16", "127.0.0.0/8"]
    write_config(workdir, cfg)
    out = cli("reload", "--config", str(workdir / "appliance.toml"))
    assert out.returncode == 0, out.stderr
    planned = m.logs.wait_for("reload.planned", since=since)
    assert planned["rolling"] == ["listen[1].proxy_trusted"]
    with _connect(port) as sock:  # only generation 2 accepts now: the reload finished
        sock.sendall(v1(("203.0.113.7", 1), ("198.51.100.1", 2)) + GET)
        status, doc = _read_response(sock, bytearray())
    assert status == b"HTTP/1.1 200 OK"
    assert doc["client"] == ["203.0.113.7", 1]


def _accept_queue(port: int) -> int | None:
    """How many connections wait in the kernel for an accept() on 127.0.0.1:PORT (listening)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return None


def test_a_drain_serves_a_connection_still_waiting_for_its_header(start_master, workdir):
    """A balancer writes the header and its request at once and does not retry a request it
    has sent, so a connection the worker accepted just before it drains must still be
    served (found by tests/system/test_fleet.py: 502s from HAProxy during rolling reloads)."""
    m = start_master(_config(workdir))
    m.ready()
    port = _ports(m)["pp"]
    old = set(m.worker_pids())
    with _connect(port) as sock:
        deadline = time.monotonic() + 20
        while _accept_queue(port) != 0:  # accepted by the worker: it holds the connection
            assert time.monotonic() < deadline, "the worker did not accept the connection"
            time.sleep(0.01)
        out = cli("reload", "--config", str(workdir / "appliance.toml"))
        assert out.returncode == 0, out.stderr  # done: the old worker is draining
        sock.sendall(v2(("203.0.113.7", 40001), ("198.51.100.1", 443)) + GET)
        status, doc = _read_response(sock, bytearray())
    assert status == b"HTTP/1.1 200 OK"
    assert doc["client"] == ["203.0.113.7", 40001]
    assert doc["pid"] in old, "not served by the draining worker"


# --- Debian's haproxy in front ----------------------------------------------------------------


@pytest.fixture
def haproxy(workdir):
    """Start haproxy in front of a port; returns the (already listening) frontend port."""
    if shutil.which(HAPROXY) is None:
        pytest.skip(f"{HAPROXY} is not installed")
    started: list[tuple[subprocess.Popen[bytes], socket.socket]] = []

    def start(backend_port: int, send_proxy: str) -> int:
        # The frontend socket is ours (haproxy binds fd@N): no port race, and connections
        # wait in its backlog until haproxy accepts them, so there is nothing to wait for.
        front = socket.create_server(("127.0.0.1", 0))
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(
            "global\n"
            "    maxconn 100\n"
            "defaults\n"
            "    mode http\n"
            "    timeout connect 10s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n"
            "frontend fe\n"
            f"    bind fd@{front.fileno()}\n"
            "    default_backend be\n"
            "backend be\n"
            f"    server s1 127.0.0.1:{backend_port} {send_proxy}\n"
        )
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(front.fileno(),),
        )
        started.append((proc, front))
        return front.getsockname()[1]

    yield start
    for proc, front in started:
        proc.kill()
        proc.wait(10)
        front.close()


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_through_haproxy_the_app_sees_haproxys_client(start_master, workdir, haproxy, send_proxy):
    m = start_master(_config(workdir))
    m.ready()
    front = haproxy(_ports(m)["pp"], send_proxy)
    # Our client comes from 127.0.0.5; haproxy itself connects from 127.0.0.1 (trusted).
    with _connect(front, source="127.0.0.5") as sock:
        sock.sendall(GET)
        status, doc = _read_response(sock, bytearray())
        assert status == b"HTTP/1.1 200 OK", doc
        assert doc["client"] == ["127.0.0.5", sock.getsockname()[1]]
        assert doc["server"] == ["127.0.0.1", front]
    assert m.logs.find("worker.proxy_rejected") == []
