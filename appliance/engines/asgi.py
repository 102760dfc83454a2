"""Serve an ASGI (or, through :mod:`appliance.engines.wsgi`, a WSGI) app with uvicorn on inherited listening sockets.

We use uvicorn's HTTP protocol and lifespan handling but not its process management:
:class:`_Server` drops uvicorn's signal capture (the worker's signals are ours), reports
``ready`` once the sockets are being served, sends heartbeats from the serving loop's own tick
(so a blocked loop stops them), and drains the way a rolling reload needs:

* stop accepting (other workers keep accepting from the same sockets, so queued connections
  are not lost);
* a request in flight finishes and its response carries ``Connection: close``;
* an idle keep-alive connection is *not* closed under a client that may have just sent a
  request on it: its next request is answered with ``Connection: close``; connections that stay
  idle end at the keep-alive timeout;
* a connection with half a request head is closed at once (see :mod:`appliance.http.rules`);
* WebSockets get a closing handshake with 1012 (this worker is replaced: SIGUSR2 from the
  master) or 1001 (the server stops: SIGTERM, or the master died);
* exit when no connection is left, or at ``graceful_timeout_s``.

The HTTP and WebSocket protocols themselves are in :mod:`appliance.engines.h1`.

Each listening socket may have its own protocol: uvicorn creates one server per socket with
``loop.create_server(factory, sock=sock)``, so when some listener has ``proxy_protocol``
the worker's event loop class (uvloop's, or the balanced acceptor's) is subclassed once to
put a :class:`~appliance.engines.h1.ProxyGate` in front of that socket's factory. Without
such a listener the loop is exactly the one it would be otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import uvicorn
import uvloop

from appliance.engines import balance
from appliance.engines.balance import LoadBoard, Readiness
from appliance.engines.h1 import HttpProtocol, ProxyGate, ServingState, WebSocketProtocol
from appliance.engines.settings import EngineSettings
from appliance.engines.wsgi import WsgiApp
from appliance.http.proxy import ProxyPolicy
from appliance.worker import protocol

__all__ = ["EngineSettings", "serve"]

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_MB
    except OSError:
        return 0.0


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: EngineSettings, report_fd: int) -> None:
        super().__init__(config)
        self._drain_state = ServingState(
            limits=settings.head_limits,
            head_timeout_s=settings.request_head_timeout_s,
            body_timeout_s=settings.request_body_timeout_s,
        )
        self._drain_state.wsgi = settings.interface == "wsgi"
        self.server_state = self._drain_state
        self._settings = settings
        self._report_fd = report_fd
        self._next_beat = 0.0
        #: The WSGI adapter, when the app is a WSGI app (its threads' health gates the beat).
        self.wsgi: WsgiApp | None = None

    @property
    def drain_state(self) -> ServingState:
        """Whether (and why) this worker drains; read by the readiness path."""
        return self._drain_state

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The worker installs its own handlers on the loop (see serve()).
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._beat()  # first, so the master knows our RSS by the time we count as ready
            protocol.send(self._report_fd, protocol.Ready())

    def _beat(self) -> None:
        self._next_beat = asyncio.get_running_loop().time() + self._settings.heartbeat_interval_s
        wsgi = self.wsgi
        if wsgi is not None and (
            wsgi.stuck_for(time.monotonic()) > self._settings.heartbeat_timeout_s
        ):
            # Every WSGI thread is stuck in the app: the worker serves nothing, though its
            # loop runs. Stay silent so the master dumps our stacks and replaces us.
            return
        state = self.server_state
        protocol.send(
            self._report_fd,
            protocol.Beat(
                requests=state.total_requests,
                in_flight=len(state.tasks),
                connections=len(state.connections),
                rss_mb=round(_rss_mb(), 1),
            ),
        )

    async def on_tick(self, counter: int) -> bool:
        if asyncio.get_running_loop().time() >= self._next_beat:
            self._beat()
        return await super().on_tick(counter)

    def begin_drain(self, *, stopping: bool) -> None:
        """Stop accepting and put every connection into drain mode, at once and only once.

        Runs from the signal callback, not at uvicorn's next tick: the master counts a reload
        as done when every old worker said "draining", and from then on a request on one of
        our idle keep-alive connections must already be answered with ``Connection: close``.
        ``stopping`` says whether the server stops (WebSockets close with 1001) or only this
        worker is replaced (1012).
        """
        if self._drain_state.draining:
            return
        self._drain_state.draining = True
        self._drain_state.stopping = stopping
        self.should_exit = True
        for listening in getattr(self, "servers", ()):
            listening.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        for gate in list(self._drain_state.gates):
            gate.shutdown()
        protocol.send(self._report_fd, protocol.Draining())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.begin_drain(stopping=True)
        for listening in self.servers:  # also those made after a SIGTERM during startup
            listening.close()
        for sock in sockets or []:
            sock.close()
        deadline = loop.time() + self._settings.graceful_timeout_s
        pending = self.server_state
        while (pending.connections or pending.tasks or self._drain_state.gates) and (
            loop.time() < deadline and not self.force_exit
        ):
            if loop.time() >= self._next_beat:
                self._beat()
            await asyncio.sleep(0.05)
        for t in list(self.server_state.tasks):
            t.cancel(msg="graceful timeout exceeded")
        for connection in list(self.server_state.connections):
            connection.transport.close()
        for gate in list(self._drain_state.gates):
            gate.close()
        if not self.force_exit:
            await self.lifespan.shutdown()


def _asgi_app(app: Any, settings: EngineSettings) -> Any:
    if settings.interface == "wsgi":
        from appliance.engines.wsgi import WsgiApp

        return WsgiApp(app, settings.wsgi_threads)
    return app


def serve(
    app: Any,
    sockets: list[socket.socket],
    settings: EngineSettings,
    *,
    report_fd: int,
    alive_fd: int | None,
    board: LoadBoard | None = None,
    lane: int | None = None,
    on_loop: Callable[[], None] | None = None,
) -> int:
    """Run the engine until SIGTERM (drain) or the master's death; return the exit code."""
    inner = _asgi_app(app, settings)
    served = inner
    if settings.readiness_path is not None:
        from appliance.engines.readiness import ReadinessApp

        def readiness() -> Readiness:
            # The pool's word, as the master wrote it; a worker that stops says so itself.
            if server.drain_state.draining and server.drain_state.stopping:
                return Readiness.STOPPING
            return Readiness.READY if board is None else board.readiness()

        served = ReadinessApp(inner, settings.readiness_path, readiness)
    config = uvicorn.Config(
        served,
        interface="asgi3",
        loop="none",
        http=HttpProtocol,
        ws=WebSocketProtocol if settings.websocket and settings.interface == "asgi" else "none",
        ws_max_size=settings.websocket_max_message_bytes,
        ws_ping_interval=settings.websocket_ping_interval_s or None,
        ws_ping_timeout=settings.websocket_ping_timeout_s or None,
        ws_per_message_deflate=settings.websocket_per_message_deflate,
        lifespan=settings.lifespan,
        log_config=None,
        access_log=settings.access_log,
        timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]
        limit_concurrency=settings.limit_concurrency,
        proxy_headers=settings.proxy_headers,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        server_header=False,
    )
    server = _Server(config, settings, report_fd)
    if isinstance(inner, WsgiApp):
        server.wsgi = inner

    async def main() -> None:
        loop = asyncio.get_running_loop()

        # SIGTERM: the server stops. SIGUSR2: this worker is replaced (reload, recycling,
        # scaling down) while the service goes on. Both drain; they differ in the WebSocket
        # close code (1001 or 1012).
        loop.add_signal_handler(signal.SIGTERM, lambda: server.begin_drain(stopping=True))
        loop.add_signal_handler(signal.SIGUSR2, lambda: server.begin_drain(stopping=False))
        if alive_fd is not None:

            def master_gone() -> None:
                # EOF on the master's pipe: the master died; drain and go.
                loop.remove_reader(alive_fd)
                server.begin_drain(stopping=True)

            loop.add_reader(alive_fd, master_gone)
        if on_loop is not None:
            on_loop()
        await server.serve(sockets=sockets)

    factory: Callable[[], asyncio.AbstractEventLoop] = (
        balance.loop_factory(board, lane)
        if settings.accept == "balanced" and board is not None and lane is not None
        else uvloop.Loop
    )
    gated = {
        sock.fileno(): policy
        for sock, policy in zip(sockets, settings.proxy or [None] * len(sockets), strict=True)
        if policy is not None
    }
    if gated:
        factory = _with_proxy_gates(factory, gated, server.drain_state)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return 0


def _with_proxy_gates(
    base: Callable[[], asyncio.AbstractEventLoop],
    policies: Mapping[int, ProxyPolicy],
    state: ServingState,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """``base`` (a uvloop loop class), whose servers on the sockets in ``policies`` (by fd)
    read a PROXY header first; every other socket gets uvicorn's factory unchanged."""
    assert isinstance(base, type) and issubclass(base, uvloop.Loop)

    class _ProxyLoop(base):  # type: ignore[misc, valid-type]  # a class chosen at run time
        async def create_server(
            self, protocol_factory: Any, *args: Any, sock: Any = None, **kw: Any
        ) -> Any:
            policy = None if sock is None else policies.get(sock.fileno())
            if policy is None:
                return await super().create_server(protocol_factory, *args, sock=sock, **kw)

            def gate() -> asyncio.Protocol:
                return ProxyGate(protocol_factory, policy, state)

            return await super().create_server(gate, *args, sock=sock, **kw)

    return _ProxyLoop
