"""What the engine answers to a request head, and what a drain does to a connection (pure).

The limits follow gunicorn's defaults (request line 4094 bytes, 100 header fields, 8190 bytes
per field), with the status codes RFC 9110 has for them: 414 for a request line too long, 431
for too many or too large header fields. The memory a rejected head may take is bounded by
:attr:`HeadLimits.head_budget`: the largest head the limits allow, counted as bytes arrive, so
a peer that streams a 200 MiB header field is answered after the budget, not after 200 MiB.
The same budget bounds the bytes of a chunked body that carry no data (chunk-size lines,
extensions, trailer fields), which llhttp also gathers before it reports them.

RFC 9112 rules httptools (llhttp) does not enforce itself:

* a version other than 1.0 and 1.1 (llhttp accepts ``HTTP/2.0``) is answered 505 (§2.3,
  RFC 9110 §15.6.6);
* an HTTP/1.1 request without exactly one Host field is answered 400 (§3.2);
* the asterisk-form target ``*`` is only for OPTIONS (§3.2.4);
* Transfer-Encoding in an HTTP/1.0 request is answered 400 (§6.1: the framing is faulty).

Every rejection closes the connection (``Connection: close``): after a head we did not accept,
we cannot know where the next request would start.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_SERVICE_RESTART",
    "Drain",
    "HeadLimits",
    "Reject",
    "check_field",
    "check_framing_bytes",
    "check_head",
    "check_head_bytes",
    "check_request_line",
    "drain_action",
    "websocket_close_code",
]

#: RFC 6455 §7.4.1: the server is going down (stop).
CLOSE_GOING_AWAY = 1001
#: IANA WebSocket close code registry: the service restarts (this worker is replaced).
CLOSE_SERVICE_RESTART = 1012

_VERSIONS = frozenset({"1.0", "1.1"})
#: Longer than every method llhttp knows (the longest, e.g. ``UNSUBSCRIBE``, has 11 bytes).
MAX_METHOD_BYTES = 24


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer ``status`` with ``reason`` as a one-line text body, then close."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """The most a request head may hold (``[http]`` settings of the same names)."""

    max_request_line_bytes: int = 4094
    max_header_fields: int = 100
    max_header_field_bytes: int = 8190

    @property
    def target_always_fits(self) -> int:
        """A request target at most this long fits the request line with any method llhttp
        accepts (the engine checks longer ones exactly, see :func:`check_request_line`)."""
        return self.max_request_line_bytes - len(" HTTP/1.1") - 1 - MAX_METHOD_BYTES

    @property
    def head_budget(self) -> int:
        """Bytes of the largest head the limits allow: request line, fields, CRLFs."""
        return (
            self.max_request_line_bytes
            + 2
            + self.max_header_fields * (self.max_header_field_bytes + 2)
            + 2
        )


def check_request_line(method: bytes, target_length: int, limits: HeadLimits) -> Reject | None:
    """414 once ``METHOD SP TARGET SP HTTP/1.1`` (without CRLF) exceeds the limit.

    Called as the target arrives (it may come in pieces), so a long target is refused before
    it is complete.
    """
    length = len(method) + 1 + target_length + len(" HTTP/1.1")
    if length > limits.max_request_line_bytes:
        return Reject(414, f"request line longer than {limits.max_request_line_bytes} bytes")
    return None


def check_field(count: int, name: bytes, value: bytes, limits: HeadLimits) -> Reject | None:
    """431 for the ``count``-th field (1-based) if there are too many or it is too large.

    A field's size is ``NAME: VALUE``: name, colon, one space and value (llhttp has already
    removed the optional whitespace around the value).
    """
    if count > limits.max_header_fields:
        return Reject(431, f"more than {limits.max_header_fields} header fields")
    if len(name) + 2 + len(value) > limits.max_header_field_bytes:
        return Reject(431, f"a header field is longer than {limits.max_header_field_bytes} bytes")
    return None


def check_head_bytes(received: int, limits: HeadLimits) -> Reject | None:
    """431 once the bytes received for one head exceed what the limits allow in total."""
    if received > limits.head_budget:
        return Reject(431, f"request head larger than {limits.head_budget} bytes")
    return None


def check_framing_bytes(run: int, limits: HeadLimits) -> Reject | None:
    """431 once ``run`` bytes of a body arrived that carried no body data.

    In a chunked body such bytes are chunk-size lines, chunk extensions and the trailer
    section, all of which llhttp gathers before it reports them: one endless trailer field or
    chunk extension would otherwise grow without bound. The same budget as a head's applies.
    """
    if run > limits.head_budget:
        return Reject(
            431, f"chunk framing or trailer section larger than {limits.head_budget} bytes"
        )
    return None


def check_head(
    version: str, method: bytes, target: bytes, hosts: int, transfer_encoding: bool
) -> Reject | None:
    """The RFC 9112 rules on a complete head: ``hosts`` Host fields, and whether it has a
    Transfer-Encoding field (the engine counts both as the fields arrive)."""
    if version not in _VERSIONS:
        return Reject(505, f"HTTP/{version} is not supported; use HTTP/1.1")
    if hosts > 1:
        return Reject(400, "more than one Host header field")
    if hosts == 0 and version == "1.1":
        return Reject(400, "an HTTP/1.1 request needs a Host header field")
    if target == b"*" and method != b"OPTIONS":
        return Reject(400, "the target * is only allowed with OPTIONS")
    if transfer_encoding and version == "1.0":
        return Reject(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
    return None


class Drain(enum.Enum):
    """What draining does to one HTTP connection."""

    #: A request is being served (or queued behind one): finish it, answer with
    #: ``Connection: close``, then close.
    FINISH = "finish"
    #: Part of a request head arrived and the rest has not: close at once. Nothing was
    #: accepted, and waiting would let a slow (or silent) peer hold the drain.
    CLOSE = "close"
    #: Idle between requests: keep the connection until its next request (answered with
    #: ``Connection: close``) or its idle timeout. Closing it now races a client that is
    #: sending a request at this moment; that client would see its request fail.
    WAIT = "wait"


def drain_action(*, head_in_progress: bool, request_in_progress: bool) -> Drain:
    if request_in_progress:
        return Drain.FINISH
    if head_in_progress:
        return Drain.CLOSE
    return Drain.WAIT


def websocket_close_code(*, stopping: bool) -> int:
    """1001 (going away) when the server stops, 1012 (service restart) when this worker is
    replaced and the service goes on (reload, recycling, scaling down)."""
    return CLOSE_GOING_AWAY if stopping else CLOSE_SERVICE_RESTART
