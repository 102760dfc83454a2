"""The HTTP/1.1 and WebSocket protocols a worker serves with: uvicorn's, with our rules.

uvicorn's httptools protocol parses and runs the ASGI cycle; :class:`HttpProtocol` adds what
a server facing the internet needs and uvicorn does not do (the decisions are pure functions
in :mod:`appliance.http.rules`):

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
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from appliance import log
from appliance.http import proxy, rules
from appliance.http.rules import Drain, HeadLimits, Reject

if TYPE_CHECKING:
    from uvicorn.config import Config

__all__ = ["LINGER_S", "HttpProtocol", "ProxyGate", "ServingState", "WebSocketProtocol"]

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


class _Corked:
    """A connection's transport as its responses see it: a response's head waits for the
    first write behind it, so the head and a short body cost one system call, not two.

    uvicorn writes the head at ``http.response.start`` and the body at the next
    ``http.response.body``, which an app sends in the same step of its task. So a write with
    nothing held is held (and a flush scheduled for the end of the loop's iteration, for an
    app that sends the head alone and its body later); the next write joins it and goes out at
    once. Large writes, a close, or that flush write what is held. Everything else is the
    transport's.
    """

    __slots__ = ("_held", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._scheduled = False

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
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush_soon)
            return
        self._transport.write(data)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: Most bytes a connection holds back to join with the next write of the same iteration.
CORK_LIMIT = 16 * 1024


def _hand_loss_over(old: asyncio.BaseProtocol, new: asyncio.BaseProtocol) -> None:
    """``new`` takes the transport from ``old``: chain ``old``'s connection_lost behind its own.

    The balanced acceptor counts a connection through the first protocol's connection_lost
    (which it wrapped); once the transport reports to another protocol (a WebSocket upgrade,
    the PROXY gate handing over), that count must still end when the connection does.
    """
    new_lost, old_lost = new.connection_lost, old.connection_lost

    def connection_lost(exc: Exception | None) -> None:
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


class HttpProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServingState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._state = server_state
        self._limits = server_state.limits
        self._in_head = False  # on_message_begin seen, on_headers_complete not yet
        self._head_began_here = False  # ... in the chunk being fed now
        self._head_bytes = 0
        self._fields = 0
        self._in_body = False
        self._body_progress = False  # body data (or a head's end) in the chunk being fed
        self._framing_run = 0  # bytes of the body since its last data: framing, trailers
        self._body_seen_at = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._reject: Reject | None = None
        self._refused = False
        self._cork: _Corked | None = None

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        self._unset_keepalive_if_required()
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _arm_idle(self) -> None:
        if self.timeout_keep_alive_task is None and not self.transport.is_closing():
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _busy(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: drop what the peer still sends
        self._unset_keepalive_if_required()
        self._head_began_here = False
        self._body_progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._should_upgrade():
                self._upgrade(data[exc.args[0] :] if exc.args else b"")
            else:
                self._unsupported_upgrade_warning()
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
        elif not self._busy():
            self._arm_idle()  # bytes that began nothing (a stray CRLF): still idle

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_began_here = True
        self._head_bytes = 0
        self._fields = 0

    def _stop(self, reject: Reject) -> None:
        self._reject = reject
        raise _Refused(reject.reason)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self._limits.target_always_fits:
            reject = rules.check_request_line(self.parser.get_method(), len(self.url), self._limits)
            if reject is not None:
                self._stop(reject)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field of a chunked body: never a request header
        self._fields += 1
        reject = rules.check_field(self._fields, name, value, self._limits)
        if reject is not None:
            self._stop(reject)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parser = self.parser
        reject = rules.check_head(
            parser.get_http_version(), parser.get_method(), self.url, self.headers
        )
        if reject is not None:
            self._stop(reject)
        super().on_headers_complete()
        if parser.should_upgrade() and self._should_upgrade():
            return
        cycle = self.cycle
        if cycle is not None:
            cork = self._cork
            if cork is None:
                cork = self._cork = _Corked(self.transport, self.loop)
            cycle.transport = cork  # type: ignore[assignment]  # the transport's interface
            if self._state.wsgi:
                # For the WSGI bridge: stop iterating a response nobody receives.
                scope: Any = self.scope  # HTTPScope types "extensions" too narrowly for this
                scope["extensions"] = {"appliance.disconnected": lambda: cycle.disconnected}
            if self._state.draining:
                cycle.keep_alive = False
        self._in_body = True
        self._body_progress = True
        self._framing_run = 0

    def on_body(self, body: bytes) -> None:
        self._body_progress = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

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
        if self.flow.read_paused:
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
            cycle.message_event.set()
            if started:  # too late for a status: end the connection
                self._flush()
                self.transport.close()
                return
        self._refuse(reject)

    # --- refusing -------------------------------------------------------------------------

    def _refuse(self, reject: Reject) -> None:
        """Answer ``reject``, half-close, drop whatever else arrives for LINGER_S, close."""
        self._refused = True
        self._in_head = self._in_body = False
        self._cancel_timers()
        self._flush()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(_response(reject.status, reject.reason, self.server_state.default_headers))
        self.flow.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _flush(self) -> None:
        """Write what the cork holds before we write or close on the transport directly."""
        if self._cork is not None:
            self._cork.flush()

    def send_400_response(self, msg: str) -> None:
        self._refuse(Reject(400, msg))

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
            self._flush()
            self.transport.close()
        # Drain.WAIT: the next request is answered with "Connection: close"
        # (on_headers_complete), or the idle timeout ends the connection.

    # --- WebSocket upgrade ----------------------------------------------------------------

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
        lines = [self.scope["method"].encode(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.scope["headers"]:
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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
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
        inner.connection_made(transport)
        if isinstance(inner, HttpToolsProtocol):
            _relay(inner, header)
        transport.set_protocol(inner)
        if rest:
            inner.data_received(rest)


def _relay(protocol: HttpToolsProtocol, header: proxy.ProxyHeader) -> None:
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
