"""Fair accepting: the pure decision and the shared board (engines/balance.py)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import resource
import select
import socket
from collections.abc import Callable

import pytest

from appliance.engines import balance
from appliance.engines.balance import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    LOG_EVERY_S,
    LOOK_AGAIN_S,
    MAX_DEFER_S,
    RESOURCE_ERRNOS,
    Acceptor,
    LoadBoard,
    _Counter,
    accept_pause,
    fixed_local,
    inet_address,
    may_accept,
)
from appliance.log import capture_logs


def test_least_loaded_accepts_and_ties_accept() -> None:
    assert may_accept(0, 0, None, 10.0) == (True, None)
    assert may_accept(1, 3, None, 10.0) == (True, None)


def test_busier_worker_defers_then_accepts_after_max_defer() -> None:
    ok, since = may_accept(3, 1, None, 10.0)
    assert (ok, since) == (False, 10.0)
    assert may_accept(3, 1, since, 10.0 + MAX_DEFER_S / 2) == (False, 10.0)
    assert may_accept(3, 1, since, 10.0 + 2 * MAX_DEFER_S) == (True, None)


def test_board_lanes_claim_release_and_dead_lanes_never_win() -> None:
    board = LoadBoard(capacity=4)
    a, b, c = board.claim(), board.claim(), board.claim()
    assert (a, b, c) == (0, 1, 2)
    board.publish(a, 5)
    # b and c have not started accepting: dead, so a sees nobody less loaded
    assert board.lowest_other(a) > 1_000_000
    board.publish(b, 2)
    assert board.lowest_other(a) == 2
    board.mark_dead(b)
    assert board.lowest_other(a) > 1_000_000
    board.release(b)
    assert board.claim() == b, "the lowest free lane is reused"


def test_board_is_shared_across_fork() -> None:
    board = LoadBoard(capacity=2)
    lane = board.claim()
    other = board.claim()
    board.publish(other, 7)
    pid = os.fork()
    if pid == 0:
        board.publish(lane, 3)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.value(lane) == 3
    assert board.lowest_other(other) == 3


# --- resource exhaustion (EMFILE and friends) --------------------------------------------------


def test_accept_pause_grows_from_initial_to_max_and_stays() -> None:
    delays = [accept_pause(n, None, 0.0)[0] for n in range(1, 9)]
    assert delays[0] == BACKOFF_INITIAL_S
    assert delays == sorted(delays), "never shorter while the failures persist"
    assert delays[-1] == BACKOFF_MAX_S
    assert accept_pause(10**6, None, 0.0)[0] == BACKOFF_MAX_S, "no overflow on a long episode"


def test_accept_pause_logs_once_per_episode_then_at_most_every_log_every_s() -> None:
    assert accept_pause(1, None, 100.0)[1] is True
    assert accept_pause(7, 100.0, 100.0 + LOG_EVERY_S / 2)[1] is False
    assert accept_pause(12, 100.0, 100.0 + LOG_EVERY_S)[1] is True


def _close(loop: asyncio.AbstractEventLoop, *sockets: socket.socket) -> None:
    """End a test's loop (whatever it still runs) and its sockets."""
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    for sock in sockets:
        sock.close()


def _wakes(acceptor: Acceptor) -> bool:
    """Whether the loop would call the acceptor now: its gate (the epoll instance the loop
    watches) is readable. Only meaningful while a connection is queued on the listener."""
    return bool(select.select([acceptor._gate.fileno()], [], [], 0)[0])


