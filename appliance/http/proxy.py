"""The PROXY protocol (HAProxy's, versions 1 and 2): who the client really was (pure).

A balancer that relays TCP connections (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB,
stunnel, ...) writes one header at the start of each connection before the client's own
bytes. It names the client's address and port and the address it connected to, which the
server would otherwise only know as the balancer's. :func:`parse` reads that header
incrementally from the bytes received so far and answers one of:

* :class:`NeedMore`: a valid beginning, read more;
* :class:`ProxyHeader`: the header, how many bytes it took (the rest is the client's, HTTP
  here) and the addresses, or none when the balancer says to use the connection's own
  (v2 ``LOCAL``, v1 ``UNKNOWN``, v2 ``AF_UNSPEC``);
* :class:`Invalid`: a one-line reason; the connection must be closed.

Rules of the specification (haproxy.org, ``doc/proxy-protocol.txt``) this follows, and the
bounds we add:

* The version is detected from the first bytes: ``PROXY `` (v1) or the 12-byte v2
  signature. Anything else is rejected as soon as it cannot be either, so an HTTP request
  sent to a PROXY listener is refused at its first byte.
* v1 is one line of at most 107 bytes including CRLF: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT``
  with exactly one space between fields, or ``PROXY UNKNOWN`` followed by anything up to the
  CRLF (ignored). Addresses must parse for their family (IPv4 dotted quads without leading
  zeros, IPv6 without a zone), ports are decimal 0-65535 without leading zeros.
* v2 is a 16-byte fixed part (signature, version 2 with command ``LOCAL`` or ``PROXY``,
  family and transport, a 16-bit length) then that many bytes: the addresses of the family,
  then TLVs. Undefined commands and family/transport bytes are rejected, as the
  specification asks; ``AF_UNSPEC`` and the datagram (UDP) forms, which this server does not
  serve, fall back to the connection's own endpoints, as it also asks. TLVs are skipped
  after a structural check (each fits in the block); of their contents only the
  ``PP2_TYPE_SSL`` client bit is read (the client spoke TLS to the balancer). The 16-bit length would allow 65,551 bytes; we refuse more than
  :data:`MAX_V2_BYTES` in all, far above what balancers send (addresses, an authority, a
  unique id, TLS details) and small enough that a header never costs a connection more
  than a few KiB.
The rest of this module decides, just as purely, whom to believe (:func:`is_trusted`: the
peer that sent the header must be in ``proxy_trusted``) and how often a refused source is
logged (:func:`should_log`, :class:`RejectLog`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_V1_BYTES",
    "MAX_V2_BYTES",
    "REJECT_LOG_EVERY_S",
    "REJECT_LOG_SOURCES",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "InetEndpoint",
    "Invalid",
    "NeedMore",
    "Network",
    "ProxyHeader",
    "ProxyPolicy",
    "RejectLog",
    "UnixEndpoint",
    "is_trusted",
    "parse",
    "parse_network",
    "should_log",
]

#: The longest v1 line, CRLF included (the specification's bound).
MAX_V1_BYTES = 107
#: The longest v2 header we accept, fixed part included (see the module docstring).
MAX_V2_BYTES = 4096
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version and command, family and transport, length
_V2_COMMAND_AT = 12
_V2_VERSION = 2
_V2_FAMILY_AT = 13
#: A refused source is logged at most this often...
REJECT_LOG_EVERY_S = 60.0
#: ... remembering this many sources (least recently refused forgotten first).
REJECT_LOG_SOURCES = 1024

_PORT_RE = re.compile(rb"0|[1-9][0-9]{0,4}")
_PRINTABLE_RE = re.compile(rb"[ -~]*")
# v2 family (high nibble of byte 14) -> (name, bytes of its address block)
_FAMILIES = {
    0x0: ("AF_UNSPEC", 0),
    0x1: ("AF_INET", 12),
    0x2: ("AF_INET6", 36),
    0x3: ("AF_UNIX", 216),
}
_AF_UNSPEC, _AF_UNIX = 0x0, 0x3
_UNIX_PATH_BYTES = 108
_DGRAM = 0x2
#: The defined values of byte 14 (family << 4 | transport); every other is invalid.
_FAMILY_BYTES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_PP2_TYPE_SSL = 0x20
_PP2_CLIENT_SSL = 0x01
_TLV_HEAD = 3  # type and a 16-bit length
_MAX_PORT = 65535

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The bytes so far are a valid beginning of a header: read more."""


