"""The HTTP/1.1 and WebSocket protocols a worker serves with.

:class:`HttpProtocol` is our own HTTP/1.1 protocol on httptools (llhttp parses); it keeps the
interface of uvicorn's (``uvicorn.Server`` runs it, the lifespan, the WebSocket protocol and
the app see what they would see under uvicorn: tests/process/test_http_conformance.py sends
the same bytes to both) and spends less per request: no event, timer, done callback or
second write per request. On top of that it does what a server facing the internet needs
and uvicorn does not do (the decisions are pure functions in :mod:`appliance.http.rules`):

* limits on the request head (line, field count, field size) and on the bytes one head may
  take while it arrives, answered 414/431 with ``Connection: close``;
* the RFC 9112 checks llhttp leaves to the server (505, duplicate Host, ``GET *``,
  Transfer-Encoding in HTTP/1.0);
* trailer fields of a chunked body never become request headers (httptools reports them
  through the same ``on_header`` callback as the head's fields), and the bytes of a body that
  carry no data (a trailer field or chunk extension that never ends) are bounded like a head;
* timeouts: an idle connection (fresh, or between requests) closes after the keep-alive
  timeout, a head must arrive within the head timeout (else 408), and a body may not stall
  longer than the body timeout;
* a drain that finishes requests in progress, closes connections with half a head at once
  and lets idle ones take their next request (answered with ``Connection: close``);
* a response's head and a short body go out in one system call, not one per write
  (:class:`_Corked`);
* a refused connection half-closes and keeps reading (and discarding) for a moment, so the
  peer reads our answer instead of a TCP reset caused by its own unread bytes;
* the connection counter of the balanced acceptor follows a connection into the WebSocket
  protocol after an upgrade, and bytes the client sent right behind its upgrade request are
  passed on instead of dropped; so do the client and server addresses (and the scheme) a
  PROXY header set.

:class:`ProxyGate` is the first protocol of every connection on a listener with
``proxy_protocol``: it reads the PROXY header (:mod:`appliance.http.proxy` decides), then
hands the connection to :class:`HttpProtocol` with the header's addresses, and steps out of
the way; a connection without a valid header from a trusted peer is closed without an answer.
Other listeners never see it, so their reads cost exactly what they did.

:class:`WebSocketProtocol` (uvicorn's websockets sans-I/O protocol) closes with a real closing
handshake when the worker drains: a close frame with 1012 (replaced) or 1001 (stopping), then
the TCP connection ends once the client answered, never with a reset.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from appliance import log
from appliance.http import proxy, rules
from appliance.http.rules import Drain, HeadLimits, Reject

if TYPE_CHECKING:
    from uvicorn.config import Config

    from appliance.engines.balance import Addresses

__all__ = ["LINGER_S", "HttpProtocol", "ProxyGate", "ServingState", "WebSocketProtocol"]

_LOGGER = logging.getLogger("uvicorn.error")  # uvicorn's names: log.py maps their events
_ACCESS_LOGGER = logging.getLogger("uvicorn.access")


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %b\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}
#: A response header name with a byte RFC 9110 does not allow in a token, or a value with a
#: control byte other than tab: either would let an app split the response.
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]').search
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]").search
#: Response header names an app sent before and that were valid, lower-cased: an app sends
#: the same few names with every response, and checking and lower-casing one cost more than
#: the rest of its line. Bounded, for an app that makes names up.
_FIELD_NAMES: dict[bytes, bytes] = {}
_FIELD_NAMES_MAX = 256


def _field_name(name: bytes) -> bytes:
    """``name`` lower-cased, or ``RuntimeError`` for a name an app may not send."""
    if _BAD_NAME(name):
        raise RuntimeError("Invalid HTTP header name.")
    lowered = name.lower()
    if type(name) is bytes and len(_FIELD_NAMES) < _FIELD_NAMES_MAX:
        _FIELD_NAMES[name] = lowered
    return lowered


#: ``_Cycle._expected`` of a body that the end of the connection delimits (HTTP/1.0).
_UNTIL_CLOSE = -1
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}

#: How long a refused connection keeps reading (and dropping) what the peer still sends
#: after our answer, before it closes. Closing a socket with unread bytes makes the kernel
#: send a reset, which can destroy the answer before the peer has read it.
LINGER_S = 1.0


class ServingState(ServerState):
    """uvicorn's state shared by all connections of a worker, plus our settings and drain."""

    def __init__(
        self,
        *,
        limits: HeadLimits,
        head_timeout_s: float,
        body_timeout_s: float,
    ) -> None:
        super().__init__()
        self.limits = limits
        self.head_timeout_s = head_timeout_s
        self.body_timeout_s = body_timeout_s
        self.draining = False
        #: The app is a WSGI app (its bridge asks each request whether the client is gone).
        self.wsgi = False
        #: Draining because the server stops (not because this worker is replaced).
        self.stopping = False
        #: Connections still reading their PROXY header (not yet in ``connections``).
        self.gates: set[ProxyGate] = set()
        self.proxy_rejections = proxy.RejectLog()
        self._head_for: list[tuple[bytes, bytes]] | None = None
        self._head = b""
        self._access_log: bool | None = None
        self._flusher: _Flusher | None = None

    def flusher(self, loop: asyncio.AbstractEventLoop) -> _Flusher:
        """The worker's one :class:`_Flusher` (made on its loop, by the first connection)."""
        if self._flusher is None:
            self._flusher = _Flusher(loop)
        return self._flusher

    def access_log(self, config: Config) -> bool:
        """Whether requests are logged (uvicorn's rule: asked for, and the logger has a
        handler), decided once per worker, not once per connection."""
        if self._access_log is None:
            self._access_log = bool(config.access_log) and _ACCESS_LOGGER.hasHandlers()
        return self._access_log

    def default_head(self) -> bytes:
        """The server's own header lines of every response (``date``), as bytes.

        uvicorn's server loop replaces ``default_headers`` once a second; the bytes are made
        once per list, not once per response.
        """
        headers = self.default_headers
        if headers is not self._head_for:
            self._head = b"".join(b"%b: %b\r\n" % (name, value) for name, value in headers)
            self._head_for = headers
        return self._head