def _loop_watches(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    """Whether a selector loop watches ``fd`` (asking takes it out: the test's last look)."""
    return bool(loop.remove_reader(fd))


class _Plain(asyncio.Protocol):
    """A protocol that accepts connections and does nothing (the acceptor wraps its
    ``connection_lost``, which asyncio.Protocol's empty __slots__ would refuse)."""


class _FailingSocket(socket.socket):
    """A real listening socket (so the loop can watch it) whose accept() fails on demand."""

    fail_with: int | None = None
    calls = 0

    def _accept(self) -> tuple[int, object]:  # what the acceptor calls: no socket object yet
        self.calls += 1
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        return super()._accept()  # type: ignore[misc]


def _failing_listener() -> tuple[asyncio.AbstractEventLoop, _FailingSocket]:
    """A selector loop and a listening
    :class:`_FailingSocket` on 127.0.0.1."""
    loop = asyncio.SelectorEventLoop()
    listener = _FailingSocket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return loop, listener


@pytest.mark.parametrize("code", sorted(RESOURCE_ERRNOS))
def test_resource_failure_pauses_accepting_marks_lane_dead_logs_then_resumes(code: int) -> None:
    loop = asyncio.SelectorEventLoop()
    listener = _FailingSocket(socket.AF_INET, socket.SOCK_STREAM)
    client = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())
        board = LoadBoard(capacity=2)
        lane, other = board.claim(), board.claim()
        assert lane is not None and other is not None
        board.publish(other, 9)
        counter = _Counter(board, lane)
        acceptor = Acceptor(loop, _Plain, listener, counter)
        assert board.value(lane) == 0
        listener.fail_with = code
        with capture_logs() as captured:
            acceptor._on_readable()
        # One attempt, then the socket is no longer watched (no busy loop on a readable
        # socket) and peers see this lane as dead until the pause ends.
        assert listener.calls == 1
        assert not _wakes(acceptor), "the queued connection still wakes the loop"
        assert board.value(lane) > 1_000_000
        assert board.lowest_other(other) > 1_000_000
        pause = acceptor._resume
        assert pause is not None
        assert pause.when() - loop.time() == pytest.approx(BACKOFF_INITIAL_S, abs=0.05)
        [event] = captured
        assert event["event"] == "worker.accept_failed"
        assert event["log_level"] == "warning"
        assert event["error"] == errno.errorcode[code]
        assert event["limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert 0 < event["open_fds"] <= max(event["limit"], event["open_fds"])
        assert event["failures"] == 1 and event["paused_s"] == BACKOFF_INITIAL_S

        # The pause ends: watching again, lane alive; a second failure pauses longer and is
        # not logged again (same episode).
        pause.cancel()
        acceptor._resume_accepting()
        assert board.value(lane) == 0
        with capture_logs() as captured:
            acceptor._on_readable()
        assert captured == []
        assert acceptor._resume is not None
        assert acceptor._resume.when() - loop.time() == pytest.approx(
            2 * BACKOFF_INITIAL_S, abs=0.05
        )

        # Descriptors are back: the queued connection is accepted and the episode ends.
        acceptor._resume.cancel()
        acceptor._resume_accepting()
        listener.fail_with = None
        with capture_logs() as captured:
            acceptor._on_readable()
        assert counter.open == 1
        assert [e["event"] for e in captured] == ["worker.accept_resumed"]
        assert captured[0]["failures"] == 2
        gate = acceptor._gate.fileno()
        acceptor.close()
        assert board.value(lane) > 1_000_000
        assert not _loop_watches(loop, gate) and acceptor._gate.closed
    finally:
        _close(loop, client, listener)


def test_close_while_paused_neither_resumes_nor_double_counts() -> None:
    loop, listener = _failing_listener()
    try:
        board = LoadBoard(capacity=1)
        lane = board.claim()
        assert lane is not None
        counter = _Counter(board, lane)
        acceptor = Acceptor(loop, _Plain, listener, counter)
        client = socket.create_connection(listener.getsockname())
        listener.fail_with = errno.EMFILE
        with capture_logs():
            acceptor._on_readable()
        assert listener.calls == 1 and acceptor._resume is not None  # paused
        gate = acceptor._gate.fileno()
        acceptor.close()
        client.close()
        assert counter.accepting == 0 and acceptor._resume is None
        assert not acceptor.is_serving()
        acceptor._resume_accepting()  # a timer that fired anyway changes nothing
        assert counter.accepting == 0
        assert not _loop_watches(loop, gate) and not _loop_watches(loop, listener.fileno())
    finally:
        loop.close()
        listener.close()


def test_other_accept_errors_drop_that_connection_only() -> None:
    loop, listener = _failing_listener()
    try:
        board = LoadBoard(capacity=1)
        lane = board.claim()
        assert lane is not None
        acceptor = Acceptor(loop, _Plain, listener, _Counter(board, lane))
        client = socket.create_connection(listener.getsockname())
        listener.fail_with = errno.EPROTO
        with capture_logs() as captured:
            acceptor._on_readable()
        assert listener.calls == 1
        assert captured == [] and acceptor._resume is None
        assert _wakes(acceptor), "still watching"  # the connection is still queued
        client.close()
    finally:
        loop.close()
        listener.close()


def test_a_wake_up_with_nothing_queued_neither_accepts_nor_defers() -> None:
    """Every worker is woken for a connection that only one gets: the others ask (without
    waiting) and go back to waiting, without a failed accept() and without deferring, even
    when a peer is less loaded."""
    loop, listener = _failing_listener()
    try:
        board = LoadBoard(capacity=2)
        lane, other = board.claim(), board.claim()
        assert lane is not None and other is not None
        counter = _Counter(board, lane)
        acceptor = Acceptor(loop, _Plain, listener, counter)
        counter.open = 3  # busier than the peer (0): a queued connection would be deferred
        board.publish(other, 0)
        acceptor._on_readable()
        assert listener.calls == 0
        assert acceptor._look is None and not counter.deferring
        client = socket.create_connection(listener.getsockname())
        assert _wakes(acceptor), "still watching"
        client.close()
    finally:
        loop.close()
        listener.close()


# --- deferring, and what an accepted connection gets ------------------------------------------


def _busier_acceptor(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> tuple[LoadBoard, int, _Counter, Acceptor]:
    """An acceptor on ``listener`` whose worker has one connection open and whose one peer
    (lane ``other``) has none: a queued connection is deferred."""
    board = LoadBoard(capacity=2)
    lane, other = board.claim(), board.claim()
    assert lane is not None and other is not None
    board.publish(other, 0)
    counter = _Counter(board, lane)
    counter.open = 1
    return board, other, counter, Acceptor(loop, _Plain, listener, counter)


def test_a_deferring_acceptor_stops_watching_and_looks_again_on_its_timer_or_own_close() -> None:
    loop = asyncio.SelectorEventLoop()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        board, other, counter, acceptor = _busier_acceptor(loop, listener)
        assert _wakes(acceptor)
        acceptor._on_readable()
        # Deferring: the readable socket is not watched (no wake-up per loop iteration), the
        # connection stays queued for the peer, and a timer looks again soon.
        assert not _wakes(acceptor) and not acceptor._watching
        assert counter.open == 1 and acceptor in counter.deferring
        look = acceptor._look
        assert look is not None
        assert look.when() - loop.time() == pytest.approx(LOOK_AGAIN_S, abs=0.05)
        # One of our connections closes: we may be the least loaded now; look at once.
        counter.open += 1
        counter.closed()
        assert look.cancelled() and acceptor._look is None and not counter.deferring
        assert acceptor._watching and _wakes(acceptor)
        acceptor._on_readable()  # 1 open, the peer 0: defers again
        assert not acceptor._watching and acceptor._look is not None
        assert not _wakes(acceptor)
        acceptor.look_again()  # the timer
        assert acceptor._watching and _wakes(acceptor)
        board.publish(other, 5)
        acceptor._on_readable()  # now the least loaded: accepts the queued connection
        assert counter.open == 2 and acceptor._watching
        gate = acceptor._gate.fileno()
        acceptor.close()
        assert not acceptor._watching and acceptor._look is None
        acceptor.look_again()  # a timer that fired anyway watches nothing
        assert not _loop_watches(loop, gate) and not _loop_watches(loop, listener.fileno())
    finally:
        _close(loop, client, listener)


def test_a_gate_that_wakes_for_an_unwatched_socket_lets_go_of_it_until_watching_again() -> None:
    """epoll reports a hang-up whatever an entry asks for: a listener shut down while this
    worker defers must not wake its loop on every iteration (a worker at 100 % CPU)."""
    loop = asyncio.SelectorEventLoop()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        _, _, counter, acceptor = _busier_acceptor(loop, listener)
        acceptor._on_readable()
        assert not acceptor._watching and not _wakes(acceptor)
        calls = 0
        on_readable = acceptor._on_readable

        def counted() -> None:
            nonlocal calls
            calls += 1
            on_readable()

        loop.add_reader(acceptor._gate.fileno(), counted)  # the same callback, counted
        listener.shutdown(socket.SHUT_RDWR)  # a hang-up: reported even for an idle entry
        assert _wakes(acceptor)
        for _ in range(5):
            loop.run_until_complete(asyncio.sleep(0))
        assert calls == 1, "woken once, then the entry is out of the gate"
        assert not _wakes(acceptor) and counter.open == 1
        acceptor.look_again()  # watching again puts it back
        assert acceptor._watching and _wakes(acceptor)
        acceptor.close()
    finally:
        _close(loop, client, listener)


def test_socket_addresses_in_asgi_shape() -> None:
    assert inet_address(("10.0.0.1", 8000)) == ("10.0.0.1", 8000)
    assert inet_address(("::1", 8000, 0, 0)) == ("::1", 8000)
    assert inet_address("/run/appliance.sock") is None
    assert inet_address("") is None  # an unnamed unix peer


def test_only_a_listener_on_one_address_has_a_fixed_local_address() -> None:
    assert fixed_local(("127.0.0.1", 8000)) == (True, ("127.0.0.1", 8000))
    assert fixed_local(("::1", 8000, 0, 0)) == (True, ("::1", 8000))
    assert fixed_local("/run/appliance.sock") == (True, None)
    assert fixed_local(("0.0.0.0", 8000)) == (False, None)
    assert fixed_local(("::", 8000, 0, 0)) == (False, None)


def _what(fd: int) -> str | None:
    """What descriptor ``fd`` of this process is (``socket:[inode]``...), if it is open."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("descriptors", [False, True], ids=["socket", "descriptor"])
@pytest.mark.parametrize("hooked", [False, True], ids=["wrapped", "on_lost"])
def test_an_accepted_tcp_connection_reaches_its_protocol_with_nodelay_and_is_counted(
    descriptors: bool, hooked: bool
) -> None:
    """On uvloop, with the connection handed over as a socket object or as a bare descriptor
    (what the balanced loop does), to a protocol with an ``on_lost`` hook (ours) or without
    (its connection_lost is wrapped): same transport, same count, no descriptor left open."""
    import uvloop

    loop = uvloop.Loop()
    listener = socket.create_server(("127.0.0.1", 0))
    made: asyncio.Future[asyncio.Transport] = loop.create_future()
    lost: asyncio.Future[None] = loop.create_future()
    protocols: list[asyncio.Protocol] = []

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            protocols.append(self)
            made.set_result(transport)  # type: ignore[arg-type]

        def connection_lost(self, exc: Exception | None) -> None:
            if getattr(self, "on_lost", None) is not None:
                self.on_lost()
            lost.set_result(None)

    class Hooked(Protocol):
        def __init__(self) -> None:
            self.on_lost: Callable[[], object] | None = None

    try:
        board = LoadBoard(capacity=1)
        lane = board.claim()
        assert lane is not None
        counter = _Counter(board, lane)
        acceptor = Acceptor(
            loop, Hooked if hooked else Protocol, listener, counter, descriptors=descriptors
        )
        client = socket.create_connection(listener.getsockname())
        transport = loop.run_until_complete(asyncio.wait_for(made, 10))
        sock = transport.get_extra_info("socket")
        accepted = sock.fileno(), _what(sock.fileno())
        # We no longer set it ourselves: uvloop's TCP transport does.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getpeername() == client.getsockname()
        # What accept() said, handed to the protocol: ASGI's (server, client).
        assert protocols[0].accepted_addresses == (  # type: ignore[attr-defined]
            listener.getsockname(),
            client.getsockname(),
        )
        assert ("connection_lost" in vars(protocols[0])) is not hooked
        assert counter.open == 1 and board.value(lane) == 1
        client.close()
        loop.run_until_complete(asyncio.wait_for(lost, 10))
        assert counter.open == 0 and board.value(lane) == 0
        del transport, sock, protocols[:]
        gc.collect()
        assert _what(accepted[0]) != accepted[1]  # closed (its number may be reused)
        acceptor.close()
    finally:
        loop.close()
        listener.close()


def test_a_descriptor_the_loop_never_took_is_closed_once() -> None:
    """The protocol factory failed: the acceptor closes the descriptor; one that the loop
    took and closed (close() called) is never closed again (the number may be reused)."""
    import uvloop

    loop = uvloop.Loop()
    listener = socket.create_server(("127.0.0.1", 0))

    def broken() -> asyncio.Protocol:
        raise RuntimeError("the app's protocol factory failed")

    try:
        board = LoadBoard(capacity=1)
        lane = board.claim()
        assert lane is not None
        counter = _Counter(board, lane)
        acceptor = Acceptor(loop, broken, listener, counter, descriptors=True)
        client = socket.create_connection(listener.getsockname())
        client.settimeout(10)
        acceptor._on_readable()
        assert counter.open == 0 and board.value(lane) == 0
        assert client.recv(1) == b""  # our end was closed
        client.close()
        acceptor.close()
    finally:
        loop.close()
        listener.close()

    fd = socket.socket().detach()
    taken = balance._kinded(balance._Descriptor, socket.AF_INET, socket.SOCK_STREAM)(fd)
    taken.close()  # what uvloop calls after libuv closed it: forget the number only
    assert taken.fileno() == -1
    taken.discard()  # nothing left to close...
    os.close(fd)  # ... so the number was still ours
