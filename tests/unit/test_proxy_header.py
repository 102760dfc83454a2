"""The PROXY protocol: the parser, whom to believe, how often to log, the settings, the reload
rule, and one forked engine whose balanced acceptor must count a connection through the gate.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from appliance.config.load import ConfigError, load_config
from appliance.config.schema import ListenSettings, Settings
from appliance.http import proxy
from appliance.http.proxy import (
    MAX_V1_BYTES,
    MAX_V2_BYTES,
    V2_SIGNATURE,
    InetEndpoint,
    Invalid,
    NeedMore,
    ProxyHeader,
    RejectLog,
    UnixEndpoint,
    is_trusted,
    parse,
    parse_network,
    should_log,
)

# --- builders ---------------------------------------------------------------------------------


def v2(
    command: int = 0x1,
    family: int = 0x1,
    transport: int = 0x1,
    block: bytes = b"",
    *,
    version: int = 2,
    length: int | None = None,
) -> bytes:
    size = len(block) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family << 4 | transport])
        + struct.pack("!H", size)
        + block
    )


def inet(source: str, sport: int, destination: str, dport: int) -> bytes:
    return (
        ipaddress.ip_address(source).packed
        + ipaddress.ip_address(destination).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def unix(source: bytes, destination: bytes) -> bytes:
    return source.ljust(108, b"\x00") + destination.ljust(108, b"\x00")


def invalid(data: bytes) -> str:
    result = parse(data)
    assert isinstance(result, Invalid), result
    return result.reason


# --- version 1 ---------------------------------------------------------------------------------


def test_v1_tcp4_and_what_follows_is_not_consumed() -> None:
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n"
    assert parse(line + b"GET / HTTP/1.1\r\n") == ProxyHeader(
        version=1,
        consumed=len(line),
        source=InetEndpoint("192.0.2.10", 56324),
        destination=InetEndpoint("198.51.100.1", 443),
    )


def test_v1_tcp6_in_canonical_form() -> None:
    header = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::ffff:192.0.2.1 0 65535\r\n")
    assert isinstance(header, ProxyHeader)
    assert header.source == InetEndpoint("2001:db8::7", 0)
    # (how a mapped address is written depends on the Python version)
    assert header.destination == InetEndpoint(str(ipaddress.ip_address("::ffff:192.0.2.1")), 65535)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",  # the rest of the line is ignored
        b"PROXY UNKNOWN whatever the sender wrote\r\n",
    ],
)
def test_v1_unknown_uses_the_real_endpoints(line: bytes) -> None:
    assert parse(line + b"GET") == ProxyHeader(version=1, consumed=len(line))


def test_v1_longest_line_is_107_bytes_with_crlf() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    longest = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()  # the spec's worst case
    assert len(longest) == MAX_V1_BYTES
    assert isinstance(parse(longest), ProxyHeader)
    assert isinstance(parse(longest.replace(b"UNKNOWN", b"TCP6")), ProxyHeader)
    unknown = b"PROXY UNKNOWN " + b"x" * (MAX_V1_BYTES - 16) + b"\r\n"
    assert len(unknown) == MAX_V1_BYTES
    assert isinstance(parse(unknown), ProxyHeader)
    assert invalid(unknown[:-2] + b"x\r\n") == "PROXY v1: no CRLF within 107 bytes"


def test_v1_without_crlf_within_107_bytes_is_refused_at_byte_107() -> None:
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 " + b"4" * 100
    assert parse(line[: MAX_V1_BYTES - 1]) == NeedMore()
    assert invalid(line[:MAX_V1_BYTES]) == "PROXY v1: no CRLF within 107 bytes"
    assert invalid(line) == "PROXY v1: no CRLF within 107 bytes"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 192.0.2.010 198.51.100.1 1 2", "'192.0.2.010' is not an IPv4 address"),
        (b"PROXY TCP4 192.0.2.256 198.51.100.1 1 2", "'192.0.2.256' is not an IPv4 address"),
        (b"PROXY TCP4 192.0.2 198.51.100.1 1 2", "'192.0.2' is not an IPv4 address"),
        (b"PROXY TCP4 ::1 198.51.100.1 1 2", "'::1' is not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.1 ::1 1 2", "'192.0.2.1' is not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2", "'fe80::1%eth0' is not an IPv6 address"),
        (b"PROXY TCP6 ::1 ::g 1 2", "'::g' is not an IPv6 address"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 65536 2", "'65536' is not a port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 1 080", "'080' is not a port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 00 2", "'00' is not a port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 -1 2", "'-1' is not a port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 +1 2", "'+1' is not a port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 1x 2", "'1x' is not a port"),
        (b"PROXY TCP4 192.0.2.1  198.51.100.1 1 2", "separated by single spaces"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2 ", "separated by single spaces"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 1", "separated by single spaces"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2 3", "separated by single spaces"),
        (b"PROXY TCP4 192.0.2.1\t198.51.100.1 1 2", "not printable ASCII"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.1 1 \xff", "not printable ASCII"),
        (b"PROXY UDP4 192.0.2.1 198.51.100.1 1 2", "unknown protocol 'UDP4'"),
        (b"PROXY tcp4 192.0.2.1 198.51.100.1 1 2", "unknown protocol 'tcp4'"),
        (b"PROXY  TCP4 192.0.2.1 198.51.100.1 1 2", "unknown protocol ''"),
        (b"PROXY ", "unknown protocol ''"),
    ],
)
def test_v1_field_checks(line: bytes, reason: str) -> None:
    assert reason in invalid(line + b"\r\n")


def test_v1_line_must_end_in_crlf() -> None:
    assert "LF without CR" in invalid(b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2\n")
    assert "LF without CR" in invalid(b"PROXY UNKNOWN\n")


# --- version 2 ---------------------------------------------------------------------------------


def test_v2_inet() -> None:
    header = v2(block=inet("192.0.2.10", 56324, "198.51.100.1", 443))
    assert parse(header + b"GET / HTTP/1.1") == ProxyHeader(
        version=2,
        consumed=28,
        source=InetEndpoint("192.0.2.10", 56324),
        destination=InetEndpoint("198.51.100.1", 443),
    )


def test_v2_inet6() -> None:
    header = v2(family=0x2, block=inet("2001:db8::10", 1, "2001:db8::1", 65535))
    assert parse(header) == ProxyHeader(
        version=2,
        consumed=52,
        source=InetEndpoint("2001:db8::10", 1),
        destination=InetEndpoint("2001:db8::1", 65535),
    )


def test_v2_unix() -> None:
    header = v2(family=0x3, block=unix(b"/run/client.sock", b"/run/haproxy/front.sock"))
    assert parse(header) == ProxyHeader(
        version=2,
        consumed=16 + 216,
        source=UnixEndpoint("/run/client.sock"),
        destination=UnixEndpoint("/run/haproxy/front.sock"),
    )
    # An unnamed or abstract client socket has no path.
    unnamed = parse(v2(family=0x3, block=unix(b"", b"\x00abstract")))
    assert isinstance(unnamed, ProxyHeader)
    assert unnamed.source == UnixEndpoint("") == unnamed.destination


@pytest.mark.parametrize(
    ("family", "transport", "block"),
    [
        (0x0, 0x0, b""),  # AF_UNSPEC
        (0x0, 0x0, b"ignored, TLVs or not"),
        (0x1, 0x2, inet("192.0.2.1", 1, "192.0.2.2", 2)),  # UDP: we fall back to UNSPEC
        (0x2, 0x2, b""),
        (0x3, 0x2, unix(b"/a", b"/b")),
    ],
)
def test_v2_unspec_and_datagram_headers_use_the_real_endpoints(
    family: int, transport: int, block: bytes
) -> None:
    assert parse(v2(family=family, transport=transport, block=block)) == ProxyHeader(
        version=2, consumed=16 + len(block)
    )


@pytest.mark.parametrize(
    "header",
    [
        v2(command=0x0, family=0x0, transport=0x0),  # HAProxy's health checks
        v2(command=0x0, family=0x1, block=inet("192.0.2.1", 1, "192.0.2.2", 2)),
        v2(command=0x0, family=0xF, transport=0xF, block=b"anything at all"),  # ignored
        v2(command=0x0, block=b"\x03\x00"),  # not even TLVs: LOCAL discards the block
    ],
)
def test_v2_local_uses_the_real_endpoints_and_skips_the_block(header: bytes) -> None:
    assert parse(header + b"GET") == ProxyHeader(version=2, consumed=len(header))


def test_v2_tlvs_are_skipped() -> None:
    tlvs = (
        tlv(0x04, b"")  # NOOP
        + tlv(0x02, b"www.example.com")  # authority
        + tlv(0x05, b"u" * 128)  # unique id
        + tlv(0xE0, b"custom")
    )
    header = v2(block=inet("192.0.2.10", 1, "198.51.100.1", 2) + tlvs)
    result = parse(header + b"rest")
    assert isinstance(result, ProxyHeader)
    assert result.consumed == len(header)
    assert result.source == InetEndpoint("192.0.2.10", 1)
    assert result.tls is False


def test_v2_ssl_tlv_says_whether_the_client_spoke_tls() -> None:
    addresses = inet("192.0.2.10", 1, "198.51.100.1", 443)
    ssl = tlv(0x20, b"\x01" + b"\x00" * 4 + tlv(0x21, b"TLSv1.3"))
    header = parse(v2(block=addresses + ssl))
    assert isinstance(header, ProxyHeader)
    assert header.tls is True
    plain = parse(v2(block=addresses + tlv(0x20, b"\x00" + b"\x00" * 4)))
    assert isinstance(plain, ProxyHeader)
    assert plain.tls is False


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (V2_SIGNATURE[:5] + b"X", "not a PROXY protocol header"),
        (v2(version=1), "PROXY v2: version 1, expected 2"),
        (v2(version=3), "PROXY v2: version 3, expected 2"),
        (v2(command=0x2), "PROXY v2: unknown command 0x2"),
        (v2(command=0xF), "PROXY v2: unknown command 0xf"),
        (v2(family=0x4), "PROXY v2: undefined address family and transport 0x41"),
        (v2(transport=0x3), "PROXY v2: undefined address family and transport 0x13"),
        (v2(family=0x1, transport=0x0), "undefined address family and transport 0x10"),
        (v2(family=0x0, transport=0x1), "undefined address family and transport 0x01"),
        (
            v2(block=b"\x00" * 11),
            "PROXY v2: AF_INET needs 12 bytes of addresses, the header has 11",
        ),
        (v2(family=0x2, block=b"\x00" * 12), "AF_INET6 needs 36 bytes"),
        (v2(family=0x3, block=b"\x00" * 215), "AF_UNIX needs 216 bytes"),
        (v2(length=0xFFFF), f"PROXY v2: a header of 65551 bytes, more than {MAX_V2_BYTES}"),
        (v2(length=MAX_V2_BYTES - 15), "more than 4096"),
        (
            v2(block=inet("192.0.2.1", 1, "192.0.2.2", 2) + b"\x01\x00\x05abc"),
            "PROXY v2: TLV 0x01 of 5 bytes overruns the header",
        ),
        (
            v2(block=inet("192.0.2.1", 1, "192.0.2.2", 2) + b"\x04\x00"),
            "PROXY v2: 2 stray bytes after the last TLV",
        ),
    ],
)
def test_v2_rejects(data: bytes, reason: str) -> None:
    assert reason in invalid(data)


def test_v2_oversized_is_refused_before_its_payload_arrives() -> None:
    assert invalid(v2(length=MAX_V2_BYTES))  # 16 + 4096 > 4096: no need to wait for it
    largest = v2(block=inet("192.0.2.1", 1, "192.0.2.2", 2) + tlv(0x04, b"\x00" * 4065))
    assert len(largest) == MAX_V2_BYTES
    assert isinstance(parse(largest), ProxyHeader)


def test_v2_bad_bytes_are_refused_as_soon_as_they_arrive() -> None:
    assert invalid(V2_SIGNATURE + b"\x11")  # the version, without waiting for the rest
    assert invalid(V2_SIGNATURE + b"\x21\x51")  # the family


# --- detection and truncation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXX", b"proxy ", b"\r\n\r\n\x01", b"\x00"],
)
def test_first_bytes_that_are_neither_version_are_refused(data: bytes) -> None:
    assert invalid(data) == "not a PROXY protocol header"


def test_nothing_yet_needs_more() -> None:
    assert parse(b"") == NeedMore()


_ADDRESSES = st.one_of(
    st.tuples(st.just(0x1), st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.just(0x2), st.ip_addresses(v=6), st.ip_addresses(v=6)),
)
_PORTS = st.integers(0, 65535)


@st.composite
def v2_headers(draw: st.DrawFn) -> bytes:
    family, source, destination = draw(_ADDRESSES)
    if draw(st.booleans()):
        block = unix(b"/run/c.sock", b"/run/s.sock")
        family = 0x3
    else:
        block = inet(str(source), draw(_PORTS), str(destination), draw(_PORTS))
    tlvs = b"".join(
        tlv(kind, value)
        for kind, value in draw(
            st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
        )
    )
    command = draw(st.sampled_from([0x0, 0x1]))
    return v2(command=command, family=family, block=block + tlvs)


@st.composite
def v1_headers(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" x y 1 2"])) + b"\r\n"
    family, source, destination = draw(_ADDRESSES)
    name = "TCP4" if family == 0x1 else "TCP6"
    sport, dport = draw(_PORTS), draw(_PORTS)
    return f"PROXY {name} {source} {destination} {sport} {dport}\r\n".encode()


@given(st.one_of(v1_headers(), v2_headers()), st.binary(max_size=20))
def test_every_truncation_needs_more_and_the_whole_is_consumed_exactly(
    header: bytes, rest: bytes
) -> None:
    for cut in range(len(header)):
        assert parse(header[:cut]) == NeedMore(), cut
    result = parse(header + rest)
    assert isinstance(result, ProxyHeader)
    assert result.consumed == len(header)


@given(st.binary(max_size=300), st.binary(max_size=50))
def test_any_bytes_give_an_answer_and_a_refusal_is_final(data: bytes, more: bytes) -> None:
    result = parse(data)
    assert isinstance(result, NeedMore | Invalid | ProxyHeader)
    if isinstance(result, Invalid):
        assert isinstance(parse(data + more), Invalid)
        assert "\n" not in result.reason
    if isinstance(result, ProxyHeader):
        assert parse(data + more) == result


@given(st.binary(max_size=200))
def test_random_bytes_after_the_signatures_never_crash(tail: bytes) -> None:
    for prefix in (b"PROXY ", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"):
        result = parse(prefix + tail)
        assert isinstance(result, NeedMore | Invalid | ProxyHeader)


# --- trust -----------------------------------------------------------------------------------


def test_trusted_networks() -> None:
    trusted = (parse_network("10.77.0.0/16"), parse_network("fd00::/8"), parse_network("::1"))
    assert is_trusted("10.77.3.4", trusted)
    assert not is_trusted("10.78.0.1", trusted)
    assert is_trusted("fd12::1", trusted)
    assert is_trusted("::1", trusted)
    assert not is_trusted("127.0.0.1", trusted)
    assert is_trusted("::ffff:10.77.0.9", trusted)  # a dual-stack socket's IPv4 peer
    assert not is_trusted("not an address", trusted)
    assert not is_trusted("10.77.3.4", ())
    assert is_trusted(None, ())  # a unix socket's peer: the file's permissions decided


def test_parse_network_names_the_value() -> None:
    assert parse_network("127.0.0.1") == ipaddress.ip_network("127.0.0.1/32")
    assert parse_network("0.0.0.0/0").num_addresses == 1 << 32
    with pytest.raises(
        ValueError, match=r"'10\.77\.0\.1/16' has host bits set; the network is 10\.77\.0\.0/16"
    ):
        parse_network("10.77.0.1/16")
    with pytest.raises(ValueError, match="'localhost' is not an IPv4 or IPv6 address or network"):
        parse_network("localhost")
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not"):
        parse_network("10.0.0.0/33")


# --- how often a source is logged ---------------------------------------------------------------


def test_should_log_first_then_once_per_interval() -> None:
    assert should_log(None, 0.0)
    assert not should_log(100.0, 159.9)
    assert should_log(100.0, 160.0)
    assert should_log(100.0, 101.0, every_s=1.0)


def test_reject_log_counts_what_it_did_not_log() -> None:
    log = RejectLog(capacity=4, every_s=60.0)
    assert log.note("192.0.2.1", 0.0) == 0
    assert log.note("192.0.2.1", 1.0) is None
    assert log.note("192.0.2.1", 59.0) is None
    assert log.note("192.0.2.2", 59.0) == 0  # sources are counted apart
    assert log.note("192.0.2.1", 60.0) == 2  # logged again, with the two it kept quiet
    assert log.note("192.0.2.1", 61.0) is None


def test_reject_log_memory_is_bounded_forgetting_the_least_recent() -> None:
    log = RejectLog(capacity=3)
    for i in range(3):
        assert log.note(f"10.0.0.{i}", 0.0) == 0
    assert log.note("10.0.0.0", 1.0) is None  # now the most recent
    assert log.note("10.0.0.9", 1.0) == 0  # evicts 10.0.0.1
    assert len(log) == 3
    assert log.note("10.0.0.1", 2.0) == 0  # forgotten: logged again
    assert log.note("10.0.0.0", 2.0) is None  # remembered
    for i in range(10_000):
        log.note(f"spray-{i}", 3.0)
    assert len(log) == 3


# --- settings and reload ----------------------------------------------------------------------


def test_listen_settings_defaults_and_validation() -> None:
    entry = ListenSettings(name="http", address="127.0.0.1:8000")
    assert entry.proxy_protocol is False
    assert entry.proxy_trusted == ["127.0.0.1", "::1"]
    fleet = ListenSettings(
        name="pp", address="0.0.0.0:8000", proxy_protocol=True, proxy_trusted=["10.77.0.0/16"]
    )
    assert fleet.trusted_networks() == (ipaddress.ip_network("10.77.0.0/16"),)
    with pytest.raises(ValidationError, match="has host bits set"):
        ListenSettings(name="pp", address="127.0.0.1:1", proxy_trusted=["10.77.0.1/16"])
    with pytest.raises(ValidationError, match="'nope' is not an IPv4 or IPv6"):
        ListenSettings(name="pp", address="127.0.0.1:1", proxy_trusted=["nope"])
    with pytest.raises(ValidationError):
        ListenSettings(name="pp", address="127.0.0.1:1", proxy_protocol="true")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="every connection would be refused"):
        ListenSettings(name="pp", address="127.0.0.1:1", proxy_protocol=True, proxy_trusted=[])
    # On a unix socket trust is the file's permissions: an empty list is fine.
    ListenSettings(name="u", address="unix:/run/a.sock", proxy_protocol=True, proxy_trusted=[])


def test_config_errors_name_the_key_and_the_value(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(
        '[[listen]]\nname = "pp"\naddress = "127.0.0.1:8000"\nproxy_protocol = true\n'
        'proxy_trusted = ["10.77.0.0/16", "10.78.0.1/16"]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, explicit=True)
    (problem,) = (str(p) for p in info.value.problems)
    assert "listen[0].proxy_trusted" in problem
    assert "'10.78.0.1/16' has host bits set; the network is 10.78.0.0/16" in problem


def _settings(**listen: object) -> Settings:
    return Settings.model_validate(
        {"listen": [{"name": "http", "address": "127.0.0.1:8000"}, {"name": "pp", **listen}]}
    )


def test_proxy_settings_roll_while_the_sockets_stay() -> None:
    from appliance.master.plan import plan_reload

    old = _settings(address="127.0.0.1:8001")
    on = _settings(address="127.0.0.1:8001", proxy_protocol=True)
    trusted = _settings(address="127.0.0.1:8001", proxy_protocol=True, proxy_trusted=["::/0"])
    assert plan_reload(old, on).rolling == ("listen[1].proxy_protocol",)
    assert plan_reload(on, trusted).rolling == ("listen[1].proxy_trusted",)
    assert plan_reload(on, old).restart == ()
    # A changed socket is still one restart for the whole array, whatever else changed.
    moved = _settings(address="127.0.0.1:8002", proxy_protocol=True)
    plan = plan_reload(old, moved)
    assert (plan.restart, plan.rolling) == (("listen",), ())


def test_engine_settings_give_each_socket_its_listeners_policy() -> None:
    from appliance.master.events import Generation
    from appliance.serve import engine_settings

    settings = _settings(address="127.0.0.1:8001", proxy_protocol=True)
    generation = Generation(number=1, settings=settings, digest="d", target=1)
    # systemd may pass several sockets for one name.
    engine = engine_settings(generation, listeners=["http", "pp", "pp"])
    assert [p if p is None else p.listener for p in engine.proxy] == [None, "pp", "pp"]
    assert engine.proxy[1] is not None
    assert engine.proxy[1].trusts("::1")
    assert not engine.proxy[1].trusts("192.0.2.1")
    assert (
        engine_settings(
            Generation(number=1, settings=Settings(), digest="d", target=1), listeners=["http"]
        ).proxy
        == ()
    )


# --- the engine: a connection through the gate is counted, and uncounted ------------------------


def _recv_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_balanced_acceptor_counts_gated_connections_until_they_close() -> None:
    from forked_engine import forked_engine  # type: ignore[import-not-found]
    from websockets.sync.client import connect

    from appliance.engines.settings import EngineSettings

    policy = proxy.ProxyPolicy("pp", (parse_network("127.0.0.1"),))
    header = b"PROXY TCP4 192.0.2.7 192.0.2.1 5555 80\r\n"
    with forked_engine(EngineSettings(graceful_timeout_s=5, proxy=(policy,))) as engine:
        port = engine.port
        # Served over HTTP after the header: counted while open.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(header + b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b'"client": ["192.0.2.7", 5555]' in _recv_until(sock, b"}")
            assert engine.count() == 1
        engine.wait_count(0)
        # Refused: counted until the worker closed it.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert _closed(sock)
        engine.wait_count(0)
        # Header, then a WebSocket upgrade: the count follows it through both hand-overs.
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(header)
        with connect(f"ws://127.0.0.1:{port}/ws-client", sock=sock, open_timeout=10) as ws:
            assert '"client": ["192.0.2.7", 5555]' in str(ws.recv(timeout=10))
            assert engine.count() == 1
        engine.wait_count(0)
