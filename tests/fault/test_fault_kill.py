"""Faults by signal: kill -9 of workers and of the master, SIGSTOP of a worker and of the master.

Each test: one fault under load, then the invariants of faults.Subject (master alive, pool
settled with nothing leaked, SIGTERM stops it within graceful + margin).
"""

from __future__ import annotations

import os
import signal
import time

from faults import (
    HEARTBEAT_TIMEOUT_S,
    MARGIN_S,
    Deadline,
    fault_config,
    poll_until,
    proc_state,
    session_members,
    under_load,
)

_LOAD_THREADS = 4  # harness.Load(keepalive=2, fresh=2): at most one request in flight each


def test_kill_9_of_each_worker_loses_only_its_in_flight_requests(subject, figures):
    s = subject()
    kills = 4
    with under_load(s, keepalive=2, fresh=2) as load:
        load.wait_requests(100)
        for _ in range(kills):
            victim = s.worker_pids()[0]
            mark = s.logs.mark()
            os.kill(victim, signal.SIGKILL)
            exited = s.logs.wait_for("worker.exited", since=mark, pid=victim)
            assert exited["signal"] == "SIGKILL"
            s.logs.wait_for("worker.ready", since=mark, worker_id=exited["worker_id"])
            load.wait_requests(100)
        s.assert_alive()
    assert len(load.failures) <= kills * _LOAD_THREADS, load.failures
    s.settled()
    s.stop_within()


def test_kill_9_of_the_master_takes_its_workers_and_a_restart_serves(subject, figures):
    s = subject()
    workers = s.worker_pids()
    with under_load(s, counted=False) as load:  # every request after the kill may fail
        load.wait_requests(100)
        os.kill(s.pid, signal.SIGKILL)
        s.master.wait(10)
        # The workers see EOF on the master's pipe, drain and exit within the graceful timeout.
        poll_until(
            "workers gone after kill -9 of the master",
            lambda: not session_members(s.pid),
            s.graceful_s + MARGIN_S,
            lambda: f"still running: {session_members(s.pid)} (workers were {workers})",
        )
    # systemd's Restart=on-failure: a new master on the same config (stale control socket).
    again = subject(s.config)
    assert again.master.get("/")[0] == 200
    again.settled()
    again.stop_within()


def test_sigstop_of_a_worker_gets_it_killed_as_hung_and_replaced(subject, figures):
    s = subject()
    with under_load(s) as load:
        load.wait_requests(100)
        victim = s.worker_pids()[0]
        mark = s.logs.mark()
        os.kill(victim, signal.SIGSTOP)
        hung = s.logs.wait_for(
            "worker.hung", since=mark, pid=victim, timeout=HEARTBEAT_TIMEOUT_S + 10
        )
        exited = s.logs.wait_for("worker.exited", since=mark, pid=victim)
        assert exited["signal"] == "SIGKILL"
        s.logs.wait_for("worker.ready", since=mark, worker_id=hung["worker_id"])
        load.wait_requests(100)
    # Only requests on the stopped worker's connections may fail.
    assert len(load.failures) <= _LOAD_THREADS, load.failures
    s.settled()
    s.stop_within()


def test_sigstop_of_the_master_beyond_the_heartbeat_timeout_kills_no_healthy_worker(
    subject, figures
):
    """The stall was the master's: after SIGCONT its workers' heartbeats are all in the pipes,
    so none of them is hung (known bug 4: they were killed)."""
    s = subject()
    workers = s.worker_pids()
    with under_load(s) as load:
        load.wait_requests(100)
        mark = s.logs.mark()
        s.master.signal(signal.SIGSTOP)
        poll_until("master stopped", lambda: proc_state(s.pid) == "T", 5)
        # The fault itself: the master stays stopped for longer than heartbeat_timeout_s.
        time.sleep(HEARTBEAT_TIMEOUT_S + 1.0)
        load.wait_requests(50)  # the workers kept serving without their master
        s.master.signal(signal.SIGCONT)
        # Nothing may happen: a bounded wait for a worker.hung that must not come.
        try:
            hung = s.logs.wait_for("worker.hung", since=mark, timeout=HEARTBEAT_TIMEOUT_S + 1.0)
        except Deadline:
            hung = None
        assert hung is None, (
            f"a healthy worker was killed as hung after SIGCONT: {hung}\n{s.tail(40)}"
        )
        assert not s.logs.find("worker.exited", since=mark)
        load.wait_requests(100)
    assert load.failures == []
    assert s.settled() and s.worker_pids() == workers
    s.stop_within()


def test_sigterm_with_a_stopped_worker_still_stops_within_graceful_plus_margin(
    subject, workdir, figures
):
    """A worker that cannot drain (stopped; hang detection out of the way) is killed at
    graceful_timeout_s, so the stop is bounded."""
    s = subject(fault_config(workdir, workers={"heartbeat_timeout_s": 600}))
    victim = s.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    poll_until("worker stopped", lambda: proc_state(victim) == "T", 5)
    s.stop_within()
