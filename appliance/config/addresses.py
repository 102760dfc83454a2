"""Socket addresses as the operator writes them: ``HOST:PORT``, ``[IPV6]:PORT``, ``unix:/PATH``.

This lives apart from the section models because two sides need the same parse: the schema
validates ``[[listen]]`` addresses and ``control.path`` with it, and :mod:`appliance.sockets`
binds the typed result. Every check raises ``PydanticCustomError``, so a message reaches the
operator without pydantic's "Value error, " prefix, and ``parse_address`` never fails on a
value the schema already accepted.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from pydantic_core import PydanticCustomError

__all__ = [
    "ADDRESS_FORMS",
    "UNIX_PATH_MAX",
    "TcpAddress",
    "UnixAddress",
    "check_socket_path",
    "parse_address",
]

UNIX_PATH_MAX = 107
"""Bytes a unix socket path may have: ``sizeof(sockaddr_un.sun_path)`` on Linux minus the NUL."""

ADDRESS_FORMS = "HOST:PORT, [IPV6]:PORT or unix:/ABSOLUTE/PATH"

_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_HOSTNAME_MAX = 253  # characters of a DNS name in text form (RFC 1035, without the root dot)


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A parsed ``HOST:PORT``. ``family`` is ``AF_UNSPEC`` for a hostname (resolve at bind)."""

    host: str
    port: int
    family: socket.AddressFamily


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A parsed ``unix:/absolute/path``."""

    path: str


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def check_socket_path(path: str, what: str) -> str:
    """Return ``path`` if the kernel can bind a unix socket there; ``what`` names it in errors."""
    if not path.startswith("/"):
        raise _fail("absolute_path", f"{what} must be an absolute path")
    if "\0" in path:
        raise _fail("socket_path", f"{what} must not contain a NUL byte")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise _fail(
            "socket_path",
            f"{what} is longer than the {UNIX_PATH_MAX} bytes a unix socket address can hold",
        )
    return path


def _host_family(host: str) -> socket.AddressFamily:
    """The family a literal address implies, ``AF_UNSPEC`` for a hostname."""
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _fail("listen_address", f"{host!r} is not a valid IPv4 address") from None
        return socket.AF_INET
    if len(host) > _HOSTNAME_MAX or not all(_HOST_LABEL_RE.match(label) for label in labels):
        raise _fail(
            "listen_address",
            f"expected {ADDRESS_FORMS}; {host!r} is neither an IPv4 address nor a hostname",
        )
    return socket.AF_UNSPEC


def parse_address(text: str) -> TcpAddress | UnixAddress:
    """Parse one of :data:`ADDRESS_FORMS`, or raise ``PydanticCustomError`` saying why not."""
    if text.startswith("unix:"):
        return UnixAddress(check_socket_path(text.removeprefix("unix:"), "a unix socket path"))
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise _fail("listen_address", f"expected {ADDRESS_FORMS}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail("listen_address", f"{host!r} is not a valid IPv6 address") from None
        family = socket.AF_INET6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise _fail("listen_address", f"expected {ADDRESS_FORMS}")
        if ":" in host:
            raise _fail("listen_address", "an IPv6 address needs brackets, as in [::1]:8000")
        family = _host_family(host)
    # The length test first: int() of a few thousand digits is slow, then refused by Python.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise _fail("listen_address", "the port must be a number from 0 to 65535")
    if int(port_text) > 65535:
        raise _fail("listen_address", "the port must be a number from 0 to 65535")
    return TcpAddress(host=host, port=int(port_text), family=family)
