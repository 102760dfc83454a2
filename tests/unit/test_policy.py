"""The master's decisions, step by step, without processes (DESIGN §2, STYLE §2.9)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from appliance.config.schema import Settings
from appliance.master import policy
from appliance.master.events import (
    ConfigRejected,
    Exit,
    Generation,
    Heartbeat,
    Kill,
    Log,
    Notify,
    ReloadOutcome,
    ReloadProgress,
    ReloadRequested,
    ScaleRequested,
    Spawn,
    StopRequested,
    Tick,
    WorkerBootFailed,
    WorkerDraining,
    WorkerExited,
    WorkerForked,
    WorkerReady,
)
from appliance.master.state import MasterState, Phase, WState


_WORKERS = dict(
    boot_timeout_s=30.0,
    heartbeat_timeout_s=10.0,
    graceful_timeout_s=20.0,
    backoff_initial_s=0.1,
    backoff_max_s=10.0,
    backoff_reset_s=30.0,
)
_SECTIONS = {"reload": ("surge",), "watchdog": ("min_healthy",), "app": ("preload",)}


def gen(target: int = 2, number: int = 1, digest: str = "", **kw: object) -> Generation:
    """A generation of ``target`` workers; keyword arguments name [workers] settings, or
    ``surge`` / ``min_healthy`` / ``preload`` of their own sections."""
    sections: dict[str, dict[str, object]] = {"workers": dict(_WORKERS)}
    for name, value in kw.items():
        section = next((sec for sec, names in _SECTIONS.items() if name in names), "workers")
        sections.setdefault(section, {})[name] = value
    settings = Settings.model_validate(sections)
    return Generation(
        number=number, settings=settings, digest=digest or f"d{number}", target=target
    )


class Sim:
    """Drives policy.step like the runtime does, with fake pids and a settable clock."""

    def __init__(
        self, g: Generation | None = None, watchdog: float | None = None, auto_drain: bool = True
    ) -> None:
        self.auto_drain = auto_drain  # answer SIGTERM with "draining", as a real worker does
        self.now = 100.0
        self.next_pid = 1000
        self.state = policy.initial_state(g or gen(), watchdog_interval_s=watchdog, now=self.now)
        self.actions: list[object] = []
        self.pids: dict[int, int] = {}
        self._apply(*policy.start(self.state, self.now))

    def _apply(self, state: MasterState, actions: list[object]) -> None:
        self.state = state
        self.actions.extend(actions)
        for a in actions:
            if isinstance(a, Spawn):
                self.next_pid += 1
                self.pids[a.key] = self.next_pid
                self.step(WorkerForked(a.key, self.next_pid))
            elif isinstance(a, Kill) and a.signal_name in ("SIGTERM", "SIGUSR2") and self.auto_drain:
                self.step(WorkerDraining(a.key))

    def step(self, event: object) -> list[object]:
        before = len(self.actions)
        self._apply(*policy.step(self.state, event, self.now))  # type: ignore[arg-type]
        return self.actions[before:]

    def at(self, t: float) -> None:
        self.now = t

    def workers(self, **match: object) -> list:
        return [w for w in self.state.workers if all(getattr(w, k) == v for k, v in match.items())]

    def ready_all(self) -> None:
        for w in self.workers(state=WState.BOOTING):
            self.step(WorkerReady(w.key))

    def notes(self, since: int = 0) -> list[str]:
        return [a.message for a in self.actions[since:] if isinstance(a, Notify)]

    def events(self, since: int = 0) -> list[str]:
        return [a.event for a in self.actions[since:] if isinstance(a, Log)]

    def exit_of(self, key: int, code: int | None = 0, sig: str | None = None) -> list[object]:
        return self.step(WorkerExited(key, code, sig))


def kills(actions: list[object]) -> list[tuple[int, str]]:
    return [(a.key, a.signal_name) for a in actions if isinstance(a, Kill)]


# --- start --------------------------------------------------------------------------------------


def test_start_spawns_the_pool_and_sends_ready_only_when_all_are_ready() -> None:
    sim = Sim(gen(target=3))
    assert [w.slot for w in sim.workers()] == [0, 1, 2]
    assert "READY=1" not in sim.notes()
    first, *rest = sim.workers()
    sim.step(WorkerReady(first.key))
    assert "READY=1" not in sim.notes()
    assert sim.state.status_text == "starting: 1/3 workers ready, generation 1"
    for w in rest:
        sim.step(WorkerReady(w.key))
    notes = sim.notes()
    assert notes[-2:] == ["STATUS=3/3 workers ready, generation 1", "READY=1"]
    assert sim.state.phase is Phase.RUNNING


# --- crashes and backoff ------------------------------------------------------------------------


def test_respawn_delay_grows_and_caps() -> None:
    delays = [policy.respawn_delay(n, 0.1, 2.0) for n in range(1, 9)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_crash_of_a_healthy_worker_is_replaced_at_once() -> None:
    sim = Sim()
    sim.ready_all()
    victim = sim.workers(slot=1)[0]
    out = sim.exit_of(victim.key, None, "SIGKILL")
    spawns = [a for a in out if isinstance(a, Spawn)]
    assert [(s.slot, s.generation.number) for s in spawns] == [(1, 1)]
    exited = [a for a in out if isinstance(a, Log) and a.event == "worker.exited"][0]
    assert dict(exited.fields)["reason"] == "crashed"
    assert dict(exited.fields)["signal"] == "SIGKILL"


def test_import_failure_loop_backs_off_never_hot() -> None:
    sim = Sim(gen(target=1, start_attempts=100))
    spawn_times = []
    for _ in range(8):
        (w,) = sim.workers()
        spawn_times.append(sim.now)
        sim.step(WorkerBootFailed(w.key, "importing app raised RuntimeError: boom"))
        sim.exit_of(w.key, 3)
        if not sim.workers():
            deadline = policy.next_deadline(sim.state)
            assert deadline is not None and deadline > sim.now
            sim.at(deadline)
            sim.step(Tick())
    gaps = [round(b - a, 3) for a, b in zip(spawn_times, spawn_times[1:])]
    assert gaps == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    logged = [a for a in sim.actions if isinstance(a, Log) and a.event == "worker.exited"]
    assert "boot failed: importing app raised RuntimeError: boom" in dict(logged[-1].fields)["reason"]
    assert "READY=1" not in sim.notes()


def test_failures_reset_after_healthy_uptime() -> None:
    sim = Sim(gen(target=1, start_attempts=100))
    for _ in range(3):  # three quick boot failures
        (w,) = sim.workers()
        sim.exit_of(w.key, 3)
        if not sim.workers():
            sim.at(policy.next_deadline(sim.state) or sim.now)
            sim.step(Tick())
    (w,) = sim.workers()
    sim.step(WorkerReady(w.key))
    sim.at(sim.now + 31)
    sim.step(Heartbeat(w.key, 5, 0))
    out = sim.exit_of(w.key, None, "SIGSEGV")
    assert any(isinstance(a, Spawn) for a in out), "replaced at once after a healthy run"


# --- hung workers -------------------------------------------------------------------------------


def test_silent_worker_gets_stack_dump_then_kill_then_replacement() -> None:
    sim = Sim(gen(target=1, heartbeat_timeout_s=5.0))
    sim.ready_all()
    (w,) = sim.workers()
    assert policy.next_deadline(sim.state) == pytest.approx(sim.now + 5.0)
    sim.at(sim.now + 5.0)
    out = sim.step(Tick())
    assert kills(out) == [(w.key, "SIGUSR1")]
    assert "worker.hung" in sim.events()
    sim.at(sim.now + policy.HANG_DUMP_GRACE_S)
    assert kills(sim.step(Tick())) == [(w.key, "SIGKILL")]
    out = sim.exit_of(w.key, None, "SIGKILL")
    assert [a.slot for a in out if isinstance(a, Spawn)] == [0]


def test_heartbeats_keep_a_worker_alive() -> None:
    sim = Sim(gen(target=1, heartbeat_timeout_s=5.0))
    sim.ready_all()
    (w,) = sim.workers()
    for _ in range(10):
        sim.at(sim.now + 4.0)
        assert not kills(sim.step(Heartbeat(w.key, 1, 0)))


def test_boot_timeout_kills_and_counts_as_failure() -> None:
    sim = Sim(gen(target=1, boot_timeout_s=3.0))
    (w,) = sim.workers()
    sim.at(sim.now + 3.0)
    assert kills(sim.step(Tick())) == [(w.key, "SIGKILL")]
    out = sim.exit_of(w.key, None, "SIGKILL")
    assert [a for a in out if isinstance(a, Spawn)]
    logged = [a for a in out if isinstance(a, Log) and a.event == "worker.exited"][0]
    assert dict(logged.fields)["reason"] == "boot timeout"


# --- stop ---------------------------------------------------------------------------------------


def test_sigterm_drains_then_kills_after_graceful_timeout_then_exits_0() -> None:
    sim = Sim(gen(target=2, graceful_timeout_s=20.0))
    sim.ready_all()
    out = sim.step(StopRequested("SIGTERM"))
    assert "STOPPING=1" in sim.notes()
    assert sorted(kills(out)) == sorted((w.key, "SIGTERM") for w in sim.workers())
    a, b = sim.workers()
    sim.exit_of(a.key, 0)
    assert not [x for x in sim.actions if isinstance(x, Spawn) and x.key > b.key]
    sim.at(sim.now + 20.0)
    assert kills(sim.step(Tick())) == [(b.key, "SIGKILL")]
    out = sim.exit_of(b.key, None, "SIGKILL")
    assert Exit(0) in out


def test_second_sigint_forces() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    sim.step(StopRequested("SIGINT"))
    (w,) = sim.workers()
    assert kills(sim.step(StopRequested("SIGINT", force=True))) == [(w.key, "SIGKILL")]


# --- reload -------------------------------------------------------------------------------------


def reload(sim: Sim, g: Generation, rid: int = 1, live_only: bool = False) -> list[object]:
    return sim.step(ReloadRequested(rid, g, live_only))


def test_rolling_reload_replaces_one_at_a_time_never_below_capacity() -> None:
    sim = Sim(gen(target=3))
    sim.ready_all()
    old = {w.key for w in sim.workers()}
    mark = len(sim.actions)
    reload(sim, gen(target=3, number=99))
    assert sim.notes(mark)[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert sim.state.current.number == 2  # the policy numbers generations
    for i in range(3):
        booting = sim.workers(state=WState.BOOTING)
        assert len(booting) == 1 and booting[0].generation == 2
        ready_serving = sim.workers(state=WState.READY)
        assert len(ready_serving) >= 3
        out = sim.step(WorkerReady(booting[0].key))
        drained = [k for k, s in kills(out) if s == "SIGUSR2"]
        assert len(drained) == 1 and drained[0] in old
        progress = [a for a in out if isinstance(a, ReloadProgress)]
        assert progress and progress[-1].replaced == i + 1
    assert sim.state.phase is Phase.RUNNING
    outcome = [a for a in sim.actions if isinstance(a, ReloadOutcome)]
    assert outcome[-1].ok and outcome[-1].request_ids == (1,)
    assert sim.notes()[-1] == "READY=1"
    for key in old:
        sim.exit_of(key, 0)
    assert {w.generation for w in sim.workers()} == {2}
    assert "worker.exited" in sim.events()


def test_reload_finishes_only_when_old_workers_stopped_accepting() -> None:
    sim = Sim(gen(target=1), auto_drain=False)
    sim.ready_all()
    (old,) = sim.workers()
    reload(sim, gen(target=1))
    sim.ready_all()
    assert sim.state.phase is Phase.RELOADING, "the old worker may still accept"
    out = sim.step(WorkerDraining(old.key))
    assert [a for a in out if isinstance(a, ReloadOutcome)][0].ok
    assert sim.state.phase is Phase.RUNNING


def test_reload_with_surge_two_boots_two_at_a_time() -> None:
    sim = Sim(gen(target=4))
    sim.ready_all()
    reload(sim, gen(target=4, surge=2))
    assert len(sim.workers(state=WState.BOOTING)) == 2


def test_reload_new_worker_fails_to_boot_aborts_and_old_keep_serving() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    old = {w.key for w in sim.workers()}
    reload(sim, gen(target=2))
    (new,) = sim.workers(state=WState.BOOTING)
    sim.step(WorkerBootFailed(new.key, "importing app raised SyntaxError"))
    out = sim.exit_of(new.key, 3)
    outcome = [a for a in out if isinstance(a, ReloadOutcome)][0]
    assert not outcome.ok and "SyntaxError" in outcome.message
    assert sim.state.phase is Phase.RUNNING
    assert sim.state.current.number == 1
    assert {w.key for w in sim.workers()} == old
    assert not [a for a in out if isinstance(a, Spawn)]
    notes = sim.notes()
    assert notes[-1] == "READY=1"
    assert any(n.startswith("STATUS=") and "reload failed" in n for n in notes)


def test_abort_after_partial_progress_rolls_back_replaced_slots() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    reload(sim, gen(target=2, boot_timeout_s=5.0))
    (n1,) = sim.workers(state=WState.BOOTING)
    sim.step(WorkerReady(n1.key))  # slot 0 replaced; old slot-0 worker draining
    (n2,) = sim.workers(state=WState.BOOTING)
    sim.at(sim.now + 5.0)
    sim.step(Tick())  # boot timeout -> SIGKILL
    out = sim.exit_of(n2.key, None, "SIGKILL")
    assert not [a for a in out if isinstance(a, ReloadOutcome)][0].ok
    # generation 1 again; the ready generation-2 worker in slot 0 is rolled back, not killed
    assert sim.state.current.number == 1
    spawns = [a for a in out if isinstance(a, Spawn)]
    assert [(s.slot, s.generation.number) for s in spawns] == [(0, 1)]
    assert (n1.key, "SIGKILL") not in kills(out)
    sim.step(WorkerReady(spawns[0].key))
    assert (n1.key, "SIGUSR2") in kills(sim.actions)


def test_invalid_config_on_reload_changes_nothing() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    before = sim.workers()
    mark = len(sim.actions)
    out = sim.step(ConfigRejected(7, "a.toml: workers.count: bad (got 0)"))
    notes = sim.notes(mark)
    assert notes[0].startswith("RELOADING=1")
    assert notes[1] == "STATUS=2/2 workers ready, generation 1; reload failed: a.toml: workers.count: bad (got 0)"
    assert notes[2] == "READY=1"
    assert [a for a in out if isinstance(a, ReloadOutcome)] == [
        ReloadOutcome((7,), False, 1, "a.toml: workers.count: bad (got 0)")
    ]
    assert sim.workers() == before


def test_live_only_reload_replaces_no_worker() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    before = sim.workers()
    out = reload(sim, gen(target=2, digest="new"), live_only=True)
    assert not [a for a in out if isinstance(a, Spawn)]
    assert sim.workers() == before
    assert [a for a in out if isinstance(a, ReloadOutcome)][0].ok


def test_reload_grows_and_shrinks_the_pool() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    reload(sim, gen(target=3))
    while sim.state.phase is Phase.RELOADING:
        sim.ready_all()
    assert len([w for w in sim.workers() if w.live and w.generation == 2]) == 3
    for w in sim.workers(state=WState.DRAINING):
        sim.exit_of(w.key, 0)
    reload(sim, gen(target=1), rid=2)
    while sim.state.phase is Phase.RELOADING:
        sim.ready_all()
    live = [w for w in sim.workers() if w.live]
    assert [(w.slot, w.generation) for w in live] == [(0, 3)]


def test_second_reload_during_reload_restarts_plan_and_answers_both() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    reload(sim, gen(target=2), rid=1)
    (b1,) = sim.workers(state=WState.BOOTING)
    out = reload(sim, gen(target=2), rid=2)
    # Superseded while booting: SIGUSR2 (a drain) (its "ready" may be in flight and it may be
    # accepting already; SIGKILL would reset those connections).
    assert (b1.key, "SIGUSR2") in kills(out)
    assert sim.state.current.number == 3
    sim.exit_of(b1.key, 0)
    while sim.state.phase is Phase.RELOADING:
        sim.ready_all()
    outcomes = [a for a in sim.actions if isinstance(a, ReloadOutcome)]
    assert len(outcomes) == 1 and outcomes[0].ok and outcomes[0].request_ids == (1, 2)
    assert {w.generation for w in sim.workers() if w.live} == {3}


def test_sigterm_during_reload_stops_cleanly_and_answers_waiters() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    reload(sim, gen(target=2), rid=5)
    out = sim.step(StopRequested("SIGTERM"))
    outcome = [a for a in out if isinstance(a, ReloadOutcome)][0]
    assert not outcome.ok and "stopping" in outcome.message
    for w in list(sim.workers()):
        out = sim.exit_of(w.key, 0)
    assert Exit(0) in out
    assert not [a for a in out if isinstance(a, Spawn)]


# --- scale and recycling ------------------------------------------------------------------------


def test_ttin_ttou_scale_the_pool() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    out = sim.step(ScaleRequested(1, delta=1))
    assert [a.slot for a in out if isinstance(a, Spawn)] == [2]
    sim.ready_all()
    out = sim.step(ScaleRequested(2, delta=-1))
    assert [k for k, s in kills(out) if s == "SIGUSR2"] == [sim.workers(slot=2)[0].key]


def test_max_requests_recycles_one_at_a_time_with_replacement_first() -> None:
    sim = Sim(gen(target=2, max_requests=100))
    sim.ready_all()
    a, b = sim.workers()
    out = sim.step(Heartbeat(a.key, 100, 0))
    out += sim.step(Heartbeat(b.key, 150, 0))
    spawns = [x for x in out if isinstance(x, Spawn)]
    assert len(spawns) == 1, "one at a time"
    assert not kills(out), "the old worker serves until its successor is ready"
    out = sim.step(WorkerReady(spawns[0].key))
    assert kills(out) == [(a.key, "SIGUSR2")]
    spawns = [x for x in out if isinstance(x, Spawn)]
    assert [s.slot for s in spawns] == [b.slot]


def test_max_requests_jitter_is_deterministic_and_bounded() -> None:
    values = {policy.max_requests_for(k, 1000, 50) for k in range(1, 200)}
    assert min(values) >= 1000 and max(values) <= 1050 and len(values) > 10
    assert policy.max_requests_for(5, 0, 50) == 0


# --- watchdog -----------------------------------------------------------------------------------


def test_watchdog_pings_while_healthy_and_stops_when_all_hung() -> None:
    sim = Sim(gen(target=2, heartbeat_timeout_s=5.0), watchdog=2.0)
    sim.ready_all()
    mark = len(sim.actions)
    for _ in range(2):
        sim.at(sim.now + 2.0)
        for w in sim.workers():
            sim.step(Heartbeat(w.key, 0, 0))
    assert sim.notes(mark).count("WATCHDOG=1") == 2
    mark = len(sim.actions)
    # no heartbeats any more: after the timeout nothing is healthy
    for _ in range(6):
        sim.at(sim.now + 2.0)
        sim.step(Tick())
    notes = sim.notes(mark)
    assert notes.count("WATCHDOG=1") <= 2
    assert "WATCHDOG=1" not in sim.notes(len(sim.actions) - 4)


def test_pool_healthy_respects_min_healthy() -> None:
    sim = Sim(gen(target=2, min_healthy=2, heartbeat_timeout_s=5.0))
    sim.ready_all()
    assert policy.pool_healthy(sim.state, sim.now)
    a, _ = sim.workers()
    sim.at(sim.now + 4.0)
    sim.step(Heartbeat(a.key, 0, 0))
    sim.at(sim.now + 2.0)
    assert not policy.pool_healthy(sim.state, sim.now)


def test_snapshot_shape() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    snap = policy.snapshot(sim.state, sim.now)
    assert snap["phase"] == "running" and snap["generation"] == 1 and snap["ready"] == 1
    assert snap["workers"][0]["state"] == "ready" and snap["reload"]["state"] == "idle"