class _Flusher:
    """Writes what the worker's corks still hold at the end of the loop's iteration: one
    callback per iteration for every connection of the worker, not one per response."""

    __slots__ = ("_held", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[_Corked] = []

    def add(self, cork: _Corked) -> None:
        if not self._held:
            self._loop.call_soon(self._run)
        self._held.append(cork)

    def _run(self) -> None:
        held, self._held = self._held, []
        for cork in held:
            cork.flush()


class _Corked:
    """A connection's transport as its responses see it: a response's head waits for the
    first write behind it, so the head and a short body cost one system call, not two.

    An app sends ``http.response.start`` and its body in the same step of its task, mostly.
    So a write with nothing held is held (and the worker's :class:`_Flusher` writes it at the
    end of the loop's iteration, for an app that sends the head alone and its body later);
    the next write joins it and goes out at once. Large writes, a close, or that flush write
    what is held.
    """

    __slots__ = ("_flusher", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport, flusher: _Flusher) -> None:
        self._transport = transport
        self._flusher = flusher
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= CORK_LIMIT:
                self._transport.write(held + data)
                return
            self._transport.write(held)
        elif len(data) <= CORK_LIMIT:
            self._held = data
            self._flusher.add(self)
            return
        self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is None:
            return
        self._held = None
        if not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()


#: Most bytes a connection holds back to join with the next write of the same iteration.
CORK_LIMIT = 16 * 1024


def _hand_loss_over(old: asyncio.BaseProtocol, new: asyncio.BaseProtocol) -> None:
    """``new`` takes the transport from ``old``: chain ``old``'s connection_lost behind its own.

    The balanced acceptor counts a connection through the first protocol's connection_lost
    (its ``on_lost`` hook); once the transport reports to another protocol (a WebSocket upgrade,
    the PROXY gate handing over), that count must still end when the connection does.
    """
    new_lost, old_lost = new.connection_lost, old.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        del new.connection_lost  # this closure, which refers to ``new``: no cycle outlives it
        try:
            new_lost(exc)
        finally:
            old_lost(exc)

    new.connection_lost = connection_lost  # type: ignore[method-assign]


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the protocol answers ``_reject``."""


def _response(status: int, reason: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = reason.encode("ascii", "replace") + b"\n"
    parts = [STATUS_LINE[status]]
    for name, value in default_headers:
        parts += [name, b": ", value, b"\r\n"]
    parts += [
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
        body,
    ]
    return b"".join(parts)


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: llhttp (httptools) parses, each request runs as an ASGI task.

    The interface is uvicorn's (``uvicorn.Server`` makes one per connection with ``config``,
    ``server_state`` and ``app_state``, keeps it in ``server_state.connections`` and calls
    :meth:`shutdown` to drain), and so is what an app sees: the scope, ``receive`` and
    ``send`` (:class:`_Cycle`), the 100-continue, HEAD, chunked, Content-Length and error
    behaviour, pipelining and flow control. What it does not do is spend time a request does
    not need: no per-request event, timer, or done callback; a head check over counts the
    field callbacks kept; the head of a response joined with its body (:class:`_Corked`).
    """

    # Slots: a connection has more attributes than an instance dict shares its keys for (30),
    # so without them each one built its own dict, growing it four times, at every connection.
    # ``__dict__`` stays for what others set (a protocol handed over chains its
    # ``connection_lost``); tests/unit/test_h1_lifetime.py checks nothing of ours lands there.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_body_progress",
        "_body_seen_at",
        "_body_timer",
        "_cork",
        "_expect_100",
        "_field_fits",
        "_fields",
        "_framing_run",
        "_front",
        "_head_began_here",
        "_head_bytes",
        "_head_timer",
        "_headers",
        "_hosts",
        "_idle_since",
        "_idle_timer",
        "_in_body",
        "_in_head",
        "_limits",
        "_max_fields",
        "_method",
        "_read_paused",
        "_refused",
        "_reject",
        "_root_raw",
        "_state",
        "_target_fits",
        "_transfer_encoding",
        "_upgrading",
        "_url",
        "_writable",
        "_write_paused",
        "accepted_addresses",
        "access_log",
        "app",
        "app_state",
        "client",
        "config",
        "connections",
        "cycle",
        "limit_concurrency",
        "loop",
        "on_lost",
        "parser",
        "pipeline",
        "root_path",
        "scheme",
        "server",
        "server_state",
        "tasks",
        "timeout_keep_alive",
        "transport",
        "ws_protocol_class",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServingState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.parser = httptools.HttpRequestParser(self)
        # Answer a request that came with a close before the bytes behind it (uvicorn too).
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.ws_protocol_class = config.ws_protocol_class
        self.root_path = config.root_path
        self._root_raw = config.root_path.encode("ascii")
        self.limit_concurrency = config.limit_concurrency
        self.timeout_keep_alive = config.timeout_keep_alive
        self.access_log = server_state.access_log(config)
        self.app_state = app_state
        self.server_state = server_state
        self.connections: set[Any] = server_state.connections
        self.tasks = server_state.tasks
        self._state = server_state
        limits = self._limits = server_state.limits
        self._target_fits = limits.target_always_fits
        self._max_fields = limits.max_header_fields
        self._field_fits = limits.max_header_field_bytes - 2  # "NAME: VALUE"

        # The connection.
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        #: ``(server, client)`` when the balanced acceptor knew them (engines.balance).
        self.accepted_addresses: Addresses | None = None
        #: Called first in connection_lost: the balanced acceptor counts the connection's end.
        self.on_lost: Callable[[], object] | None = None
        self.scheme = "http"
        self._cork: _Corked = None  # type: ignore[assignment]
        self.pipeline: deque[tuple[_Cycle, Any]] = deque()
        self.cycle: _Cycle | None = None  # the request parsed last
        self._front: _Cycle | None = None  # the request being answered
        self._read_paused = False
        self._write_paused = False
        self._writable: asyncio.Event | None = None  # made when writing first pauses
        self._idle_since: float | None = None  # idle (between requests) since then
        self._idle_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._reject: Reject | None = None
        self._refused = False

        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._fields = 0
        self._hosts = 0
        self._transfer_encoding = False
        self._expect_100 = False
        self._upgrading = False
        self._method = b""
        self._in_head = False  # on_message_begin seen, on_headers_complete not yet
        self._head_began_here = False  # ... in the chunk being fed now
        self._head_bytes = 0
        self._in_body = False
        self._body_progress = False  # body data (or a head's end) in the chunk being fed
        self._framing_run = 0  # bytes of the body since its last data: framing, trailers
        self._body_seen_at = 0.0

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.add(self)
        self.transport = transport
        self._cork = _Corked(transport, self._state.flusher(self.loop))
        if self.accepted_addresses is None:
            self.server = get_local_addr(transport)
            self.client = get_remote_addr(transport)
        else:
            self.server, self.client = self.accepted_addresses
        if is_ssl(transport):
            self.scheme = "https"
        self._go_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()
        self.connections.discard(self)
        self._cancel_timers()
        for cycle in (self._front, self.cycle):
            if cycle is not None:
                if not cycle.response_complete:
                    cycle.disconnected = True
                cycle.wake()
        for queued, _app in self.pipeline:
            queued.disconnected = True
        self.resume_writing()
        if exc is None:
            self.transport.close()
        # Let go of what refers back to us (the parser's callbacks, the cycles' protocol): a
        # closed connection is then freed at once, when its last task ends, instead of
        # leaving a dozen objects in reference cycles per connection for the collector.
        self.parser = None  # type: ignore[assignment]
        self.cycle = self._front = None
        self.pipeline.clear()

    def eof_received(self) -> bool | None:
        return None  # the transport closes, as uvicorn's does

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._head_timer = self._body_timer = None
        self._idle_since = None

    def _go_idle(self) -> None:
        """Between requests: the keep-alive timeout runs from now.

        One timer per connection, armed when it first goes idle and re-armed when it fires
        early, so a request costs no timer of its own.
        """
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # busy: the next idle moment arms the timer again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
        else:
            self._close()

    def _busy(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: drop what the peer still sends
        self._idle_since = None
        self._head_began_here = False
        self._body_progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._upgrading:
                self._upgrade(data[exc.args[0] :] if exc.args else b"")
            else:
                _LOGGER.warning("Unsupported upgrade request.")
            return
        except httptools.HttpParserCallbackError:
            self._refuse(self._reject or Reject(400, "invalid HTTP request"))
            return
        except httptools.HttpParserError as exc:
            self._refuse(Reject(400, f"invalid HTTP request: {exc}"))
            return
        # Timers are armed only for a head or body still incomplete after a read, so the
        # common request, whole in one read, costs none.
        if self._in_head:
            # Bytes of the chunk the head began in are not counted: some may belong to the
            # previous request. The budget then bounds the head's memory to the budget plus
            # two reads of the loop (256 KiB each with uvloop).
            if not self._head_began_here:
                self._head_bytes += len(data)
                reject = rules.check_head_bytes(self._head_bytes, self._limits)
                if reject is not None:
                    self._refuse(reject)
                    return
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self._state.head_timeout_s, self._head_expired
                )
        elif self._in_body:
            # A read that carried no body data only grew llhttp's buffer of a chunk line or
            # trailer field: bound the run of such reads like a head (the budget plus one read).
            self._framing_run = 0 if self._body_progress else self._framing_run + len(data)
            reject = rules.check_framing_bytes(self._framing_run, self._limits)
            if reject is not None:
                self._refuse_body(reject)
                return
            self._body_seen_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(
                    self._state.body_timeout_s, self._body_expired
                )
        elif not self._busy() and not self.transport.is_closing():
            self._go_idle()  # bytes that began nothing (a stray CRLF): still idle

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._fields = self._hosts = self._head_bytes = 0
        self._transfer_encoding = self._expect_100 = False
        self._in_head = self._head_began_here = True

    def _stop(self, reject: Reject) -> None:
        self._reject = reject
        raise _Refused(reject.reason)

    def on_url(self, url: bytes) -> None:
        url = self._url = self._url + url if self._url else url
        if len(url) > self._target_fits:
            reject = rules.check_request_line(self.parser.get_method(), len(url), self._limits)
            if reject is not None:
                self._stop(reject)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field of a chunked body: never a request header
        fields = self._fields = self._fields + 1
        if fields > self._max_fields or len(name) + len(value) > self._field_fits:
            reject = rules.check_field(fields, name, value, self._limits)
            if reject is not None:
                self._stop(reject)
        name = name.lower()
        if name == b"host":
            self._hosts += 1
        elif name == b"transfer-encoding":
            self._transfer_encoding = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect_100 = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parser = self.parser
        version = parser.get_http_version()
        method = self._method = parser.get_method()
        url = self._url
        reject = rules.check_head(version, method, url, self._hosts, self._transfer_encoding)
        if reject is not None:
            self._stop(reject)
        self._upgrading = parser.should_upgrade() and self._should_upgrade()
        if self._upgrading:
            return
        if url[:1] == b"/" and b"#" not in url:  # origin-form, the usual case
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        if self.root_path:
            path = self.root_path + path
            raw_path = self._root_raw + raw_path
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": _METHODS.get(method) or method.decode("ascii"),
            "root_path": self.root_path,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self._headers,
            "state": self.app_state.copy(),
        }
        state = self._state
        keep_alive = version != "1.0" and parser.should_keep_alive() and not state.draining
        cycle = _Cycle(self, scope, keep_alive, self._expect_100)
        if state.wsgi:
            # For the WSGI bridge: stop iterating a response nobody receives.
            scope["extensions"] = {"appliance.disconnected": lambda: cycle.disconnected}
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            _LOGGER.warning("Exceeded concurrency limit.")
        else:
            app = self.app
        previous = self.cycle
        self.cycle = cycle
        if previous is None or previous.response_complete:
            self._start(cycle, app)
        else:  # pipelined behind a request still being answered
            self._pause_reading()
            self.pipeline.appendleft((cycle, app))
        self._in_body = self._body_progress = True
        self._framing_run = 0

    def on_body(self, body: bytes) -> None:
        self._body_progress = True
        cycle = self.cycle
        if self._upgrading or cycle is None or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self._pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        cycle = self.cycle
        if self._upgrading or cycle is None or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.wake()

    # --- requests -------------------------------------------------------------------------

    def _start(self, cycle: _Cycle, app: Any) -> None:
        self._front = cycle
        task = cycle.task = self.loop.create_task(cycle.run(app))
        self.tasks.add(task)

    def response_done(self) -> None:
        """The cycle in front finished its response: start the next one, or go idle."""
        self._state.total_requests += 1
        if self.transport.is_closing():
            return
        self._resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start(cycle, app)
        elif not self._in_head:
            self._go_idle()

    # --- flow control ---------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if not self._write_paused:
            self._write_paused = True
            if self._writable is None:
                self._writable = asyncio.Event()
            self._writable.clear()

    def resume_writing(self) -> None:
        if self._write_paused:
            self._write_paused = False
            assert self._writable is not None
            self._writable.set()

    async def drain(self) -> None:
        """Until the transport takes writes again (the client reads what we sent)."""
        if self._write_paused and self._writable is not None:
            await self._writable.wait()

    # --- timeouts -------------------------------------------------------------------------

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(
                Reject(408, f"request head not received within {self._state.head_timeout_s:g} s")
            )

    def _body_expired(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        timeout = self._state.body_timeout_s
        left = self._body_seen_at + timeout - self.loop.time()
        if self._read_paused:
            left = timeout  # we stopped reading (the app is slow), not the client
        if left > 0:
            self._body_timer = self.loop.call_later(left, self._body_expired)
            return
        self._refuse_body(Reject(408, f"request body stalled for {timeout:g} s"))

    def _refuse_body(self, reject: Reject) -> None:
        """Refuse a request whose body is under way; the app's receive() says disconnect."""
        cycle = self.cycle
        if cycle is not None:
            started = cycle.response_started
            cycle.disconnected = True
            cycle.wake()
            if started:  # too late for a status: end the connection
                self._close()
                return
        self._refuse(reject)

    # --- refusing -------------------------------------------------------------------------

    def _refuse(self, reject: Reject) -> None:
        """Answer ``reject``, half-close, drop whatever else arrives for LINGER_S, close."""
        self._refused = True
        self._in_head = self._in_body = False
        self._cancel_timers()
        self._flush()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.wake()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(_response(reject.status, reject.reason, self._state.default_headers))
        self._resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _flush(self) -> None:
        """Write what the cork holds before we write or close on the transport directly."""
        if self._cork is not None:
            self._cork.flush()

    def _close(self) -> None:
        """Close the connection after what the cork holds."""
        self._cork.close()

    # --- drain ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        action = rules.drain_action(
            head_in_progress=self._in_head, request_in_progress=self._busy()
        )
        if action is Drain.FINISH:
            if self.cycle is not None:
                self.cycle.keep_alive = False
            for cycle, _app in self.pipeline:
                cycle.keep_alive = False
        elif action is Drain.CLOSE:
            self._cancel_timers()
            self._close()
        # Drain.WAIT: the next request is answered with "Connection: close"
        # (on_headers_complete), or the idle timeout ends the connection.

    # --- WebSocket upgrade ----------------------------------------------------------------

    def _should_upgrade(self) -> bool:
        if self.ws_protocol_class is None:
            return False
        connection: list[bytes] = []
        upgrade = None
        for name, value in self._headers:
            if name == b"connection":
                connection = _tokens(value)
            elif name == b"upgrade":
                upgrade = value.lower()
        return b"upgrade" in connection and upgrade == b"websocket"

    def _upgrade(self, rest: bytes) -> None:
        """Hand the connection to the WebSocket protocol, with its counter and its bytes."""
        self._cancel_timers()
        self._flush()
        self._in_head = self._in_body = False
        self.connections.discard(self)
        ws = self.ws_protocol_class(  # type: ignore[call-arg, misc]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        _hand_loss_over(self, ws)
        lines = [self._method, b" ", self._url, b" HTTP/1.1\r\n"]
        for name, value in self._headers:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        ws.connection_made(self.transport)
        if isinstance(ws, WebSocketsSansIOProtocol):
            # What a PROXY header said (else the same values ws took from the transport).
            ws.client, ws.server = self.client, self.server
            if self.scheme == "https":
                ws.scheme = "wss"
        self.transport.set_protocol(ws)
        ws.data_received(b"".join(lines) + rest)


class _Cycle:
    """One request and its response: the ASGI ``receive`` and ``send`` of its task.

    Behaves as uvicorn's cycle does (the tests in test_http_conformance.py hold the two side
    by side): a head with ``Transfer-Encoding: chunked`` unless the app gave a length (or
    the response has no body), ``Connection: close`` when the connection ends after it, a
    ``RuntimeError`` for a message out of order or a body longer or shorter than its
    Content-Length, a 500 for an app that fails (or returns) before it started a response.
    """

    __slots__ = (
        "_event",
        "_expected",
        "_set",
        "body",
        "chunked",
        "disconnected",
        "keep_alive",
        "more_body",
        "proto",
        "response_complete",
        "response_started",
        "scope",
        "task",
        "waiting_for_100_continue",
    )

    def __init__(
        self, proto: HttpProtocol, scope: dict[str, Any], keep_alive: bool, expect_100: bool
    ) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100
        self.disconnected = False
        self.body = bytearray()
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.chunked: bool | None = None
        self._expected = 0  # body bytes the Content-Length still promises
        self._set = False  # something happened that receive() reports
        self._event: asyncio.Event | None = None  # made when a receive() has to wait
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    async def run(self, app: Any) -> None:
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            _LOGGER.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.proto._close()
        else:
            if result is not None:
                _LOGGER.error("ASGI callable should return None, but returned '%s'.", result)
                self.proto._close()
            elif not self.response_started and not self.disconnected:
                _LOGGER.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                _LOGGER.error("ASGI callable returned without completing response.")
                self.proto._close()
        finally:
            self.proto.tasks.discard(self.task)
            self.task = None
            if self.proto._state.wsgi:  # our bridge's probe refers to this cycle: let go
                self.scope.pop("extensions", None)

    async def _send_500(self) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"21"),
                    (b"connection", b"close"),
                ],
            }
        )
        await self.send(
            {"type": "http.response.body", "body": b"Internal Server Error", "more_body": False}
        )

    async def send(self, message: Any) -> None:
        proto = self.proto
        if proto._write_paused and not self.disconnected:
            await proto.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            status = message["status"]
            content = [STATUS_LINE[status], proto._state.default_head()]
            chunked: bool | None = None
            expected = 0
            keep_alive = self.keep_alive
            close_sent = False
            for name, value in message.get("headers", ()):
                try:
                    lowered = _FIELD_NAMES.get(name)
                except TypeError:  # not bytes but a bytearray: unhashable, checked each time
                    lowered = None
                name = _field_name(name) if lowered is None else lowered
                if _BAD_VALUE(value):
                    raise RuntimeError("Invalid HTTP header value.")
                if name == b"content-length" and chunked is None:
                    expected = int(value.decode())
                    chunked = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    expected = 0
                    chunked = True
                elif name == b"connection" and b"close" in _tokens(value):
                    keep_alive = False
                    close_sent = True
                content += (name, b": ", value, b"\r\n")
            # Only a head that is complete and valid starts the response: an app's bad header
            # (or status) is answered 500 by run(), where uvicorn just closes the connection.
            self.response_started = True
            self.waiting_for_100_continue = False
            if proto.access_log:
                _log_access(self.scope, status)
            if not keep_alive and not close_sent:
                content.append(b"connection: close\r\n")
            if chunked is None and status not in (204, 304) and self.scope["method"] != "HEAD":
                if self.scope["http_version"] == "1.0":
                    # No chunked coding for an HTTP/1.0 client (RFC 9112 §6.1, uvicorn sends
                    # it): the body ends where the connection does (1.0 is never kept alive).
                    chunked, expected = False, _UNTIL_CLOSE
                else:
                    chunked = True
                    content.append(b"transfer-encoding: chunked\r\n")
            self.chunked, self._expected, self.keep_alive = chunked, expected, keep_alive
            content.append(b"\r\n")
            proto._cork.write(b"".join(content))
            return
        if self.response_complete:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already "
                "completed."
            )
        if message["type"] != "http.response.body":
            raise RuntimeError(
                f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
            )
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        cork = proto._cork
        if self.scope["method"] == "HEAD":
            self._expected = 0
        elif self.chunked:
            if body:
                chunk = b"%x\r\n%b\r\n" % (len(body), body)
                cork.write(chunk if more_body else chunk + b"0\r\n\r\n")
            elif not more_body:
                cork.write(b"0\r\n\r\n")
        else:
            if self._expected != _UNTIL_CLOSE:
                if len(body) > self._expected:
                    raise RuntimeError("Response content longer than Content-Length")
                self._expected -= len(body)
            if body:
                cork.write(body)
        if more_body:
            return
        if self._expected > 0:
            raise RuntimeError("Response content shorter than Content-Length")
        self.response_complete = True
        self.wake()
        if not self.keep_alive:
            cork.close()
        else:
            cork.flush()  # a HEAD's or an empty body's head, held for a body that never came
        proto.response_done()

    async def receive(self) -> Any:
        proto = self.proto
        if self.waiting_for_100_continue and not proto.transport.is_closing():
            proto._flush()
            proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            proto._resume_reading()
            if not self._set:
                event = self._event
                if event is None:
                    event = self._event = asyncio.Event()
                else:
                    event.clear()
                await event.wait()
            self._set = False
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": bytes(self.body), "more_body": self.more_body}
        self.body = bytearray()
        return message


