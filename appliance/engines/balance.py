"""Fair accepting: spread connections over workers that share one listening socket.

With a shared socket (the only kind systemd can pass), every worker's event loop is woken for
a new connection and the first one to run accepts everything waiting, so on a lightly loaded
pool one worker gets nearly every keep-alive connection and the others idle (measured: 75-100%
of connections on one of two workers; see bench/FAIRNESS.md). SO_REUSEPORT splits by a hash,
which is a coin toss at low connection counts and strands queued connections when a worker
exits during a reload; a master-side hand-off costs ~16 µs of master CPU per connection.

So each worker runs its own acceptor and the workers agree through a :class:`LoadBoard`, one
int64 per worker in shared memory (a memfd) made by the master before forking: a worker
accepts only while it has no more open connections than the least loaded other worker, and
accepts anyway after ``MAX_DEFER_S`` so that a stuck peer can never stall accepting.

Every worker is woken for each new connection and only one gets it, so a wake-up first asks
(a poll without waiting) whether a connection is still queued: a failed ``accept()`` costs about ten times
as much (5 µs against 0.5 µs measured here, most of it the exception), and an empty queue is
no reason to defer.

A worker that defers stops watching the socket: it is readable until a peer accepts, and a
readable socket wakes the loop on every iteration (measured under new-connection load: about
five wake-ups for nothing per connection, on the cores the peer and the clients need). It
looks again after ``LOOK_AGAIN_S``, or at once when one of its own connections closes (then it
may be the least loaded), whichever comes first.

Stopping and starting to watch happen many times a second under new-connection load (about
one defer for every three connections at 16 concurrent), so they are made cheap: the loop
watches, for the acceptor's whole life, a private epoll instance of its own (the *gate*) that
holds the listening socket, and watching means the socket's entry in the gate asks for input
or for nothing: one ``epoll_ctl`` each way. The loop's own ``add_reader``/``remove_reader``
would build and tear down a poll handle each time (an ``ioctl``, an ``EPOLL_CTL_ADD`` and two
``EPOLL_CTL_DEL`` in uvloop, and the objects around them).

When ``accept()`` fails for lack of a resource (EMFILE: this worker is out of file
descriptors; ENFILE, ENOBUFS, ENOMEM: the host is), the connection stays queued and the
listening socket stays readable, so simply returning would call us again at once, forever: a
worker at 100 % CPU serving nothing. Instead the acceptor stops watching the socket for a
back-off that grows from ``BACKOFF_INITIAL_S`` to ``BACKOFF_MAX_S`` while the failures persist
(:func:`accept_pause` decides), leaves its lane dead meanwhile so peers with descriptors to
spare take the queue, and logs ``worker.accept_failed`` once per episode and then at most
every ``LOG_EVERY_S``. Connections already open keep being served; each one that closes frees
the descriptor the next accept needs.

The acceptor also knows each connection's addresses without asking the kernel again:
``accept`` returned the peer's, and a listener bound to one address (not a wildcard, not a
unix socket) gives every connection the same local one. It hands both to the protocol as
``accepted_addresses`` (``(server, client)``, in the shape uvicorn gives ASGI), which saves
the loop's transport a socket object and three system calls per connection. On such a
listener it gives uvloop the bare descriptor (:class:`_Descriptor`), not a socket object,
whose constructor would ask the kernel for the address once more; and our protocols report a
connection's end through an ``on_lost`` hook, not a per-connection wrapper of
``connection_lost``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import resource
import select
import socket
import time
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

from appliance import log

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BACKOFF_INITIAL_S",
    "BACKOFF_MAX_S",
    "LOG_EVERY_S",
    "LOOK_AGAIN_S",
    "MAX_DEFER_S",
    "RESOURCE_ERRNOS",
    "Acceptor",
    "Addresses",
    "LoadBoard",
    "Readiness",
    "accept_pause",
    "fixed_local",
    "inet_address",
    "loop_factory",
    "may_accept",
]

#: Longest a worker waits for a less loaded peer before accepting anyway.
MAX_DEFER_S = 0.02
#: How soon a deferring worker looks at the socket and the board again.
LOOK_AGAIN_S = 0.001
#: accept() errors that mean "no resource for a new connection now", not "no connection".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Pause of accepting after the first resource failure of an episode; doubles per failure...
BACKOFF_INITIAL_S = 0.1
#: ... up to this, where it stays while the failures persist.
BACKOFF_MAX_S = 1.0
#: While an episode lasts, ``worker.accept_failed`` is repeated at most this often.
LOG_EVERY_S = 10.0
_DEAD = 1 << 40  # a lane nobody accepts for: never the minimum
_BATCH = 16  # most connections accepted per wake-up
_T = TypeVar("_T")
_WILDCARDS = frozenset({"0.0.0.0", "::"})

#: ``(server, client)`` of a connection as ASGI's scope carries them.
Addresses = tuple[tuple[str, int] | None, tuple[str, int] | None]


def inet_address(address: Any) -> tuple[str, int] | None:
    """``(host, port)`` of a socket address (pure): ``None`` for a unix socket's, which is a
    path or empty. The same rule as uvicorn's ``get_remote_addr``/``get_local_addr``."""
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else None


