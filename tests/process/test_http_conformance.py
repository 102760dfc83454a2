"""Differential conformance: appliance and plain uvicorn answer the same bytes alike.

One appliance master (one worker) and one ``uvicorn --http httptools --loop uvloop`` serve
``conformapp`` for the whole module. Each case writes the exact same bytes to both over a raw
socket, reads every answer (framed as a client would: content-length, chunked, or until the
close) and how the connection ended, and compares them normalised: the status line, the
multiset of header fields without ``date`` and ``server``, the body bytes as they were on the
wire (chunk framing included), and the connection's fate (closed by the server, or still
serving a probe request).

uvicorn is the reference because appliance's HTTP/1.1 protocol began as uvicorn's, and the
ASGI apps people deploy are tested on uvicorn. Where appliance is deliberately different (the
RFC 9112 checks and limits of :mod:`appliance.http.rules`, its own refusal answers), the case
asserts appliance's answer explicitly and says why.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import APPS, Master, base_config, short_tmpdir, uvicorn_server, write_config

#: How long one exchange may take before it is recorded as ``timeout``.
EXCHANGE_S = 10.0
#: Sent on a connection that is still open after a case, to see whether it still serves.
PROBE = b"GET /fixed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
PROBE_ANSWER = b"fixed body\n"


# --- the two servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def appliance() -> Iterator[int]:
    directory = short_tmpdir()
    config = base_config(
        directory,
        app={"target": "conformapp:app", "directory": str(APPS)},
        workers={"count": 1},
    )
    master = Master(write_config(directory, config))
    try:
        master.ready()
        yield master.port
    finally:
        master.kill_group()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def uvicorn() -> Iterator[int]:
    with uvicorn_server("conformapp:app", "--no-server-header") as port:
        yield port


# --- the client: exact bytes out, framed answers in --------------------------------------


@dataclass(frozen=True)
class Response:
    status: bytes
    #: The fields as on the wire (names not folded), sorted, without ``date`` and ``server``.
    headers: tuple[tuple[bytes, bytes], ...]
    #: The body as on the wire: chunk sizes, extensions and trailers included.
    body: bytes
    #: False when the connection ended inside the head or the body.
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(frozen=True)
class Outcome:
    responses: tuple[Response, ...]
    #: ``closed`` (the server ended the connection), ``open`` (it served the probe after the
    #: case), ``timeout``, or what the probe got instead.
    end: str


class _Ended(Exception):
    """The server closed the connection (or reset it)."""


class _TimedOut(Exception):
    pass


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self.data = b""
        self.pos = 0

    def _fill(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _TimedOut
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            raise _TimedOut from None
        except ConnectionResetError:
            chunk = b""  # a reset after the answer: the answer is what counts
        if not chunk:
            raise _Ended
        self.data += chunk

    def until(self, marker: bytes) -> bytes:
        while (end := self.data.find(marker, self.pos)) < 0:
            self._fill()
        found, self.pos = self.data[self.pos : end], end + len(marker)
        return found

    def exactly(self, n: int) -> bytes:
        while len(self.data) - self.pos < n:
            self._fill()
        found, self.pos = self.data[self.pos : self.pos + n], self.pos + n
        return found

    def rest(self) -> bytes:
        try:
            while True:
                self._fill()
        except _Ended:
            pass
        found, self.pos = self.data[self.pos :], len(self.data)
        return found


def _normal_fields(lines: list[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    fields = []
    for line in lines:
        name, _, value = line.partition(b":")
        if name.lower() not in (b"date", b"server"):
            fields.append((name, value.strip()))
    return tuple(sorted(fields))


def _read_response(reader: _Reader, head_request: bool) -> Response:
    """One response; raises _Ended before its first byte, returns it incomplete after."""
    start = reader.pos
    try:
        status, *lines = reader.until(b"\r\n\r\n").split(b"\r\n")
    except _Ended:
        if reader.pos == len(reader.data):
            raise
        return Response(reader.data[start:], (), b"", complete=False)
    headers = _normal_fields(lines)
    response = Response(status, headers, b"")
    code = int(status.split(b" ")[1])
    body_start = reader.pos
    try:
        if head_request or code < 200 or code in (204, 304):
            pass
        elif (response.header(b"transfer-encoding") or b"").lower() == b"chunked":
            while (size := int(reader.until(b"\r\n").split(b";")[0], 16)) > 0:
                reader.exactly(size + 2)
            while reader.until(b"\r\n"):  # trailer fields, then the empty line
                pass
        elif (length := response.header(b"content-length")) is not None:
            reader.exactly(int(length))
        else:
            reader.rest()
    except _Ended:
        return Response(status, headers, reader.data[body_start:], complete=False)
    return Response(status, headers, reader.data[body_start : reader.pos])


def exchange(port: int, steps: tuple[bytes | int, ...], head: bool = False) -> Outcome:
    """Run ``steps`` on one connection: bytes are written, an int N reads until N responses
    (interim 1xx ones included) have arrived. Then see how the connection ended."""
    responses: list[Response] = []
    deadline = time.monotonic() + EXCHANGE_S
    with socket.create_connection(("127.0.0.1", port), timeout=EXCHANGE_S) as sock:
        reader = _Reader(sock, deadline)
        try:
            for step in steps:
                if isinstance(step, bytes):
                    try:
                        sock.sendall(step)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # closed on us: what it answered is still to be read
                    continue
                while len(responses) < step:
                    responses.append(_read_response(reader, head))
                    if not responses[-1].complete:
                        raise _Ended
            closing = responses and (responses[-1].header(b"connection") or b"").lower()
            if closing == b"close" or reader.pos < len(reader.data):
                extra = reader.rest()
                end = "closed" if not extra else f"closed after extra bytes {extra!r}"
            else:
                end = _probe(sock, reader)
        except _Ended:
            end = "closed"
        except _TimedOut:
            end = "timeout"
    return Outcome(tuple(responses), end)


def _probe(sock: socket.socket, reader: _Reader) -> str:
    try:
        sock.sendall(PROBE)
    except (BrokenPipeError, ConnectionResetError):
        return "closed"
    try:
        answer = _read_response(reader, head_request=False)
    except _Ended:
        return "closed"
    if answer.status == b"HTTP/1.1 200 OK" and answer.body == PROBE_ANSWER:
        return "open"
    return f"probe answered {answer}"


def _blank_port(outcome: Outcome, port: int) -> Outcome:
    """``conformapp`` writes the server address as ``host:NNNNN``: blank the port, which
    differs between the two servers, without changing any length."""
    mark, blank = b"127.0.0.1:%05d" % port, b"127.0.0.1:*****"
    return Outcome(
        tuple(
            Response(r.status, r.headers, r.body.replace(mark, blank), r.complete)
            for r in outcome.responses
        ),
        outcome.end,
    )


def _run(port: int, case: Case) -> Outcome:
    return _blank_port(exchange(port, case.steps, case.head), port)


# --- the cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``steps``: bytes are written, an int N reads until N responses (1xx ones included)."""

    id: str
    steps: tuple[bytes | int, ...]
    head: bool = False


