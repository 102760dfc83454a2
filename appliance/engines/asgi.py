"""Serve an ASGI (or a2wsgi-wrapped WSGI) app with uvicorn on inherited listening sockets.

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
* exit when no connection is left, or at ``graceful_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from appliance.engines import balance
from appliance.engines.balance import LoadBoard
from appliance.worker import protocol

__all__ = ["EngineSettings", "serve"]

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    interface: str = "asgi"
    lifespan: Literal["auto", "on", "off"] = "auto"
    keepalive_timeout_s: float = 5.0
    limit_concurrency: int | None = None
    access_log: bool = False
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    graceful_timeout_s: float = 30.0
    heartbeat_interval_s: float = 1.0
    accept: str = "balanced"


class _DrainingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a drain that never closes under a sending client."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if getattr(self.server_state, "draining", False) and self.cycle is not None:
            self.cycle.keep_alive = False

    def shutdown(self) -> None:
        # Busy: finish, then close. Idle: wait for the next request (answered with
        # "Connection: close") or the keep-alive timeout.
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        for cycle, _app in self.pipeline:
            cycle.keep_alive = False


class _State(ServerState):
    """uvicorn's shared server state, plus whether we are draining (read by the protocol)."""

    draining = False


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_MB
    except OSError:
        return 0.0


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: EngineSettings, report_fd: int) -> None:
        super().__init__(config)
        self._drain_state = _State()
        self.server_state = self._drain_state
        self._settings = settings
        self._report_fd = report_fd
        self._next_beat = 0.0

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

    def begin_drain(self) -> None:
        """Stop accepting and put every connection into drain mode, at once and only once.

        Runs from the SIGTERM callback, not at uvicorn's next tick: the master counts a reload
        as done when every old worker said "draining", and from then on a request on one of
        our idle keep-alive connections must already be answered with ``Connection: close``.
        """
        if self._drain_state.draining:
            return
        self._drain_state.draining = True
        self.should_exit = True
        for listening in getattr(self, "servers", ()):
            listening.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        protocol.send(self._report_fd, protocol.Draining())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.begin_drain()
        for listening in self.servers:  # also those made after a SIGTERM during startup
            listening.close()
        for sock in sockets or []:
            sock.close()
        deadline = loop.time() + self._settings.graceful_timeout_s
        while (self.server_state.connections or self.server_state.tasks) and (
            loop.time() < deadline and not self.force_exit
        ):
            if loop.time() >= self._next_beat:
                self._beat()
            await asyncio.sleep(0.05)
        for t in list(self.server_state.tasks):
            t.cancel(msg="graceful timeout exceeded")
        for connection in list(self.server_state.connections):
            connection.transport.close()
        if not self.force_exit:
            await self.lifespan.shutdown()


def _asgi_app(app: Any, interface: str) -> Any:
    if interface == "wsgi":
        from a2wsgi import WSGIMiddleware

        return WSGIMiddleware(app)
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
    config = uvicorn.Config(
        _asgi_app(app, settings.interface),
        interface="asgi3",
        loop="none",
        http=_DrainingProtocol,
        ws="none",
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

    async def main() -> None:
        loop = asyncio.get_running_loop()

        loop.add_signal_handler(signal.SIGTERM, server.begin_drain)
        if alive_fd is not None:

            def master_gone() -> None:
                # EOF on the master's pipe: the master died; drain and go.
                loop.remove_reader(alive_fd)
                server.begin_drain()

            loop.add_reader(alive_fd, master_gone)
        if on_loop is not None:
            on_loop()
        await server.serve(sockets=sockets)

    factory = (
        balance.loop_factory(board, lane)
        if settings.accept == "balanced" and board is not None and lane is not None
        else uvloop.new_event_loop
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return 0
