"""The master's decisions on the faults issue 9 found, one test per fault, no processes.

Each test is the shortest event history that reproduced the fault in a real master; it fails
on the policy as it was before the fix.
"""

from __future__ import annotations

from appliance.master import policy, rules
from appliance.master.events import (
    Exit,
    Heartbeat,
    Kill,
    Log,
    MasterStalled,
    Notify,
    ReloadRequested,
    ScaleOutcome,
    ScaleRequested,
    Spawn,
    StopRequested,
    Tick,
    WorkerBootFailed,
    WorkerExited,
    WorkerForked,
    WorkerReady,
)
from appliance.master.state import Phase, WState
from appliance.master.workers import Report, Verdict, judge

from test_policy import Sim, gen, kills  # type: ignore[import-not-found]


class LateForks(Sim):
    """A Sim whose fork reports queue behind events already waiting, as in the real runtime
    before the fix (the report of a fork was appended after a second SIGHUP's reload)."""

    def __init__(self, *args: object, **kw: object) -> None:
        self.queued: list[object] = []
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def _apply(self, state, actions):  # type: ignore[no-untyped-def]
        self.state = state
        self.actions.extend(actions)
        for a in actions:
            if isinstance(a, Spawn):
                self.next_pid += 1
                self.pids[a.key] = self.next_pid
                self.queued.append(WorkerForked(a.key, self.next_pid))

    def deliver_forks(self) -> list[object]:
        out: list[object] = []
        while self.queued:
            out += self.step(self.queued.pop(0))
        return out


def test_a_worker_superseded_before_its_fork_report_is_killed_when_the_pid_arrives() -> None:
    sim = LateForks(gen(target=1))
    sim.deliver_forks()
    sim.ready_all()
    sim.step(ReloadRequested(1, gen(target=1)))  # spawns the generation-2 worker
    sim.step(ReloadRequested(2, gen(target=1)))  # supersedes it before its pid is known
    (superseded,) = [w for w in sim.workers(generation=2)]
    assert superseded.state is WState.DRAINING and superseded.pid is None
    out = sim.deliver_forks()
    pid = sim.pids[superseded.key]
    assert (superseded.key, "SIGUSR2") in kills(out)
    assert [a.pid for a in out if isinstance(a, Kill) and a.key == superseded.key] == [pid]


def test_sigterm_stops_after_two_reloads_at_the_same_moment() -> None:
    sim = LateForks(gen(target=2, graceful_timeout_s=3.0))
    sim.deliver_forks()
    sim.ready_all()
    sim.step(ReloadRequested(1, gen(target=2)))
    sim.step(ReloadRequested(2, gen(target=2)))
    sim.deliver_forks()
    sim.step(StopRequested("SIGTERM"))
    # Every process the policy knows of has been signalled; reap them all.
    for w in list(sim.state.workers):
        if w.pid is not None:
            sim.step(WorkerExited(w.key, None, "SIGKILL"))
    assert any(isinstance(a, Exit) for a in sim.actions)


def test_a_killed_worker_that_is_never_reaped_gets_sigkill_again() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    (w,) = sim.workers()
    sim.step(StopRequested("SIGQUIT", force=True))
    sim.at(sim.now + rules.KILL_RESEND_S)
    out = sim.step(Tick())
    assert kills(out) == [(w.key, "SIGKILL")]
    assert "worker.kill_pending" in sim.events()


def test_heartbeats_read_in_one_batch_after_a_stall_keep_every_worker() -> None:
    """The runtime reads every waiting input, then ticks: deadlines are judged after."""
    sim = Sim(gen(target=2, heartbeat_timeout_s=2.0))
    sim.ready_all()
    a, b = sim.workers()
    sim.at(sim.now + 30.0)  # the master was SIGSTOPped; both workers kept beating
    assert not kills(sim.step(Heartbeat(a.key, 1, 0)))
    assert not kills(sim.step(Heartbeat(b.key, 1, 0)))
    assert not kills(sim.step(Tick()))
    assert "worker.hung" not in sim.events()


def test_a_stall_of_the_master_is_not_the_workers_fault() -> None:
    sim = Sim(gen(target=2, heartbeat_timeout_s=2.0, boot_timeout_s=5.0))
    sim.ready_all()
    sim.step(ReloadRequested(1, gen(target=2)))  # one new worker booting
    sim.at(sim.now + 30.0)
    out = sim.step(MasterStalled(30.0))
    out += sim.step(Tick())
    assert not kills(out)
    assert "master.stalled" in sim.events()
    # The forgiveness is one timeout, not forever: a worker still silent afterwards is hung.
    sim.at(sim.now + 2.0)
    assert ("SIGUSR1" in {name for _key, name in kills(sim.step(Tick()))})


def test_deadlines_are_judged_on_tick_only() -> None:
    sim = Sim(gen(target=1, heartbeat_timeout_s=2.0))
    sim.ready_all()
    (w,) = sim.workers()
    sim.at(sim.now + 10.0)
    assert not kills(sim.step(ScaleRequested(9, delta=0)))
    assert kills(sim.step(Tick())) == [(w.key, "SIGUSR1")]