def get(target: bytes, *fields: bytes, version: bytes = b"1.1", method: bytes = b"GET") -> bytes:
    lines = [method + b" " + target + b" HTTP/" + version, b"Host: x", *fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def post(target: bytes, body: bytes, *fields: bytes, version: bytes = b"1.1") -> bytes:
    head = get(target, b"Content-Length: %d" % len(body), *fields, method=b"POST", version=version)
    return head + body


def chunked_post(target: bytes, chunks: bytes, *fields: bytes, version: bytes = b"1.1") -> bytes:
    fields = (b"Transfer-Encoding: chunked", *fields)
    return get(target, *fields, method=b"POST", version=version) + chunks


CLOSE = b"Connection: close"
EXPECT = b"Expect: 100-continue"

AGREE = [
    # connection management
    Case("keep-alive", (get(b"/fixed"), 1)),
    Case("pipelined-2", (get(b"/echo?1") + get(b"/echo?2"), 2)),
    Case("pipelined-3", (get(b"/echo?1") + post(b"/echo?2", b"abc") + get(b"/echo?3"), 3)),
    Case("http10", (get(b"/fixed", version=b"1.0"), 1)),
    # Both answer "connection: close" and close: allowed (keep-alive is optional in 1.0).
    Case("http10-keep-alive", (get(b"/fixed", b"Connection: keep-alive", version=b"1.0"), 1)),
    Case("http10-echo", (post(b"/echo", b"hello", version=b"1.0"), 1)),
    Case("http11-close", (get(b"/fixed", CLOSE), 1)),
    Case("leading-crlf", (b"\r\n" + get(b"/echo"), 1)),
    Case("head-content-length", (get(b"/fixed", method=b"HEAD"), 1), head=True),
    Case("head-no-content-length", (get(b"/chunked", method=b"HEAD"), 1), head=True),
    Case("options-asterisk", (get(b"*", method=b"OPTIONS"), 1)),
    # what the app sends
    Case("content-length", (get(b"/fixed"), 1)),
    Case("chunked", (get(b"/chunked"), 1)),
    Case("stream-parts", (get(b"/stream"), 1)),
    Case("empty-body", (get(b"/empty"), 1)),
    Case("status-204", (get(b"/status/204"), 1)),
    Case("status-304", (get(b"/status/304"), 1)),
    Case("status-299-no-reason", (get(b"/status/299"), 1)),
    Case("app-connection-close", (get(b"/close"), 1)),
    Case("many-headers", (get(b"/many-headers"), 1)),
    Case("mixed-case-headers", (get(b"/mixed-case"), 1)),
    Case("not-found", (get(b"/nowhere"), 1)),
    # the app breaks the protocol
    Case("raise-before-start", (get(b"/raise-before"), 1)),
    Case("raise-after-start", (get(b"/raise-after"), 1)),
    Case("return-before-start", (get(b"/return-before"), 1)),
    Case("return-incomplete", (get(b"/return-incomplete"), 1)),
    Case("content-longer-than-length", (get(b"/too-long"), 1)),
    Case("content-shorter-than-length", (get(b"/too-short"), 1)),
    # request bodies
    Case("content-length-body", (post(b"/echo", b"hello"), 1)),
    Case(
        "chunked-body", (chunked_post(b"/echo", b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"), 1)
    ),
    Case(
        "body-in-writes",
        (get(b"/echo", b"Content-Length: 11", method=b"POST"), b"hello", b" ", b"world", 1),
    ),
    Case(
        "chunked-body-in-writes",
        (chunked_post(b"/echo", b""), b"5\r\nhel", b"lo\r\n", b"0\r\n", b"\r\n", 1),
    ),
    # Both take "gzip, chunked" and hand the app the de-chunked (still gzip) bytes.
    Case(
        "transfer-coding-gzip-chunked",
        (chunked_post(b"/echo", b"0\r\n\r\n").replace(b"chunked", b"gzip, chunked", 1), 1),
    ),
    # 100 Continue comes when the app reads (receive()), and only then.
    Case(
        "expect-100-read",
        (get(b"/echo", b"Content-Length: 5", EXPECT, method=b"POST"), 1) + (b"hello", 2),
    ),
    Case(
        "expect-100-not-read",
        (get(b"/no-read", b"Content-Length: 5", EXPECT, CLOSE, method=b"POST"), 1),
    ),
    Case("unread-body-pipelined", (post(b"/no-read", b"hello") + get(b"/echo?next"), 2)),
    Case("unread-body-then-next", (post(b"/no-read", b"hello"), 1, get(b"/echo?next"), 2)),
    # request targets and fields (conformapp echoes the scope)
    Case("percent-encoded-path", (get(b"/echo%20a%2Fb"), 1)),
    Case("percent-encoded-route", (get(b"/ech%6F"), 1)),
    Case("query-string", (get(b"/echo?a=1&b=%20&c"), 1)),
    Case("empty-query", (get(b"/echo?"), 1)),
    Case("absolute-form", (get(b"http://example.com/echo?b"), 1)),
    Case("request-header-case", (get(b"/echo", b"X-Mixed-Case: Some Value", b"X-Empty:"), 1)),
    Case("request-header-utf8-value", (get(b"/echo", b"X-A: caf\xc3\xa9"), 1)),
    Case("upgrade-h2c-ignored", (get(b"/echo", b"Connection: Upgrade", b"Upgrade: h2c"), 1)),
]


@pytest.mark.parametrize("case", AGREE, ids=[c.id for c in AGREE])
def test_same_answer_as_uvicorn(case: Case, appliance: int, uvicorn: int) -> None:
    assert _run(appliance, case) == _run(uvicorn, case)


def _fixed(status: bytes, body: bytes, *fields: tuple[bytes, bytes]) -> Response:
    return Response(status, tuple(sorted((*fields, (b"content-length", b"%d" % len(body))))), body)


_ERROR_500 = _fixed(
    b"HTTP/1.1 500 Internal Server Error",
    b"Internal Server Error",
    (b"connection", b"close"),
    (b"content-type", b"text/plain; charset=utf-8"),
)

#: Where uvicorn is wrong and appliance is not: (case, appliance's outcome, uvicorn's).
BETTER = [
    # RFC 9112 §6.1: a server must not send chunked to an HTTP/1.0 client. uvicorn does;
    # appliance ends a body without a length with the connection.
    (
        Case("http10-response-without-length", (get(b"/chunked", version=b"1.0"), 1)),
        Outcome(
            (Response(b"HTTP/1.1 200 OK", ((b"connection", b"close"),), b"one part\n"),), "closed"
        ),
        Outcome(
            (
                Response(
                    b"HTTP/1.1 200 OK",
                    ((b"connection", b"close"), (b"transfer-encoding", b"chunked")),
                    b"9\r\none part\n\r\n0\r\n\r\n",
                ),
            ),
            "closed",
        ),
    ),
    # A header value with CR LF from the app: appliance answers 500 (the head never started);
    # uvicorn counts the response as started before it checks, so it just closes.
    (
        Case("invalid-header-value", (get(b"/bad-header"), 1)),
        Outcome((_ERROR_500,), "closed"),
        Outcome((), "closed"),
    ),
    # The same for a name with CR LF (test_h1_cork: a bad name never becomes a known one).
    (
        Case("invalid-header-name", (get(b"/bad-header-name"), 1)),
        Outcome((_ERROR_500,), "closed"),
        Outcome((), "closed"),
    ),
]


@pytest.mark.parametrize(("case", "ours", "theirs"), BETTER, ids=[case.id for case, _, _ in BETTER])
def test_better_than_uvicorn(
    case: Case, ours: Outcome, theirs: Outcome, appliance: int, uvicorn: int
) -> None:
    assert (_run(appliance, case), _run(uvicorn, case)) == (ours, theirs)


@dataclass(frozen=True)
class Refusal:
    """A request appliance refuses on purpose, with its own one-line answer, then closes."""

    id: str
    request: bytes
    status: bytes
    #: The reason line of appliance.http.rules; None for llhttp's, which appliance passes on
    #: after "invalid HTTP request: " (uvicorn says "Invalid HTTP request received.").
    reason: bytes | None = None


REFUSED = [
    # llhttp refuses these in both servers with 400 and a close; appliance's body says which
    # rule the request broke, uvicorn's body is always "Invalid HTTP request received.".
    Refusal("garbage-request-line", b"GARBAGE\r\n\r\n", b"400 Bad Request"),
    Refusal("unknown-method", get(b"/echo", method=b"FROB"), b"400 Bad Request"),
    Refusal("bad-header-line", get(b"/echo", b"Bad Header Line"), b"400 Bad Request"),
    Refusal("nul-in-header-value", get(b"/echo", b"X-A: a\x00b"), b"400 Bad Request"),
    Refusal("obs-fold", get(b"/echo", b"X-Folded: a", b" b"), b"400 Bad Request"),
    Refusal("bare-lf", b"GET /echo HTTP/1.1\nHost: x\n\n", b"400 Bad Request"),
    # uvicorn's own decode("ascii") of the path would refuse it too, had llhttp let it by.
    Refusal("non-ascii-path", get(b"/echo/caf\xc3\xa9"), b"400 Bad Request"),
    Refusal(
        "invalid-content-length",
        get(b"/echo", b"Content-Length: abc", method=b"POST"),
        b"400 Bad Request",
    ),
    Refusal(
        "content-length-plus-sign",
        get(b"/echo", b"Content-Length: +5", method=b"POST") + b"hello",
        b"400 Bad Request",
    ),
    Refusal(
        "content-length-and-chunked",
        chunked_post(b"/echo", b"0\r\n\r\n", b"Content-Length: 3"),
        b"400 Bad Request",
    ),
    Refusal(
        "bad-chunk-size", chunked_post(b"/echo", b"zz\r\nhello\r\n0\r\n\r\n"), b"400 Bad Request"
    ),
    # RFC 9112 checks llhttp leaves to the server; uvicorn serves all of these to the app.
    # uvicorn: 200, the app sees http_version "2.0".
    Refusal(
        "http-2.0",
        get(b"/echo", version=b"2.0"),
        b"505 HTTP Version Not Supported",
        b"HTTP/2.0 is not supported; use HTTP/1.1\n",
    ),
    # uvicorn: 200 with both Host fields in the scope (§3.2: exactly one).
    Refusal(
        "two-hosts",
        get(b"/echo", b"Host: y"),
        b"400 Bad Request",
        b"more than one Host header field\n",
    ),
    # uvicorn: 200 (§3.2: an HTTP/1.1 request must have a Host).
    Refusal(
        "no-host",
        b"GET /echo HTTP/1.1\r\n\r\n",
        b"400 Bad Request",
        b"an HTTP/1.1 request needs a Host header field\n",
    ),
    # uvicorn: the app gets path "*" (§3.2.4: only OPTIONS may use it).
    Refusal(
        "asterisk-get",
        get(b"*"),
        b"400 Bad Request",
        b"the target * is only allowed with OPTIONS\n",
    ),
    # uvicorn: 200, de-chunked (§6.1: the framing of such a request is faulty).
    Refusal(
        "transfer-encoding-in-http10",
        chunked_post(b"/echo", b"0\r\n\r\n", version=b"1.0"),
        b"400 Bad Request",
        b"Transfer-Encoding is not allowed in an HTTP/1.0 request\n",
    ),
    # Head limits (gunicorn's defaults); uvicorn with httptools has none and answers 200.
    Refusal(
        "request-line-414",
        get(b"/echo?" + b"a" * 5000),
        b"414 Request-URI Too Long",
        b"request line longer than 4094 bytes\n",
    ),
    Refusal(
        "header-field-431",
        get(b"/echo", b"X-Big: " + b"v" * 9000),
        b"431 Request Header Fields Too Large",
        b"a header field is longer than 8190 bytes\n",
    ),
    Refusal(
        "header-count-431",
        get(b"/echo", *[b"X-%d: y" % i for i in range(100)]),
        b"431 Request Header Fields Too Large",
        b"more than 100 header fields\n",
    ),
]


@pytest.mark.parametrize("refusal", REFUSED, ids=[r.id for r in REFUSED])
def test_appliance_refuses_on_purpose(refusal: Refusal, appliance: int, uvicorn: int) -> None:
    outcome = exchange(appliance, (refusal.request, 1))
    body = refusal.reason
    if body is None:  # llhttp's words: one line after our prefix
        (response,) = outcome.responses
        body = response.body
        assert body.startswith(b"invalid HTTP request: ") and body.endswith(b"\n"), body
        assert body.count(b"\n") == 1 and len(body) > len(b"invalid HTTP request: \n"), body
        # Only the body differs: uvicorn refuses with the same status and closes too.
        (theirs,) = (reference := exchange(uvicorn, (refusal.request, 1))).responses
        assert (theirs.status, theirs.header(b"connection"), reference.end) == (
            b"HTTP/1.1 " + refusal.status,
            b"close",
            "closed",
        )
    expected = Response(
        b"HTTP/1.1 " + refusal.status,
        (
            (b"connection", b"close"),
            (b"content-length", b"%d" % len(body)),
            (b"content-type", b"text/plain; charset=utf-8"),
        ),
        body,
    )
    assert outcome == Outcome((expected,), "closed")