def fixed_local(listener_address: Any) -> tuple[bool, tuple[str, int] | None]:
    """Whether every connection a listener accepts has the same local address, and that
    address (pure). Not for a wildcard bind: a connection's local address is the one its
    client dialled."""
    local = inet_address(listener_address)
    if local is not None and local[0] in _WILDCARDS:
        return False, None
    return True, local


class Readiness(IntEnum):
    """What the pool says to balancers, as the master writes it into the board's last word.

    Only ``READY`` answers ``http.readiness_path`` with 200; the values are a wire format
    between the master and its workers (which may run an older generation's code), so they
    never change meaning.
    """

    STARTING = 0
    READY = 1
    DRAINED = 2
    MAINT = 3
    STOPPING = 4


class LoadBoard:
    """Open-connection counts per worker *lane*, shared by the master and all workers.

    Word 0 holds the number of lanes in use (the master raises it); lane ``i`` is word ``i+1``;
    the last word (``capacity + 1``) is the pool's :class:`Readiness`, which only the master
    writes (:meth:`set_readiness`) and workers read on every readiness request.
    The master claims a lane for each worker it forks and releases it when the worker is
    reaped; a lane reads as dead until its worker starts accepting and after it stops.
    Single aligned 8-byte stores are atomic on the platforms we run on, and a stale read only
    costs a slightly less even split, never correctness.
    """

    def __init__(self, capacity: int, fd: int | None = None) -> None:
        """A new board (the master), or with ``fd`` the one another process made.

        The memory is a memfd, so a process that was not forked after the board was made
        (the pre-forked first template, see :mod:`appliance.worker.template`) can map it from
        a descriptor passed to it. ``fd`` stays open as long as the board lives.
        """
        self.capacity = capacity
        size = 8 * (capacity + 2)
        if fd is None:
            fd = os.memfd_create("appliance-board", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            fresh = True
        else:
            fresh = False
        self.fd = fd
        self._mm = mmap.mmap(fd, size)
        self._view = memoryview(self._mm).cast("q")
        if fresh:
            for i in range(1, capacity + 1):
                self._view[i] = _DEAD
            self._view[capacity + 1] = Readiness.STARTING
        self._free = list(range(capacity - 1, -1, -1))

    # master side
    def claim(self) -> int | None:
        """A lane for a new worker (``None`` when full: that worker accepts unbalanced)."""
        if not self._free:
            return None
        lane = self._free.pop()
        self._view[lane + 1] = _DEAD
        self._view[0] = max(self._view[0], lane + 1)
        return lane

    def release(self, lane: int) -> None:
        self._view[lane + 1] = _DEAD
        self._free.append(lane)
        self._free.sort(reverse=True)

    def mark_dead(self, lane: int) -> None:
        """The worker is not accepting any more (hung, draining): do not wait for it."""
        self._view[lane + 1] = _DEAD

    def set_readiness(self, readiness: Readiness) -> None:
        self._view[self.capacity + 1] = readiness

    # both sides
    def readiness(self) -> Readiness:
        """The pool's state as the master last wrote it (an unknown value reads as STARTING)."""
        value = self._view[self.capacity + 1]
        try:
            return Readiness(value)
        except ValueError:
            return Readiness.STARTING

    # worker side
    def publish(self, lane: int, open_connections: int) -> None:
        self._view[lane + 1] = open_connections

    def lowest_other(self, lane: int) -> int:
        view = self._view
        used = view[0]
        lowest = _DEAD
        for i in range(1, used + 1):
            if i != lane + 1 and view[i] < lowest:
                lowest = view[i]
        return lowest

    def value(self, lane: int) -> int:
        return self._view[lane + 1]


def may_accept(
    open_connections: int, lowest_other: int, deferring_since: float | None, now: float
) -> tuple[bool, float | None]:
    """Whether to accept now, and since when we have been deferring (pure).

    Ties accept (both try; the kernel gives the connection to one, the other gets EAGAIN).
    """
    if open_connections <= lowest_other:
        return True, None
    if deferring_since is None:
        return False, now
    if now - deferring_since >= MAX_DEFER_S:
        return True, None
    return False, deferring_since


def accept_pause(failures: int, logged_at: float | None, now: float) -> tuple[float, bool]:
    """After the ``failures``-th resource failure in a row: how long to stop accepting, and
    whether to log it (pure).

    ``logged_at`` is when this episode was last logged (``None``: not yet). The pause doubles
    from ``BACKOFF_INITIAL_S`` to ``BACKOFF_MAX_S``: short enough that a freed descriptor is
    used soon, long enough that a persisting shortage costs a few wake-ups a second.
    """
    exponent = min(max(failures, 1) - 1, 16)
    delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0**exponent)
    return delay, logged_at is None or now - logged_at >= LOG_EVERY_S