def test_a_first_generation_that_never_boots_gives_up_with_status_3() -> None:
    sim = Sim(gen(target=2, start_attempts=3))
    for _ in range(20):
        if sim.state.phase is Phase.STOPPING:
            break
        booting = sim.workers(state=WState.BOOTING)
        for w in booting:
            sim.step(WorkerBootFailed(w.key, "ModuleNotFoundError: No module named 'myapp'"))
            sim.exit_of(w.key, 3)
        if not booting:  # waiting out the backoff
            sim.at(policy.next_deadline(sim.state) or sim.now)
            sim.step(Tick())
    assert sim.state.phase is Phase.STOPPING
    assert "master.start_failed" in sim.events()
    for w in list(sim.state.workers):
        sim.exit_of(w.key, None, "SIGKILL")
    (exit_,) = [a for a in sim.actions if isinstance(a, Exit)]
    assert exit_.code == rules.EXIT_START_FAILED == 3
    assert "READY=1" not in sim.notes()
    assert any("No module named 'myapp'" in n for n in sim.notes() if n.startswith("STATUS="))


def test_the_reason_a_boot_failed_is_in_the_status_while_starting() -> None:
    sim = Sim(gen(target=1, start_attempts=5))
    (w,) = sim.workers()
    sim.step(WorkerBootFailed(w.key, "line one\nline two"))
    sim.exit_of(w.key, 3)
    assert "last boot failed: line one line two" in sim.state.status_text
    assert policy.snapshot(sim.state, sim.now)["last_boot_error"] == "line one line two"


def test_one_ready_worker_means_boot_failures_are_retried_not_fatal() -> None:
    sim = Sim(gen(target=2, start_attempts=1))
    a, b = sim.workers()
    sim.step(WorkerReady(a.key))
    sim.step(WorkerBootFailed(b.key, "flaky"))
    sim.exit_of(b.key, 3)
    assert sim.state.phase is Phase.STARTING
    assert "master.start_failed" not in sim.events()


def test_a_worker_that_served_and_crashed_is_replaced_at_once_however_often() -> None:
    sim = Sim(gen(target=1, backoff_reset_s=1.0))
    sim.ready_all()
    for _ in range(10):
        (w,) = sim.workers()
        if w.state is WState.BOOTING:
            sim.step(WorkerReady(w.key))
        sim.at(sim.now + 3.0)  # killed every 3 s, as in the report
        out = sim.exit_of(w.key, None, "SIGKILL")
        assert any(isinstance(a, Spawn) for a in out), "replaced at once"


def test_quick_deaths_after_ready_still_back_off() -> None:
    sim = Sim(gen(target=1, backoff_reset_s=1.0))
    delays = []
    for _ in range(5):
        deadline = policy.next_deadline(sim.state)
        if not sim.workers(state=WState.BOOTING):
            sim.at(max(sim.now, deadline or sim.now))
            sim.step(Tick())
        (w,) = sim.workers(state=WState.BOOTING)
        sim.step(WorkerReady(w.key))
        sim.at(sim.now + 0.01)
        sim.exit_of(w.key, 1)
        delays.append(dict(next(a for a in reversed(sim.actions) if isinstance(a, Log)
                               and a.event == "worker.exited").fields)["respawn_in_s"])
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8]


def test_scale_honours_workers_min_and_max() -> None:
    sim = Sim(gen(target=2, min=1, max=3))
    sim.ready_all()
    out = sim.step(ScaleRequested(5, absolute=6))
    (outcome,) = [a for a in out if isinstance(a, ScaleOutcome)]
    assert not outcome.ok and "workers.max (3)" in outcome.message
    assert sim.state.target == 2
    out = sim.step(ScaleRequested(6, absolute=3))
    assert [a for a in out if isinstance(a, ScaleOutcome)][0].ok and sim.state.target == 3
    sim.step(ScaleRequested(7, delta=1))  # SIGTTIN at the bound
    assert sim.state.target == 3 and "pool.scale_refused" in sim.events()


def test_every_notify_is_one_well_formed_datagram() -> None:
    sim = Sim(gen(target=1))
    (w,) = sim.workers()
    sim.step(WorkerBootFailed(w.key, "pydantic.ValidationError:\nREADY=1\nfield required"))
    sim.exit_of(w.key, 3)
    for message in sim.notes():
        if message.startswith("STATUS="):
            assert "\n" not in message
    assert "READY=1" not in sim.notes()


def test_unexpected_reports_are_logged_not_absorbed() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    (w,) = sim.workers()
    sim.step(WorkerReady(w.key))  # a second "ready": impossible by the protocol
    logged = [a for a in sim.actions if isinstance(a, Log) and a.event == "worker.unexpected_report"]
    assert logged and dict(logged[0].fields)["report"] == "ready"


def test_the_table_decides_every_state_and_report() -> None:
    for state in WState:
        for report in Report:
            assert judge(state, report) in set(Verdict)
    assert judge(WState.KILLED, Report.FORKED) is Verdict.ADVANCE
    assert judge(WState.KILLED, Report.READY) is Verdict.LATE
    assert judge(WState.READY, Report.FORKED) is Verdict.UNEXPECTED


def test_status_text_is_bounded() -> None:
    from appliance import systemd

    assert len(systemd.status("x" * 100_000)) <= len("STATUS=") + systemd.STATUS_MAX
    assert "\n" not in systemd.status("a\nREADY=1")
    assert isinstance(Notify(systemd.ready()).message, str)