@dataclass(frozen=True, slots=True)
class Invalid:
    """Not a (valid) PROXY header: close the connection. ``reason`` is one line for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class InetEndpoint:
    """An IPv4 or IPv6 address (canonical text form) and a TCP port."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class UnixEndpoint:
    """A unix socket path as the balancer saw it (empty for an unnamed or abstract one)."""

    path: str


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header.

    ``consumed`` bytes were the header; what follows is the client's. ``source`` and
    ``destination`` are None when the connection's own endpoints apply (v2 ``LOCAL``, for
    the balancer's health checks; v1 ``UNKNOWN``; v2 ``AF_UNSPEC``). ``tls``: the client
    spoke TLS to the balancer (v2 ``PP2_TYPE_SSL`` with the client bit).
    """

    version: int
    consumed: int
    source: InetEndpoint | UnixEndpoint | None = None
    destination: InetEndpoint | UnixEndpoint | None = None
    tls: bool = False


_NEED_MORE = NeedMore()


def parse(data: bytes) -> NeedMore | Invalid | ProxyHeader:
    """Read a PROXY header from the first bytes of a connection (all the bytes so far)."""
    if data[:1] == V1_PREFIX[:1]:
        if not data.startswith(V1_PREFIX):
            return _NEED_MORE if V1_PREFIX.startswith(data) else _not_proxy()
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        if not data.startswith(V2_SIGNATURE):
            return _NEED_MORE if V2_SIGNATURE.startswith(data) else _not_proxy()
        return _parse_v2(data)
    return _not_proxy() if data else _NEED_MORE


def _not_proxy() -> Invalid:
    return Invalid("not a PROXY protocol header")


# --- version 1 ------------------------------------------------------------------------------


def _parse_v1(data: bytes) -> NeedMore | Invalid | ProxyHeader:
    end = data.find(b"\n", 0, MAX_V1_BYTES)
    if end < 0:
        if len(data) >= MAX_V1_BYTES:
            return Invalid(f"PROXY v1: no CRLF within {MAX_V1_BYTES} bytes")
        return _NEED_MORE
    if data[end - 1 : end] != b"\r":
        return Invalid("PROXY v1: the line ends in LF without CR")
    line = data[: end - 1]
    if not _PRINTABLE_RE.fullmatch(line):
        return Invalid("PROXY v1: a byte that is not printable ASCII")
    fields = line.split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(version=1, consumed=end + 1)
    if protocol not in (b"TCP4", b"TCP6"):
        return Invalid(f"PROXY v1: unknown protocol {_excerpt(protocol)}")
    if len(fields) != 6 or b"" in fields:
        return Invalid(
            f"PROXY v1: expected {protocol.decode()} SOURCE DESTINATION SPORT DPORT "
            "separated by single spaces"
        )
    v6 = protocol == b"TCP6"
    hosts = [_v1_address(raw, v6=v6) for raw in fields[2:4]]
    ports = [_v1_port(raw) for raw in fields[4:6]]
    for problem in (*hosts, *ports):
        if isinstance(problem, Invalid):
            return problem
    (source, destination), (sport, dport) = hosts, ports
    assert isinstance(source, str)
    assert isinstance(destination, str)
    assert isinstance(sport, int)
    assert isinstance(dport, int)
    return ProxyHeader(
        version=1,
        consumed=end + 1,
        source=InetEndpoint(source, sport),
        destination=InetEndpoint(destination, dport),
    )


def _v1_address(raw: bytes, *, v6: bool) -> str | Invalid:
    text = raw.decode("ascii")
    family = "IPv6" if v6 else "IPv4"
    if "%" not in text:  # a zone (fe80::1%eth0) means nothing to the receiver
        try:
            return str(ipaddress.IPv6Address(text) if v6 else ipaddress.IPv4Address(text))
        except ValueError:
            pass
    return Invalid(f"PROXY v1: {_excerpt(raw)} is not an {family} address")


def _v1_port(raw: bytes) -> int | Invalid:
    if _PORT_RE.fullmatch(raw) and int(raw) <= _MAX_PORT:
        return int(raw)
    return Invalid(f"PROXY v1: {_excerpt(raw)} is not a port (0-65535, no leading zeros)")


def _excerpt(raw: bytes) -> str:
    return repr(raw[:40].decode("ascii", "replace"))


# --- version 2 ------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> NeedMore | Invalid | ProxyHeader:
    # Check each fixed byte as soon as it arrives, so garbage is refused without waiting.
    if len(data) <= _V2_COMMAND_AT:
        return _NEED_MORE
    version, command = data[_V2_COMMAND_AT] >> 4, data[_V2_COMMAND_AT] & 0xF
    if version != _V2_VERSION:
        return Invalid(f"PROXY v2: version {version}, expected {_V2_VERSION}")
    if command > 1:
        return Invalid(f"PROXY v2: unknown command {command:#x}")
    local = command == 0
    # LOCAL ignores the family byte; any other command needs a defined one.
    if not local and len(data) > _V2_FAMILY_AT and data[_V2_FAMILY_AT] not in _FAMILY_BYTES:
        return Invalid(
            f"PROXY v2: undefined address family and transport {data[_V2_FAMILY_AT]:#04x}"
        )
    if len(data) < _V2_FIXED:
        return _NEED_MORE
    total = _V2_FIXED + int.from_bytes(data[14:16], "big")
    if total > MAX_V2_BYTES:
        return Invalid(f"PROXY v2: a header of {total} bytes, more than {MAX_V2_BYTES}")
    if len(data) < total:
        return _NEED_MORE
    if local:  # the balancer's own connection (a health check): the block is ignored
        return ProxyHeader(version=2, consumed=total)
    family, transport = data[_V2_FAMILY_AT] >> 4, data[_V2_FAMILY_AT] & 0xF
    if family == _AF_UNSPEC or transport == _DGRAM:
        # UNSPEC, or one we do not serve (UDP): the specification's fallback is UNSPEC,
        # which ignores the addresses and uses the connection's own endpoints.
        return ProxyHeader(version=2, consumed=total)
    name, size = _FAMILIES[family]
    if total - _V2_FIXED < size:
        return Invalid(
            f"PROXY v2: {name} needs {size} bytes of addresses, the header has {total - _V2_FIXED}"
        )
    tls = _v2_tls(data, _V2_FIXED + size, total)
    if isinstance(tls, Invalid):
        return tls
    block = data[_V2_FIXED : _V2_FIXED + size]
    source: InetEndpoint | UnixEndpoint
    destination: InetEndpoint | UnixEndpoint
    if family == _AF_UNIX:
        source = _unix_path(block[:_UNIX_PATH_BYTES])
        destination = _unix_path(block[_UNIX_PATH_BYTES:])
    else:
        half = (size - 4) // 2
        hosts = [ipaddress.ip_address(block[i * half : (i + 1) * half]) for i in (0, 1)]
        ports = [int.from_bytes(block[2 * half + i : 2 * half + i + 2], "big") for i in (0, 2)]
        source = InetEndpoint(str(hosts[0]), ports[0])
        destination = InetEndpoint(str(hosts[1]), ports[1])
    return ProxyHeader(version=2, consumed=total, source=source, destination=destination, tls=tls)


def _v2_tls(data: bytes, start: int, end: int) -> bool | Invalid:
    """Walk the TLVs in ``data[start:end]``: each must fit; report the SSL client bit."""
    tls = False
    at = start
    while at < end:
        if end - at < _TLV_HEAD:
            return Invalid(f"PROXY v2: {end - at} stray bytes after the last TLV")
        kind, length = data[at], int.from_bytes(data[at + 1 : at + 3], "big")
        value = at + _TLV_HEAD
        at = value + length
        if at > end:
            return Invalid(f"PROXY v2: TLV {kind:#04x} of {length} bytes overruns the header")
        if kind == _PP2_TYPE_SSL and length >= 1:
            tls = bool(data[value] & _PP2_CLIENT_SSL)
    return tls


def _unix_path(raw: bytes) -> UnixEndpoint:
    return UnixEndpoint(os.fsdecode(raw.split(b"\x00", 1)[0]))


# --- whom to believe --------------------------------------------------------------------------


def parse_network(text: str) -> Network:
    """An address or network of ``proxy_trusted``; ``ValueError`` with a line for the operator."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            msg = f"{text!r} has host bits set; the network is {loose}"
        else:
            msg = f"{text!r} is not an IPv4 or IPv6 address or network (such as 10.0.0.0/8)"
        raise ValueError(msg) from None