def _open_fds(limit: int) -> int:
    """Descriptors this process has open.

    Listing ``/proc/self/fd`` needs a descriptor of its own. When that fails with EMFILE,
    every number below the soft limit is taken (that is what EMFILE means), so the answer is
    the limit; otherwise (ENFILE: the host is out) probe each number below the limit, at most
    once per log line.
    """
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the directory's own descriptor
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            return limit
    count = 0
    for fd in range(min(limit, 1 << 20)):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        count += 1
    return count


class _Counter:
    """Open connections of this worker across all its listening sockets."""

    def __init__(self, board: LoadBoard, lane: int) -> None:
        self.open = 0
        self.board = board
        self.lane = lane
        self.accepting = 0
        #: Acceptors of this worker waiting to look again (see Acceptor._defer).
        self.deferring: set[Acceptor] = set()

    def closed(self) -> None:
        """One of this worker's connections ended: publish, and let deferring acceptors look
        again now (this worker may have become the least loaded)."""
        self.open -= 1
        self.publish()
        if self.deferring:
            for acceptor in list(self.deferring):
                acceptor.look_again()

    def publish(self) -> None:
        if self.accepting:
            self.board.publish(self.lane, self.open)
        else:
            self.board.mark_dead(self.lane)

    def lowest_other(self) -> int:
        return self.board.lowest_other(self.lane)


def _kinded(base: type[_T], family: int, kind: int) -> type[_T]:
    """``base`` with this listener's family and type as plain class attributes: the loop
    reads both for every connection it attaches, and the properties of ``socket.socket``
    make an enum member each time."""
    return type(
        base.__name__,
        (base,),
        {"__slots__": (), "family": socket.AddressFamily(family), "type": socket.SocketKind(kind)},
    )


