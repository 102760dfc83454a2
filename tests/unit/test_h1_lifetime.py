"""A closed connection is freed by reference counting, not left to the cyclic collector.

Each test serves real loopback connections with :class:`HttpProtocol` on uvloop, with the
collector switched off, and then asks it what it would have had to collect: no object of
the HTTP protocol's (protocol, request cycle, cork, llhttp parser) may be in a reference
cycle once its connection ended and its task finished. Before, a dozen objects per
connection were, and a worker under new connections spent a few per cent of its CPU in
``gc`` (tests/bench measures nothing of that; this says why it cannot come back).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httptools
import pytest
import uvicorn
import uvloop

from appliance.engines import h1
from appliance.engines.h1 import HttpProtocol, ServingState, _hand_loss_over
from appliance.http.rules import HeadLimits

DEADLINE_S = 10.0


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"hi"})


async def _until_gone(scope: Any, receive: Any, send: Any) -> None:
    """A long poll: answers only when the client has gone (so never)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _ours(obj: object) -> bool:
    return type(obj).__module__ == h1.__name__ or isinstance(obj, httptools.HttpRequestParser)


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _cyclic_garbage() -> list[str]:
    """Our objects that only the collector could free (it keeps them in gc.garbage)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = sorted({type(obj).__qualname__ for obj in gc.garbage if _ours(obj)})
    gc.garbage.clear()
    gc.set_debug(0)
    return found


def _serve(
    app: Callable[..., Awaitable[None]],
    client: Callable[[int], Awaitable[None]],
    *,
    wsgi: bool = False,
    keep: list[HttpProtocol] | None = None,
) -> weakref.ref[HttpProtocol]:
    """Serve one connection of ``client`` until the server saw it end; its protocol, weakly
    (and in ``keep``, when given)."""
    made: list[weakref.ref[HttpProtocol]] = []

    async def main() -> None:
        config = uvicorn.Config(app, lifespan="off", proxy_headers=False, log_config=None)
        config.load()
        state = ServingState(limits=HeadLimits(), head_timeout_s=10, body_timeout_s=10)
        state.wsgi = wsgi
        lost = asyncio.Event()

        def factory() -> HttpProtocol:
            protocol = HttpProtocol(config, state, {})
            protocol.on_lost = lost.set
            made.append(weakref.ref(protocol))
            if keep is not None:
                keep.append(protocol)
            return protocol

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        await asyncio.wait_for(client(port), DEADLINE_S)
        await asyncio.wait_for(lost.wait(), DEADLINE_S)
        while state.tasks:  # the app's task ends after the connection did (a long poll)
            await asyncio.wait_for(asyncio.gather(*state.tasks), DEADLINE_S)
        server.close()
        await server.wait_closed()

    uvloop.run(main())
    (protocol,) = made
    return protocol


def _client(request: bytes, *, until_eof: bool) -> Callable[[int], Awaitable[None]]:
    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        if until_eof:
            await reader.read()  # the server closes
        else:
            await reader.readuntil(b"hi")
        writer.close()
        await writer.wait_closed()

    return client


KEEP_ALIVE = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("app", "request_bytes", "until_eof", "wsgi"),
    [
        pytest.param(_hello, KEEP_ALIVE * 2, False, False, id="keep-alive, client closes"),
        pytest.param(
            _hello,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            True,
            False,
            id="server closes",
        ),
        pytest.param(_hello, b"BAD\x00 / HTTP/1.1\r\n\r\n", True, False, id="refused"),
        pytest.param(_hello, KEEP_ALIVE * 2, False, True, id="wsgi probe in the scope"),
    ],
)
def test_a_connection_that_ended_leaves_nothing_for_the_collector(
    no_collector: None, app: Any, request_bytes: bytes, until_eof: bool, wsgi: bool
) -> None:
    protocol = _serve(app, _client(request_bytes, until_eof=until_eof), wsgi=wsgi)
    assert _cyclic_garbage() == []
    assert protocol() is None  # freed already, by reference counting


def test_a_request_whose_client_left_is_freed_when_its_app_returns(no_collector: None) -> None:
    async def leave(port: int) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(KEEP_ALIVE * 2)  # the second is queued behind the first (pipelined)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    protocol = _serve(_until_gone, leave)
    assert _cyclic_garbage() == []
    assert protocol() is None


def test_every_attribute_of_the_protocol_has_a_slot() -> None:
    """A connection's state lives in slots (see HttpProtocol.__slots__): an attribute set
    without one would give every connection an instance dict again."""
    kept: list[HttpProtocol] = []
    _serve(_hello, _client(KEEP_ALIVE * 2, until_eof=False), keep=kept)
    (protocol,) = kept
    assert vars(protocol) == {}


def test_a_handed_over_connection_reports_its_end_to_both_protocols_once() -> None:
    calls: list[str] = []

    class Old:
        def connection_lost(self, exc: Exception | None) -> None:
            calls.append("old")

    class New:
        def connection_lost(self, exc: Exception | None) -> None:
            calls.append("new")

    old, new = Old(), New()
    _hand_loss_over(old, new)  # type: ignore[arg-type]
    new.connection_lost(None)
    assert calls == ["new", "old"]
    # The chain let go of itself: ``new`` no longer refers to itself through it.
    assert "connection_lost" not in vars(new)
    new.connection_lost(None)
    assert calls == ["new", "old", "new"]
