"""Descriptor exhaustion and slowloris.

The master runs under a small RLIMIT_NOFILE (``faults.limit_nofile``: soft = hard, so raising
the soft limit to the hard one at start changes nothing), inherited by its workers. Issue 9,
item 9: out of descriptors, a worker spun at ~100 % CPU in its accept path and served nothing,
logging nothing.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
from collections import Counter

import pytest
from faults import (
    SCALE,
    cpu_share,
    fault_config,
    fd_kinds,
    http_get,
    limit_nofile,
    poll_until,
    under_load,
)

#: A process in a busy loop shows ~1.0; a paused or idle one ~0.0.
_SPIN_SHARE = 0.5


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` client connections that never send a byte (non-blocking connects: beyond the
    listen backlog a connect would otherwise wait for its SYN retries)."""
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        assert err in (0, errno.EINPROGRESS), os.strerror(err)
        socks.append(sock)
    return socks


def _closed_by_server(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server closed (readable with nothing to read)."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    closed = 0
    for fd, _mask in poller.poll(0):
        try:
            if by_fd[fd].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def _fds_back(pids: list[int], base: dict[int, Counter[str]], timeout: float) -> None:
    """Each worker's descriptors are back at its baseline, but for the one libuv keeps in
    reserve for its EMFILE trick: ``/dev/null``, opened with the loop's first connection, and
    ``/`` once the trick has used it."""

    def extra(pid: int) -> dict[str, int]:
        now, was = fd_kinds(pid), base[pid]
        diff = {k: now[k] - was[k] for k in set(now) | set(was) if now[k] != was[k]}
        reserve = diff.pop("/dev/null", 0) + diff.pop("/", 0)
        if reserve not in (0, 1):
            diff["/dev/null and /"] = reserve
        return diff

    poll_until(
        "worker descriptors back at their baseline",
        lambda: not any(extra(p) for p in pids),
        timeout,
        lambda: str({p: extra(p) for p in pids}),
    )


@pytest.mark.parametrize("accept", ["balanced", "kernel"])
def test_a_worker_out_of_descriptors_does_not_spin_and_serves_again(
    subject, workdir, figures, accept
):
    s = subject(fault_config(workdir, http={"accept": accept}), prefix=limit_nofile(SCALE.nofile))
    with s.watching():
        workers = s.worker_pids()
        base = {p: fd_kinds(p) for p in workers}
        mark = s.logs.mark()
        idle = _open_idle(s.port, SCALE.idle_clients)
        try:
            if accept == "balanced":
                # Each worker says once that it is out of descriptors, and pauses accepting.
                for pid in workers:
                    event = s.logs.wait_for("worker.accept_failed", since=mark, pid=pid, timeout=10)
                    assert event["error"] == "EMFILE" and event["limit"] == SCALE.nofile, event
                    assert event["open_fds"] >= SCALE.nofile - 1, event
            else:
                # uvloop's own accept path (libuv): wait until a worker is at the limit.
                poll_until(
                    "a worker at its descriptor limit",
                    lambda: any(sum(fd_kinds(p).values()) >= SCALE.nofile - 1 for p in workers),
                    20,
                    lambda: str({p: sum(fd_kinds(p).values()) for p in workers}),
                )
            shares = cpu_share([*workers, s.pid], window_s=1.0)
            figures.notes["cpu_share"] = {str(k): round(v, 2) for k, v in shares.items()}
            spinning = {pid: share for pid, share in shares.items() if share > _SPIN_SHARE}
            assert not spinning, f"busy at the descriptor limit (CPU share of a core): {spinning}"
            s.assert_alive()
            assert s.control.status()["phase"] == "running"
            figures.notes["closed_by_server"] = _closed_by_server(idle)
            if accept == "balanced":
                assert len(s.logs.find("worker.accept_failed", since=mark)) <= 2 * len(workers)
        finally:
            for sock in idle:
                sock.close()
        # The descriptors come back as the idle clients go (with "kernel", a connection that
        # arrives while a worker is still at its limit is shed: wait for them to come back).
        poll_until(
            "workers below their descriptor limit again",
            lambda: all(sum(fd_kinds(p).values()) < SCALE.nofile - 8 for p in workers),
            20,
            lambda: str({p: sum(fd_kinds(p).values()) for p in workers}),
        )
        assert http_get(s.port, timeout=15)[0] == 200
        with under_load(s) as load:
            load.wait_requests(200)
        assert load.failures == []
        if accept == "balanced":
            s.logs.wait_for("worker.accept_resumed", since=mark)
        assert s.worker_pids() == workers, "a worker was replaced"
        _fds_back(workers, base, 20)
        s.settled()
        s.stop_within()


def test_the_master_out_of_descriptors_survives_control_clients_and_a_worker_kill(
    subject, workdir, figures
):
    """The master's own accept (control socket) and fork (a pipe per worker) need
    descriptors too: at the limit it must neither crash nor spin, and recover after."""
    s = subject(prefix=limit_nofile(SCALE.nofile))
    with s.watching():
        crowd: list[socket.socket] = []
        try:
            for _ in range(SCALE.nofile + 32):
                try:
                    crowd.append(s.control.connect(timeout=1.0))
                except OSError:
                    break  # the master's accept queue is full too: saturated
            figures.notes["control_clients"] = len(crowd)
            poll_until(
                "the master at its descriptor limit",
                lambda: not s.alive() or sum(fd_kinds(s.pid).values()) >= SCALE.nofile - 1,
                10,
                lambda: f"{sum(fd_kinds(s.pid).values())} open",
            )
            s.assert_alive()
            victim = _any_worker(s)
            mark = s.logs.mark()
            os.kill(victim, signal.SIGKILL)
            s.logs.wait_for("worker.exited", since=mark, pid=victim, timeout=10)
            shares = cpu_share([s.pid], window_s=1.0)
            figures.notes["master_cpu_share"] = round(shares[s.pid], 2)
            s.assert_alive()
            assert shares[s.pid] < _SPIN_SHARE, f"master busy at its limit: {shares}"
        finally:
            for sock in crowd:
                sock.close()
        s.logs.wait_for("worker.ready", since=mark, timeout=20)
        assert s.control.status()["phase"] == "running"
        assert http_get(s.port, timeout=10)[0] == 200
        s.settled()
        s.stop_within()


def _any_worker(s) -> int:
    """A worker pid from the master's log (the control socket may have no descriptor left)."""
    pids = s.master.worker_pids()
    assert pids, "no worker known"
    return pids[0]


def test_slowloris_connections_do_not_starve_other_clients(subject, figures):
    s = subject()
    with s.watching():
        workers = s.worker_pids()
        base = {p: fd_kinds(p) for p in workers}
        held: list[socket.socket] = []
        try:
            for _ in range(SCALE.connections):
                sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ")  # and never the rest
                held.append(sock)
            figures.notes["held"] = len(held)
            with under_load(s) as load:
                load.wait_requests(300, timeout=60)
            assert _closed_by_server(held) == 0, "slow clients were cut off"
        finally:
            for sock in held:
                sock.close()
        assert load.failures == []
        assert s.worker_pids() == workers
        _fds_back(workers, base, 30)
        s.settled()
        s.stop_within()