def _tokens(value: bytes) -> list[bytes]:
    """The lower-cased tokens of a comma-separated field value (``Connection``)."""
    return [token.lower().strip() for token in value.split(b",")]


def _log_access(scope: dict[str, Any], status: int) -> None:
    _ACCESS_LOGGER.info(
        '%s - "%s %s HTTP/%s" %d',
        get_client_addr(scope),  # type: ignore[arg-type]
        scope["method"],
        get_path_with_query_string(scope),  # type: ignore[arg-type]
        scope["http_version"],
        status,
    )


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol, with a closing handshake on drain."""

    def __init__(
        self,
        config: Config,
        server_state: ServingState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._state = server_state
        self._drained = False

    def shutdown(self) -> None:
        self.stop_keepalive()
        if self.close_sent or self.transport.is_closing():
            return  # a closing handshake is under way; its close timer ends it
        if not self.handshake_complete:
            if self.handshake_initiated and self.initial_response is None:
                # The app has not accepted yet: refuse the upgrade, we are going away.
                self.conn.send_response(self.conn.reject(503, "Service Unavailable\n"))
                self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()
            return
        code = rules.websocket_close_code(stopping=self._state.stopping)
        self._drained = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code})
        self.conn.send_close(code)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:  # we must read the client's close frame
            self.read_paused = False
            self.transport.resume_reading()
        # The client answers with its close frame (handle_close then closes the transport);
        # one that never does is closed after close_timeout or at the graceful timeout.
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    async def send(self, message: Any) -> None:
        if self._drained:
            raise ClientDisconnected  # the app learns it through receive(); stop sending
        await super().send(message)


class ProxyGate(asyncio.Protocol):
    """Reads the PROXY header of a connection, then hands it to the HTTP protocol.

    ``inner`` makes the HTTP protocol (uvicorn's factory for the listener). The gate refuses
    a peer outside ``proxy_trusted`` at once, and a header that is malformed, missing (the
    first bytes are not one) or not complete within ``http.request_head_timeout_s``: the
    connection is closed without an answer (a balancer expects none), and the source is
    logged as ``worker.proxy_rejected`` at most once a minute. A header that arrived is
    consumed, the HTTP protocol takes the transport with the header's addresses, and bytes
    behind the header in the same read are its first.

    A drain lets a connection still waiting for its header finish it, as it lets a fresh
    connection send its first request: a balancer writes the header and its request at once
    and never retries a request it has sent, so closing now would lose it. The HTTP protocol
    it hands over to sees the drain and answers with ``Connection: close``; the header's
    timer and the graceful timeout bound the wait.
    """

    def __init__(
        self,
        inner: Callable[[], asyncio.Protocol],
        policy: proxy.ProxyPolicy,
        state: ServingState,
    ) -> None:
        self._inner = inner
        self._policy = policy
        self._state = state
        self._buffer = b""
        self._peer: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        self.transport: asyncio.Transport | None = None
        self.accepted_addresses: Addresses | None = None  # see HttpProtocol's
        self.on_lost: Callable[[], object] | None = None  # see HttpProtocol's

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        if self.accepted_addresses is None:
            peer = transport.get_extra_info("peername")
        else:
            peer = self.accepted_addresses[1]
        # A unix socket's peer has no address ('' or None): trusted, see proxy.is_trusted.
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if not self._policy.trusts(self._peer):
            self._refuse("the peer is not in proxy_trusted")
            return
        self._state.gates.add(self)
        timeout = self._state.head_timeout_s
        self._timer = asyncio.get_running_loop().call_later(timeout, self._expired, timeout)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        buffer = self._buffer + data if self._buffer else data
        result = proxy.parse(buffer)
        if isinstance(result, proxy.NeedMore):
            self._buffer = buffer  # bounded: parse refuses what grows past a header's size
        elif isinstance(result, proxy.Invalid):
            self._refuse(result.reason)
        else:
            self._hand_over(result, buffer[result.consumed :])

    def eof_received(self) -> bool | None:
        if self._buffer and not self._done:  # silence before any byte: a balancer's TCP check
            self._refuse(
                f"the connection ended within the PROXY header ({len(self._buffer)} bytes)"
            )
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()
        self._finish()

    def shutdown(self) -> None:
        """Drain: nothing to do yet (see the class docstring); :meth:`close` ends it."""

    def close(self) -> None:
        """The graceful timeout is over: close the connection still in its header."""
        self._finish()
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        self._done = True
        self._buffer = b""
        self._state.gates.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, timeout: float) -> None:
        self._timer = None
        if not self._done:
            self._refuse(f"no PROXY header within {timeout:g} s")

    def _refuse(self, reason: str) -> None:
        self._finish()
        source = self._peer if self._peer is not None else "unix"
        suppressed = self._state.proxy_rejections.note(source, time.monotonic())
        if suppressed is not None:
            log.get_logger().warning(
                "worker.proxy_rejected",
                source=source,
                listener=self._policy.listener,
                reason=reason,
                suppressed=suppressed,
            )
        if self.transport is not None:
            self.transport.close()

    def _hand_over(self, header: proxy.ProxyHeader, rest: bytes) -> None:
        self._finish()
        transport = self.transport
        assert transport is not None
        inner = self._inner()
        _hand_loss_over(self, inner)
        if isinstance(inner, HttpProtocol):
            inner.accepted_addresses = self.accepted_addresses
        inner.connection_made(transport)
        if isinstance(inner, HttpProtocol):
            _relay(inner, header)
        transport.set_protocol(inner)
        if rest:
            inner.data_received(rest)


def _relay(protocol: HttpProtocol, header: proxy.ProxyHeader) -> None:
    """Give the HTTP protocol the header's view of the connection (ASGI client, server)."""
    source, destination = header.source, header.destination
    if isinstance(source, proxy.InetEndpoint):
        protocol.client = (source.host, source.port)
    elif isinstance(source, proxy.UnixEndpoint):
        protocol.client = None  # what uvicorn says for a unix socket's peer
    if isinstance(destination, proxy.InetEndpoint):
        protocol.server = (destination.host, destination.port)
    elif isinstance(destination, proxy.UnixEndpoint):
        protocol.server = (destination.path, None)
    if header.tls:
        protocol.scheme = "https"