def is_trusted(peer: str | None, trusted: Iterable[Network]) -> bool:
    """Whether the peer that sent a header may say who the client is.

    ``peer`` is the connection's remote address, or None on a unix socket, which has none:
    only processes allowed by the socket file's permissions can connect there, so a unix
    listener with ``proxy_protocol`` believes every header. An IPv4-mapped IPv6 peer
    (``::ffff:10.0.0.1``, on a dual-stack socket systemd passed) is matched as IPv4.
    """
    if peer is None:
        return True
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """What a worker needs for one listener with ``proxy_protocol = true``."""

    listener: str
    trusted: tuple[Network, ...]

    def trusts(self, peer: str | None) -> bool:
        return is_trusted(peer, self.trusted)


# --- how often to say so ----------------------------------------------------------------------


def should_log(last_logged: float | None, now: float, every_s: float = REJECT_LOG_EVERY_S) -> bool:
    """Whether a refused connection from a source is logged (pure): the first from a source,
    then at most once per ``every_s``. A flood of bad connections must not become a flood
    of log lines, but an operator must always see that a source is being refused.
    """
    return last_logged is None or now - last_logged >= every_s


class RejectLog:
    """The sources refused lately, bounded: when each was last logged, and how many since.

    Holds at most ``capacity`` sources, forgetting the least recently refused; a forgotten
    source is logged again at its next refusal, so memory stays bounded under a spray of
    addresses at the cost of a few more lines.
    """

    def __init__(
        self, capacity: int = REJECT_LOG_SOURCES, every_s: float = REJECT_LOG_EVERY_S
    ) -> None:
        self._capacity = capacity
        self._every_s = every_s
        self._sources: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def note(self, source: str, now: float) -> int | None:
        """Record a refusal from ``source``: None when it is not to be logged, else the
        number of refusals from it that were not logged since its last line."""
        entry = self._sources.pop(source, None)
        last, suppressed = (None, 0) if entry is None else entry
        if should_log(last, now, self._every_s):
            self._sources[source] = (now, 0)
            if len(self._sources) > self._capacity:
                self._sources.popitem(last=False)
            return suppressed
        self._sources[source] = (last if last is not None else now, suppressed + 1)
        return None
