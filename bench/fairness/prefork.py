"""Fairness prototype: a tiny pre-fork server to compare how accepted connections spread.

The master creates the listening socket(s), forks N children; each child runs uvicorn's
``Server`` on a uvloop loop with httptools on the inherited socket, with one of these
accept mechanisms (``--mech``):

  baseline       uvicorn/uvloop as is: libuv accepts until EAGAIN on every wake-up.
  single_accept  baseline with UV_TCP_SINGLE_ACCEPT=1 in the environment before the loop exists.
  reuseport      one SO_REUSEPORT socket per worker, bound by the master (bind-ourselves case).
  yield          our own acceptor on the shared socket: at most ONE accept per readiness
                 callback, then back to the loop (the other worker gets a turn).
  shm            our own acceptor + a shared-memory array of open-connection counts, one slot
                 per worker: a worker accepts only while its count is the lowest (ties
                 allowed); otherwise it stops watching the socket and looks again after
                 ``--recheck-ms`` (default: next loop iteration); after ``--max-defer-ms``
                 of deferring it accepts anyway
                 (so a stuck or busy peer can't stall accepts).

Run: python -m bench.fairness.prefork --mech shm --workers 2 --app cpu --port 8100
It prints "READY <pid> <pid>..." once every worker serves and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import os
import signal
import socket
import sys
import time
from typing import Any, Callable

MECHS = ("baseline", "single_accept", "reuseport", "yield", "shm")


def make_listener(host: str, port: int, reuseport: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(2048)
    s.set_inheritable(True)
    return s


class SharedCounts:
    """One int64 slot per worker in an anonymous shared mapping made before fork."""

    DEAD = 1 << 40

    def __init__(self, n: int) -> None:
        self.n = n
        self.mm = mmap.mmap(-1, 8 * n)
        self.view = memoryview(self.mm).cast("q")
        for i in range(n):
            self.view[i] = self.DEAD

    def lowest_others(self, me: int) -> int:
        v = self.view
        return min((v[i] for i in range(self.n) if i != me), default=self.DEAD)


class Acceptor:
    """Accepts from a non-blocking listening socket on the worker's loop, one per callback.

    Stands in for asyncio.Server towards uvicorn (close / wait_closed / sockets)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], Any],
                 sock: socket.socket, counts: SharedCounts | None, slot: int,
                 recheck_s: float, max_defer_s: float, batch: int = 1) -> None:
        self.loop, self.factory, self.sock = loop, factory, sock
        self.counts, self.slot = counts, slot
        self.recheck_s, self.max_defer_s, self.batch = recheck_s, max_defer_s, batch
        self.sockets = [sock]
        self.open = 0
        self.watching = False
        self.defer_since: float | None = None
        self.closed = False
        self._closed_fut: asyncio.Future[None] = loop.create_future()
        sock.setblocking(False)
        self._publish()
        self._watch()

    # -- connection counting -------------------------------------------------------------
    def _publish(self) -> None:
        if self.counts is not None:
            self.counts.view[self.slot] = self.open

    def _wrapped_factory(self) -> Any:
        proto = self.factory()
        orig_lost = proto.connection_lost

        def connection_lost(exc: BaseException | None) -> None:
            self.open -= 1
            self._publish()
            orig_lost(exc)

        proto.connection_lost = connection_lost
        return proto

    # -- accepting -----------------------------------------------------------------------
    def _watch(self) -> None:
        if not self.watching and not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self.watching = True

    def _unwatch(self) -> None:
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False

    def _may_accept(self) -> bool:
        if self.counts is None:
            return True
        if self.open <= self.counts.lowest_others(self.slot):
            self.defer_since = None
            return True
        now = time.monotonic()
        if self.defer_since is None:
            self.defer_since = now
        if now - self.defer_since >= self.max_defer_s:
            self.defer_since = None
            return True
        return False

    def _on_readable(self) -> None:
        for _ in range(self.batch):
            if not self._may_accept():
                self._unwatch()
                if self.recheck_s < 0.001:  # libuv timers have 1 ms resolution
                    self.loop.call_soon(self._watch)
                else:
                    self.loop.call_later(self.recheck_s, self._watch)
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.open += 1
            self._publish()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.loop.create_task(self._attach(conn))

    async def _attach(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self._wrapped_factory, conn)
        except Exception:
            self.open -= 1
            self._publish()
            conn.close()

    # -- asyncio.Server look-alike -------------------------------------------------------
    def close(self) -> None:
        self._unwatch()
        self.closed = True
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)

    async def wait_closed(self) -> None:
        await self._closed_fut

    def is_serving(self) -> bool:
        return not self.closed


def child_main(args: argparse.Namespace, sock: socket.socket, slot: int,
               counts: SharedCounts | None) -> None:
    if args.mech == "single_accept":
        os.environ["UV_TCP_SINGLE_ACCEPT"] = "1"
    import uvloop
    import uvicorn

    from bench.apps import asgi

    app = getattr(asgi, args.app)
    own = args.mech in ("yield", "shm")

    class Loop(uvloop.Loop):  # type: ignore[misc]
        async def create_server(self, protocol_factory: Any, *a: Any, sock: Any = None,
                                **kw: Any) -> Any:
            if own and sock is not None:
                return Acceptor(self, protocol_factory, sock,
                                counts if args.mech == "shm" else None, slot,
                                args.recheck_ms / 1000, args.max_defer_ms / 1000,
                                args.batch)
            return await super().create_server(protocol_factory, *a, sock=sock, **kw)

    class Server(uvicorn.Server):
        def install_signal_handlers(self) -> None:  # older uvicorn
            pass

        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # newer uvicorn
            yield

    config = uvicorn.Config(app, loop="none", http="httptools", lifespan="on",
                            log_level="warning", access_log=False)
    server = Server(config)
    loop = Loop()
    asyncio.set_event_loop(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    loop.run_until_complete(server.serve(sockets=[sock]))
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fairness prototype (see module doc)")
    ap.add_argument("--mech", choices=MECHS, default="baseline")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--app", choices=("hello", "cpu"), default="cpu")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--recheck-ms", type=float, default=0.0,
                    help="a deferring worker looks at the socket again after this long; "
                         "< 1 means on the next loop iteration (measured best)")
    ap.add_argument("--max-defer-ms", type=float, default=20.0,
                    help="after deferring this long a worker accepts anyway")
    ap.add_argument("--batch", type=int, default=1,
                    help="at most this many accepts per readiness callback (own acceptors)")
    args = ap.parse_args(argv)

    n = args.workers
    if args.mech == "reuseport":
        socks = [make_listener(args.host, args.port, True) for _ in range(n)]
    else:
        socks = [make_listener(args.host, args.port, False)] * n
    counts = SharedCounts(n) if args.mech == "shm" else None

    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                for j, s in enumerate(socks):
                    if j != i and s is not socks[i]:
                        s.close()
                child_main(args, socks[i], i, counts)
            finally:
                os._exit(1)
        pids.append(pid)

    stop = False

    def on_stop(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    # Ready when a connect succeeds (every child gets there within a few hundred ms).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((args.host, args.port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.3)
    print("READY " + " ".join(map(str, pids)), flush=True)
    while not stop and pids:
        try:
            pid, _ = os.waitpid(-1, 0)
            pids.remove(pid)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