class _Descriptor:
    """An accepted connection's descriptor in the shape ``connect_accepted_socket`` reads:
    ``family``, ``type`` and ``fileno()``, and ``close()``, which the loop calls after libuv
    has closed the descriptor (so it only forgets the number: closing it again could close a
    newer connection that reused it).

    It stands in for a ``socket.socket`` where the acceptor needs nothing else from one (a
    listener with a fixed local address): that constructor asks the kernel for the address
    once more, and the object is made, detached and freed for every connection.
    """

    __slots__ = ("fd",)
    family: socket.AddressFamily
    type: socket.SocketKind

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.fd = -1

    def discard(self) -> None:
        """The loop never took the descriptor: close it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _dialled(conn: socket.socket) -> tuple[str, int] | None:
    """The local address of a connection on a wildcard listener: the one its client dialled."""
    try:
        return inet_address(conn.getsockname())
    except OSError:  # already reset: the transport finds out and closes
        return None


def _discard(conn: socket.socket | _Descriptor) -> None:
    if isinstance(conn, _Descriptor):
        conn.discard()
    else:
        conn.close()


class Acceptor:
    """Accepts connections for one listening socket on the worker's loop.

    Stands in for the ``asyncio.Server`` uvicorn expects from ``loop.create_server``
    (``close``, ``wait_closed``, ``is_serving``, ``sockets``). ``close`` stops watching the
    socket but never closes it: the master and the other workers (and systemd) share it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
        counter: _Counter,
        *,
        descriptors: bool = False,
    ) -> None:
        """``descriptors``: the loop is uvloop's, which takes a :class:`_Descriptor` where
        ``connect_accepted_socket`` wants a socket (asyncio's own loops need the socket)."""
        self._loop = loop
        self._factory = protocol_factory
        self._sock = sock
        self._fd = sock.fileno()
        self._counter = counter
        self._family, self._type, self._proto = int(sock.family), int(sock.type), sock.proto
        self._local_fixed, self._local = fixed_local(sock.getsockname())
        self._accepted = _kinded(socket.socket, self._family, self._type)
        self._descriptor = _kinded(_Descriptor, self._family, self._type)
        self._light = descriptors and self._local_fixed
        self._closed_one = counter.closed
        self._closed = False
        self._deferring_since: float | None = None
        # Resource failures (EMFILE...) in a row, since when, when last logged, and the
        # timer that resumes watching the socket while we are paused.
        self._failures = 0
        self._failing_since = 0.0
        self._logged_at: float | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._look: asyncio.TimerHandle | None = None  # while deferring
        self._watching = False
        self._done: asyncio.Future[None] = loop.create_future()
        self.sockets = [sock]
        sock.setblocking(False)
        # Readable when the listener is watched and has a connection queued (module doc).
        self._gate = select.epoll(1)
        self._gate.register(self._fd, 0)
        self._registered = True
        loop.add_reader(self._gate.fileno(), self._on_readable)
        counter.accepting += 1
        counter.publish()
        self._watch()

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            if self._registered:
                self._gate.modify(self._fd, select.EPOLLIN)
            else:
                self._gate.register(self._fd, select.EPOLLIN)
                self._registered = True

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._gate.modify(self._fd, 0)

    def _on_readable(self) -> None:
        if not self._watching:
            # The gate woke us for a socket we do not watch: epoll reports an error or a
            # hang-up whatever an entry asks for. Take the entry out until we watch again,
            # so that it cannot wake the loop on every iteration.
            if self._registered:
                self._gate.unregister(self._fd)
                self._registered = False
            return
        # Accept while we are (still) the least loaded, a few per wake-up: a burst of new
        # connections then costs one callback, not one per connection. Ask the gate first
        # whether one is waiting (we watch, so its entry asks for input): every worker is
        # woken for each connection and all but one find the queue empty, and so does the
        # last round of a batch; a failed accept() costs ten times a poll, most of it the
        # exception.
        for _ in range(_BATCH):
            if not self._gate.poll(0, 1):
                return  # nothing (left) to accept: another worker took it
            ok, self._deferring_since = may_accept(
                self._counter.open,
                self._counter.lowest_other(),
                self._deferring_since,
                time.monotonic(),
            )
            if not ok:
                self._defer()  # someone else is less loaded
                return
            try:
                fd, peer = self._sock._accept()  # type: ignore[attr-defined]  # no socket object yet
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # another worker took it, or the client gave up
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._pause(exc.errno)
                return  # anything else (EPROTO, EPERM from a firewall): that connection only
            if self._failures:
                self._recovered()
            self._counter.open += 1
            self._counter.publish()
            # uvloop's TCP transport sets TCP_NODELAY itself (test_balance checks it).
            conn: socket.socket | _Descriptor
            if self._light:
                conn, local = self._descriptor(fd), self._local
            else:
                conn = self._accepted(self._family, self._type, self._proto, fd)
                local = self._local if self._local_fixed else _dialled(conn)
            self._attach(conn, (local, inet_address(peer)))

    def _defer(self) -> None:
        """Stop watching the readable socket until :meth:`look_again` (module docstring)."""
        self._unwatch()
        self._counter.deferring.add(self)
        if self._look is None:
            self._look = self._loop.call_later(LOOK_AGAIN_S, self.look_again)

    def look_again(self) -> None:
        """Watch the socket again after deferring: on the timer, or when a connection of
        this worker closed. ``may_accept`` still knows since when we defer."""
        self._stop_looking()
        if not self._closed and self._resume is None:  # not closed, not paused
            self._watch()

    def _pause(self, code: int) -> None:
        """Out of descriptors or memory: stop watching the socket for a while (see the module
        docstring); the queued connections wait in the kernel's backlog or go to a peer."""
        now = time.monotonic()
        self._failures += 1
        if self._failures == 1:
            self._failing_since = now
        delay, log_it = accept_pause(self._failures, self._logged_at, now)
        self._stop_looking()
        self._unwatch()
        self._counter.accepting -= 1
        self._counter.publish()
        self._resume = self._loop.call_later(delay, self._resume_accepting)
        if log_it:
            self._logged_at = now
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.get_logger().warning(
                "worker.accept_failed",
                error=errno.errorcode.get(code, str(code)),
                open_fds=_open_fds(limit if limit != resource.RLIM_INFINITY else 1 << 20),
                limit=limit,
                connections=self._counter.open,
                failures=self._failures,
                paused_s=delay,
            )

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._closed:
            return
        self._counter.accepting += 1
        self._counter.publish()
        self._watch()

    def _stop_looking(self) -> None:
        self._counter.deferring.discard(self)
        if self._look is not None:
            self._look.cancel()
            self._look = None

    def _recovered(self) -> None:
        if self._logged_at is not None:
            log.get_logger().info(
                "worker.accept_resumed",
                failures=self._failures,
                failing_s=round(time.monotonic() - self._failing_since, 3),
            )
        self._failures = 0
        self._logged_at = None

    def _counting_factory(self, addresses: Addresses) -> asyncio.Protocol:
        """The protocol of a new connection, told its addresses and how to report its end.

        Our protocols (engines.h1) have an ``on_lost`` hook that ``connection_lost`` calls
        first; any other protocol gets its ``connection_lost`` wrapped."""
        protocol = self._factory()
        protocol.accepted_addresses = addresses  # type: ignore[attr-defined]
        if hasattr(protocol, "on_lost"):
            protocol.on_lost = self._closed_one
            return protocol
        closed, lost = self._closed_one, protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            closed()
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    def _attach(self, conn: socket.socket | _Descriptor, addresses: Addresses) -> None:
        """Give ``conn`` to the loop as a transport of our protocol.

        ``connect_accepted_socket`` is a coroutine that only waits for the transport to call
        ``connection_made``. It is stepped here by hand, now and when that wait is over,
        instead of in a task of its own: a task per connection cost more than the rest of
        the accept did.
        """
        factory = functools.partial(self._counting_factory, addresses)
        # A _Descriptor only on uvloop (see __init__), which reads no more than it has.
        self._step(self._loop.connect_accepted_socket(factory, conn), conn)  # type: ignore[arg-type]

    def _step(self, steps: Any, conn: socket.socket | _Descriptor, _waited: object = None) -> None:
        try:
            waiting = steps.send(None)
        except StopIteration:
            return  # attached
        except Exception:  # noqa: BLE001 - the peer vanished before we attached
            self._counter.closed()
            _discard(conn)
            return
        if waiting is None:  # a bare yield: go on at the next iteration
            self._loop.call_soon(self._step, steps, conn)
        else:
            waiting.add_done_callback(functools.partial(self._step, steps, conn))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_looking()
        self._unwatch()
        self._loop.remove_reader(self._gate.fileno())
        self._gate.close()  # the listener itself stays open: it is shared
        if self._resume is not None:  # paused: not counted as accepting
            self._resume.cancel()
            self._resume = None
        else:
            self._counter.accepting -= 1
            self._counter.publish()
        if not self._done.done():
            self._done.set_result(None)

    async def wait_closed(self) -> None:
        await self._done

    def is_serving(self) -> bool:
        return not self._closed


def loop_factory(board: LoadBoard, lane: int) -> Callable[[], asyncio.AbstractEventLoop]:
    """A uvloop factory whose ``create_server(sock=...)`` returns a balanced :class:`Acceptor`."""
    import uvloop  # here, not at the top: the master uses the board and must not load the loop

    counter = _Counter(board, lane)

    class _BalancedLoop(uvloop.Loop):
        async def create_server(
            self, protocol_factory: Any, *args: Any, sock: Any = None, **kw: Any
        ) -> Any:
            if sock is None:
                return await super().create_server(protocol_factory, *args, sock=sock, **kw)
            return Acceptor(self, protocol_factory, sock, counter, descriptors=True)

    return _BalancedLoop
