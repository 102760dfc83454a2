"""Every decision the master makes, as pure functions of (state, event, now).

``step(state, event, now) -> (state, actions)`` is the whole master: the runtime turns what
happened into an event, calls :func:`step`, and carries out the actions. Nothing here forks,
signals, reads a clock or touches a file, so every path (crash loops, hung workers, rolling
reloads and their aborts, coalesced reloads, TERM during a reload) is tested with plain pytest.

The pieces live beside it: :mod:`~appliance.master.rules` (every number), the worker state
machine as a table in :mod:`~appliance.master.workers`, and what the master reports about
itself in :mod:`~appliance.master.views`. sd_notify text comes only from the builders in
:mod:`appliance.systemd`.

Deadlines are judged only on :class:`Tick`, which the runtime sends after it has read every
input that was waiting: a worker is judged by what is in its pipe, not by the moment the master
happened to look (a master that was stopped or busy would otherwise find every heartbeat late).

Inside :func:`step` a private :class:`_Tx` collects changes with ordinary mutation and freezes
them into a new :class:`MasterState` at the end; callers only ever see immutable values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from appliance import systemd
from appliance.master import rules, workers
from appliance.master.events import (
    Action,
    ApplyLive,
    CancelSpawn,
    ConfigRejected,
    DrainOutcome,
    DrainRequested,
    Event,
    Exit,
    Generation,
    Heartbeat,
    Kill,
    Log,
    MasterStalled,
    Notify,
    ReloadOutcome,
    ReloadProgress,
    ReloadRequested,
    ScaleOutcome,
    ScaleRequested,
    Spawn,
    SpawnFailed,
    StopRequested,
    Tick,
    WorkerBootFailed,
    WorkerDraining,
    WorkerExited,
    WorkerForked,
    WorkerReady,
)
from appliance.master.rules import HANG_DUMP_GRACE_S, MAX_POOL, max_requests_for, respawn_delay
from appliance.master.state import (
    EXPECTED_CAUSES,
    Cause,
    LastReload,
    MasterState,
    Phase,
    ReloadRun,
    SlotHealth,
    Worker,
    WState,
)
from appliance.master.views import (
    agent_reply,
    fresh,
    pool_healthy,
    readiness,
    ready_fresh_slots,
    snapshot,
    status_text,
)
from appliance.master.workers import Report, Verdict

__all__ = [
    "HANG_DUMP_GRACE_S",
    "MAX_POOL",
    "agent_reply",
    "initial_state",
    "max_requests_for",
    "next_deadline",
    "pool_healthy",
    "readiness",
    "respawn_delay",
    "snapshot",
    "start",
    "status_text",
    "step",
]

_Level = Literal["debug", "info", "warning", "error"]


def _drain_signal(cause: Cause) -> Literal["SIGTERM", "SIGUSR2"]:
    """SIGTERM when the service stops, SIGUSR2 when a worker is replaced (reload, recycling,
    scaling): both drain, and the engine tells WebSocket clients which (1001 or 1012)."""
    return "SIGTERM" if cause is Cause.STOP else "SIGUSR2"


def next_deadline(state: MasterState) -> float | None:
    """The earliest time at which :func:`step` has something to do without any event."""
    candidates: list[float] = []
    for w in state.workers:
        d = workers.deadline(w)
        if d is not None:
            candidates.append(d)
    if state.phase is not Phase.STOPPING:
        occupied = {w.slot for w in state.workers if w.live}
        for slot, health in state.slots:
            if slot < state.target and slot not in occupied and health.next_spawn_at > 0:
                candidates.append(health.next_spawn_at)
    if state.watchdog_interval_s is not None:
        candidates.append(state.watchdog_next)
    if state.stop_at is not None and state.phase is not Phase.STOPPING:
        candidates.append(state.stop_at)
    return min(candidates) if candidates else None


# --- state construction -------------------------------------------------------------------------


def initial_state(
    generation: Generation,
    *,
    watchdog_interval_s: float | None,
    now: float,
    drained: bool = False,
    maint: bool = False,
) -> MasterState:
    """``drained``/``maint``: an operator's drain kept across a restart (the drain mark)."""
    return MasterState(
        phase=Phase.STARTING,
        current=generation,
        target=generation.target,
        next_generation=generation.number + 1,
        watchdog_interval_s=watchdog_interval_s,
        watchdog_next=now,
        started_at=now,
        drained=drained or maint,
        maint=maint,
    )


def start(state: MasterState, now: float) -> tuple[MasterState, list[Action]]:
    """The first step: fork the first generation."""
    tx = _Tx(state, now)
    tx.log(
        "info",
        "master.starting",
        generation=state.current.number,
        workers=state.target,
        config_digest=state.current.digest,
        preload=state.current.settings.app.preload,
    )
    return tx.finish(judge_deadlines=False)


def step(state: MasterState, event: Event, now: float) -> tuple[MasterState, list[Action]]:
    """Apply one event, then (on a :class:`Tick`) every deadline that passed, then reconcile."""
    tx = _Tx(state, now)
    match event:
        case Tick():
            pass
        case MasterStalled(seconds=seconds):
            tx.on_stalled(seconds)
        case WorkerForked(key=key, pid=pid):
            tx.on_forked(key, pid)
        case SpawnFailed(key=key, error=error):
            tx.on_spawn_failed(key, error)
        case WorkerReady(key=key):
            tx.on_ready(key)
        case WorkerDraining(key=key):
            tx.on_draining(key)
        case Heartbeat():
            tx.on_heartbeat(event)
        case WorkerBootFailed(key=key, error=error):
            tx.on_boot_failed(key, error)
        case WorkerExited():
            tx.on_exited(event)
        case StopRequested(signal_name=name, force=force):
            tx.on_stop(name, force=force)
        case ReloadRequested():
            tx.on_reload(event)
        case ConfigRejected(request_id=rid, error=error, source=source):
            tx.on_rejected(rid, error, source)
        case ScaleRequested():
            tx.on_scale(event)
        case DrainRequested():
            tx.on_drain(event)
    return tx.finish(judge_deadlines=isinstance(event, Tick))


# --- the transaction ----------------------------------------------------------------------------


class _Tx:
    """One step's working copy. Mutable on purpose, and never visible outside :func:`step`."""

    def __init__(self, state: MasterState, now: float) -> None:
        self.s = state
        self.now = now
        self.workers: dict[int, Worker] = {w.key: w for w in state.workers}
        self.slots: dict[int, SlotHealth] = dict(state.slots)
        self.actions: list[Action] = []

    # -- helpers

    def log(self, level: _Level, event: str, **fields: object) -> None:
        self.actions.append(Log(level, event, tuple(fields.items())))

    def notify(self, message: str) -> None:
        self.actions.append(Notify(message))

    def notify_status(self) -> None:
        self.notify(systemd.status(status_text(self._frozen())))

    def notify_ready(self) -> None:
        if self.s.leaving:
            return  # STOPPING=1 was sent (the drain delay): READY=1 would take it back
        self.notify(systemd.ready())
        self.s = replace(self.s, ready_sent=True)

    def notify_reloading(self) -> None:
        self.notify(systemd.reloading(int(self.now * 1_000_000)))

    def _wlog(self, level: _Level, event: str, w: Worker, **fields: object) -> None:
        self.log(level, event, worker_id=w.slot, pid=w.pid, generation=w.generation, **fields)

    def _signal(
        self,
        w: Worker,
        signal_name: Literal["SIGTERM", "SIGUSR2", "SIGKILL", "SIGUSR1"],
        cause: Cause,
        state: WState,
    ) -> None:
        if w.pid is not None:
            self.actions.append(Kill(w.key, w.pid, signal_name))
        elif w.state is WState.SPAWNING:
            # No pid yet: the spawn may still be queued (then it is dropped), or its fork
            # report is on its way (then on_forked delivers the signal this state stands for).
            self.actions.append(CancelSpawn(w.key))
        self.workers[w.key] = replace(
            w,
            state=state,
            cause=cause if w.cause is None or state is WState.DRAINING else w.cause,
            signalled_at=self.now,
        )

    def drain(self, w: Worker, cause: Cause) -> None:
        if w.state is WState.SPAWNING or w.state is WState.BOOTING:
            self.retire_unready(w, cause)
            return
        self._wlog("info", "worker.draining", w, reason=cause.value)
        self._signal(w, _drain_signal(cause), cause, WState.DRAINING)

    def retire_unready(self, w: Worker, cause: Cause) -> None:
        """Stop a worker that has not reported ready: SIGTERM, never SIGKILL.

        Its ``ready`` may be in flight: it may be accepting already, and SIGTERM lets it finish
        what it took (before the engine runs, the signal's default action ends it at once).
        """
        self._signal(w, _drain_signal(cause), cause, WState.DRAINING)

    def kill(self, w: Worker, cause: Cause) -> None:
        self._signal(w, "SIGKILL", cause, WState.KILLED)

    def spawn(self, slot: int) -> None:
        gen = self.s.current
        limits = gen.settings.workers
        key = self.s.next_key
        self.s = replace(self.s, next_key=key + 1)
        self.workers[key] = Worker(
            key=key,
            slot=slot,
            generation=gen.number,
            state=WState.SPAWNING,
            spawned_at=self.now,
            limits=limits,
            max_requests=max_requests_for(key, limits.max_requests, limits.max_requests_jitter),
        )
        self.actions.append(Spawn(key, slot, gen))

    def record_failure(self, w: Worker) -> float:
        """Count a failure against ``w``'s slot and return the respawn delay."""
        health = self.slots.get(w.slot, SlotHealth())
        limits = self.s.current.settings.workers
        ready_for = None if w.ready_at is None else self.now - w.ready_at
        failures = rules.failures_after(
            health.failures, ready_for_s=ready_for, reset_s=limits.backoff_reset_s
        )
        delay = respawn_delay(failures, limits.backoff_initial_s, limits.backoff_max_s)
        boot_failures = health.boot_failures + 1 if w.ready_at is None else 0
        self.slots[w.slot] = SlotHealth(
            failures=failures, next_spawn_at=self.now + delay, boot_failures=boot_failures
        )
        return delay

    def verdict(self, key: int, report: Report) -> Worker | None:
        """The worker ``key`` if ``report`` advances it; None (after logging what was wrong,
        if anything) when the report is late or impossible in its state."""
        w = self.workers.get(key)
        if w is None:
            # Reports for a key that is gone come from a pipe read after the reap: harmless.
            return None
        match workers.judge(w.state, report):
            case Verdict.ADVANCE:
                return w
            case Verdict.LATE:
                return None
            case Verdict.UNEXPECTED:
                self._wlog(
                    "error",
                    "worker.unexpected_report",
                    w,
                    report=report.value,
                    state=w.state.value,
                )
                return None

    # -- events

    def on_stalled(self, seconds: float) -> None:
        """Give every deadline back the time the master itself could not listen."""
        self.log("warning", "master.stalled", stalled_s=round(seconds, 3))
        for key, w in self.workers.items():
            self.workers[key] = replace(
                w,
                spawned_at=w.spawned_at + seconds,
                last_seen=None if w.last_seen is None else min(self.now, w.last_seen + seconds),
                signalled_at=None if w.signalled_at is None else w.signalled_at + seconds,
            )
        self.slots = {
            slot: replace(h, next_spawn_at=h.next_spawn_at + seconds) if h.next_spawn_at else h
            for slot, h in self.slots.items()
        }

    def on_forked(self, key: int, pid: int) -> None:
        w = self.workers.get(key)
        if w is None:
            # The policy never forgets a worker before its fork report; if it ever does, the
            # process must still not live on unowned.
            self.log("error", "worker.unexpected_report", pid=pid, report="forked", state="gone")
            self.actions.append(Kill(key, pid, "SIGKILL"))
            return
        if workers.judge(w.state, Report.FORKED) is not Verdict.ADVANCE:
            self._wlog("error", "worker.unexpected_report", w, report="forked", state=w.state)
            self.actions.append(Kill(key, pid, "SIGKILL"))
            self.workers[key] = replace(w, pid=pid, state=WState.KILLED, signalled_at=self.now)
            return
        if w.state in (WState.KILLED, WState.DRAINING):
            # Stopped before its pid was known (superseded, aborted, stopping, timed out):
            # deliver the signal that was decided then.
            name: Literal["SIGTERM", "SIGUSR2", "SIGKILL"] = (
                "SIGKILL" if w.state is WState.KILLED else _drain_signal(w.cause or Cause.STOP)
            )
            self.actions.append(Kill(key, pid, name))
            self.workers[key] = replace(w, pid=pid, signalled_at=self.now)
            return
        w = replace(w, pid=pid, state=WState.BOOTING)
        self.workers[key] = w
        self._wlog("info", "worker.spawned", w)

    def on_spawn_failed(self, key: int, error: str) -> None:
        """No worker came of a spawn: the fork failed, or the template could not boot (the
        app's import failed there). A boot failure like any other, short of a process."""
        w = self.verdict(key, Report.SPAWN_FAILED)
        if w is None:
            return
        del self.workers[key]
        if w.cause in EXPECTED_CAUSES:
            return  # superseded or stopping anyway
        error = rules.clamp_detail(error)
        self.s = replace(self.s, last_boot_error=error)
        run = self.s.reload
        if run is not None and w.generation == run.generation and self.s.phase is Phase.RELOADING:
            self._wlog("error", "worker.spawn_failed", w, error=error)
            self.abort_reload(f"new worker {w.slot} of generation {w.generation}: {error}")
            return
        if self.s.phase is Phase.STOPPING:
            return
        delay = self.record_failure(w)
        self._wlog("error", "worker.spawn_failed", w, error=error, respawn_in_s=delay)
        self.maybe_give_up()

    def on_ready(self, key: int) -> None:
        w = self.verdict(key, Report.READY)
        if w is None:
            return
        w = replace(w, state=WState.READY, ready_at=self.now, last_seen=self.now)
        self.workers[key] = w
        health = self.slots.get(w.slot)
        if health is not None and health.boot_failures:
            self.slots[w.slot] = replace(health, boot_failures=0)
        self.s = replace(self.s, ever_ready=True, last_boot_error=None)
        self._wlog("info", "worker.ready", w, boot_s=round(self.now - w.spawned_at, 4))

    def on_draining(self, key: int) -> None:
        w = self.verdict(key, Report.DRAINING)
        if w is not None:
            self.workers[key] = replace(w, accepting=False)

    def on_heartbeat(self, hb: Heartbeat) -> None:
        w = self.verdict(hb.key, Report.HEARTBEAT)
        if w is None:
            return
        w = replace(
            w,
            last_seen=self.now,
            requests=hb.requests,
            in_flight=hb.in_flight,
            rss_mb=hb.rss_mb,
        )
        limits = w.limits
        if w.state is WState.READY and w.retire is None:
            if w.max_requests and w.requests >= w.max_requests:
                w = replace(w, retire=f"served {w.requests} requests (max {w.max_requests})")
            elif limits.max_rss_mb and w.rss_mb > limits.max_rss_mb:
                w = replace(w, retire=f"RSS {w.rss_mb:.0f} MiB over max {limits.max_rss_mb} MiB")
            if w.retire is not None:
                self._wlog("info", "worker.recycling", w, reason=w.retire)
        self.workers[hb.key] = w

    def on_boot_failed(self, key: int, error: str) -> None:
        w = self.verdict(key, Report.BOOT_FAILED)
        if w is None:
            return
        error = rules.clamp_detail(error)
        self.workers[key] = replace(w, boot_error=error)
        self.s = replace(self.s, last_boot_error=error)
        self._wlog("error", "worker.boot_failed", w, error=error)

    def on_exited(self, ev: WorkerExited) -> None:
        w = self.workers.pop(ev.key, None)
        if w is None:
            return
        uptime = round(self.now - w.spawned_at, 3)
        fields: dict[str, object] = {"exit_code": ev.exit_code, "signal": ev.signal_name}
        if w.cause in EXPECTED_CAUSES:
            assert w.cause is not None
            self._wlog("info", "worker.exited", w, **fields, reason=w.cause.value, uptime_s=uptime)
            return
        never_ready = w.ready_at is None
        if w.boot_error is not None:
            reason = f"boot failed: {w.boot_error}"
        elif w.cause is not None:
            reason = w.cause.value
        elif never_ready:
            reason = "exited while booting"
        else:
            reason = "crashed"
        if never_ready:
            self.s = replace(self.s, last_boot_error=rules.clamp_detail(w.boot_error or reason))
        run = self.s.reload
        if (
            never_ready
            and run is not None
            and w.generation == run.generation
            and self.s.phase is Phase.RELOADING
        ):
            self._wlog("error", "worker.exited", w, **fields, reason=reason, uptime_s=uptime)
            self.abort_reload(f"new worker {w.slot} of generation {w.generation}: {reason}")
            return
        if self.s.phase is Phase.STOPPING:
            self._wlog("warning", "worker.exited", w, **fields, reason=reason, uptime_s=uptime)
            return
        delay = self.record_failure(w)
        health = self.slots[w.slot]
        self._wlog(
            "error" if never_ready else "warning",
            "worker.exited",
            w,
            **fields,
            reason=reason,
            uptime_s=uptime,
            failures=health.failures,
            respawn_in_s=delay,
        )
        self.maybe_give_up()

    def maybe_give_up(self) -> None:
        """Exit when the first generation can never boot (see :func:`rules.gives_up`)."""
        if self.s.phase is not Phase.STARTING:
            return
        attempts = self.s.current.settings.workers.start_attempts
        counts = [self.slots.get(slot, SlotHealth()).boot_failures for slot in range(self.s.target)]
        if not rules.gives_up(
            ever_ready=self.s.ever_ready, boot_failures=counts, attempts=attempts
        ):
            return
        cause = self.s.last_boot_error or "no worker could boot"
        self.log(
            "error",
            "master.start_failed",
            error=cause,
            attempts=attempts,
            exit_code=rules.EXIT_START_FAILED,
        )
        self.s = replace(
            self.s,
            phase=Phase.STOPPING,
            stop_started_at=self.now,
            exit_code=rules.EXIT_START_FAILED,
        )
        for w in list(self.workers.values()):
            if w.state is not WState.KILLED:
                self.kill(w, Cause.STOP)

    def on_stop(self, signal_name: str, *, force: bool) -> None:
        if self.s.phase is not Phase.STOPPING:
            delay = self.s.current.settings.workers.drain_delay_s
            if (
                self.s.stop_at is None
                and not force
                and delay > 0
                and self.s.ever_ready
                and not self.s.drained  # an operator's drain: balancers know already
            ):
                # Tell balancers first (agent drain, readiness 503) and keep serving while
                # they notice; the stop itself is a deadline (see check_deadlines).
                self.s = replace(self.s, stop_at=self.now + delay, stop_signal=signal_name)
                self.notify(systemd.stopping())
                self.log("info", "master.drain_delay", signal=signal_name, delay_s=delay)
            else:
                self.begin_stop(signal_name)
        if force:
            self.log("warning", "master.force_stop", signal=signal_name)
            for w in list(self.workers.values()):
                if w.state is not WState.KILLED:
                    self.kill(w, Cause.STOP)

    def begin_stop(self, signal_name: str) -> None:
        """Drain every worker and exit once they are gone (after the drain delay, if any)."""
        delayed = self.s.stop_at
        self.s = replace(self.s, phase=Phase.STOPPING, stop_started_at=self.now, stop_at=None)
        fields: dict[str, object] = {"signal": signal_name, "workers": len(self.workers)}
        if delayed is None:
            self.notify(systemd.stopping())
        else:
            fields["drain_delay"] = "skipped" if self.now < delayed else "served"
        self.log("info", "master.stopping", **fields)
        if self.s.reload is not None:
            self.finish_reload(ok=False, message="interrupted: the master is stopping")
        for w in list(self.workers.values()):
            if w.state in (WState.SPAWNING, WState.BOOTING, WState.READY, WState.HUNG):
                self._signal(w, "SIGTERM", Cause.STOP, WState.DRAINING)

    def on_reload(self, ev: ReloadRequested) -> None:
        phase = self.s.phase
        if self.s.leaving:
            self.actions.append(
                ReloadOutcome(
                    (ev.request_id,), False, self.s.current.number, "the master is stopping"
                )
            )
            return
        if self.s.ready_sent and phase is Phase.RUNNING:
            self.notify_reloading()
        self.actions.append(ApplyLive(ev.generation))
        if ev.live_only:
            self.s = replace(
                self.s,
                current=replace(ev.generation, number=self.s.current.number),
            )
            message = "applied live; no worker replaced"
            self.log("info", "reload.finished", generation=self.s.current.number, live=True)
            self.s = replace(
                self.s,
                last_reload=LastReload(True, self.s.current.number, message, self.now),
            )
            if phase is Phase.RUNNING and self.s.ready_sent:
                self.notify_ready()
            self.actions.append(
                ReloadOutcome((ev.request_id,), True, self.s.current.number, message)
            )
            return
        number = self.s.next_generation
        previous = self.s.reload.previous if self.s.reload is not None else self.s.current
        request_ids = (self.s.reload.request_ids if self.s.reload is not None else ()) + (
            ev.request_id,
        )
        if self.s.reload is not None:
            self.log(
                "info",
                "reload.coalesced",
                superseded_generation=self.s.current.number,
                generation=number,
            )
        new = replace(ev.generation, number=number)
        self.s = replace(
            self.s,
            current=new,
            target=new.target,
            next_generation=number + 1,
            phase=Phase.RELOADING,
            reload=ReloadRun(request_ids, number, previous, self.now),
        )
        # Workers still booting for an older generation would only be replaced again.
        for w in list(self.workers.values()):
            if w.state in (WState.SPAWNING, WState.BOOTING) and w.generation != number:
                self.retire_unready(w, Cause.SUPERSEDED)
        self.log(
            "info",
            "reload.started",
            generation=number,
            workers=new.target,
            source=ev.source,
            config_digest=new.digest,
        )

    def on_rejected(self, request_id: int, error: str, source: str) -> None:
        self.log("error", "reload.failed", error=error, source=source)
        outcome = ReloadOutcome((request_id,), False, self.s.current.number, error)
        if self.s.phase is Phase.RUNNING and self.s.ready_sent and not self.s.leaving:
            self.notify_reloading()
            self.s = replace(
                self.s,
                last_reload=LastReload(
                    False, self.s.current.number, rules.clamp_detail(error), self.now
                ),
            )
            self.notify_status()
            self.notify_ready()
        self.actions.append(outcome)

    def on_scale(self, ev: ScaleRequested) -> None:
        if self.s.leaving:
            self.actions.append(
                ScaleOutcome(ev.request_id, False, self.s.target, "the master is stopping")
            )
            return
        limits = self.s.current.settings.workers
        low, high = limits.min, min(limits.max, MAX_POOL)
        wanted = ev.absolute if ev.absolute is not None else self.s.target + ev.delta
        if not low <= wanted <= high:
            message = (
                f"workers must be between workers.min ({low}) and workers.max ({high}) "
                f"(got {wanted})"
            )
            self.log("warning", "pool.scale_refused", workers=wanted, min=low, max=high)
            self.actions.append(ScaleOutcome(ev.request_id, False, self.s.target, message))
            return
        if wanted != self.s.target:
            self.log("info", "pool.scaled", workers_from=self.s.target, workers=wanted)
            self.s = replace(self.s, target=wanted)
        self.actions.append(ScaleOutcome(ev.request_id, True, wanted, f"pool size set to {wanted}"))

    def on_drain(self, ev: DrainRequested) -> None:
        """Change what balancers are told; the pool itself is left alone.

        Draining while already drained (or undraining while not) is answered, not refused:
        an operator's ``drain; upgrade; undrain`` loop must be safe to run twice.
        """
        if self.s.leaving:
            self.actions.append(
                DrainOutcome(
                    ev.request_id,
                    False,
                    agent_reply(self._frozen()),
                    "the master is stopping: balancers are told drain until it exits",
                )
            )
            return
        before = "maint" if self.s.maint else "drain" if self.s.drained else None
        after = ("maint" if ev.maint else "drain") if ev.drain else None
        if before == after:
            message = f"already {'drained' if after else 'not drained'}"
        elif after is None:
            self.s = replace(self.s, drained=False, maint=False)
            self.log("info", "pool.undrained", was=before)
            message = "undrained: balancers may send new connections again"
        else:
            self.s = replace(self.s, drained=True, maint=after == "maint")
            self.log("info", "pool.drained", mode=after, was=before)
            message = "drained: balancers are told to send nothing new; the workers keep serving"
        agent = agent_reply(self._frozen())
        self.actions.append(
            DrainOutcome(ev.request_id, True, agent, f"{message} (agent-check: {agent})")
        )

    # -- reload bookkeeping

    def abort_reload(self, reason: str) -> None:
        run = self.s.reload
        assert run is not None
        aborted = self.s.current.number
        self.s = replace(self.s, current=run.previous, target=run.previous.target)
        for w in list(self.workers.values()):
            if w.generation == aborted and w.state in (WState.SPAWNING, WState.BOOTING):
                self.retire_unready(w, Cause.ABORT)
        self.finish_reload(ok=False, message=f"aborted: {rules.clamp_detail(reason)}")

    def finish_reload(self, *, ok: bool, message: str) -> None:
        run = self.s.reload
        assert run is not None
        gen = self.s.current.number
        self.log(
            "info" if ok else "error",
            "reload.finished" if ok else "reload.failed",
            generation=gen,
            message=message,
            duration_s=round(self.now - run.started_at, 3),
        )
        phase = self.s.phase if self.s.phase is Phase.STOPPING else Phase.RUNNING
        self.s = replace(
            self.s,
            phase=phase,
            reload=None,
            last_reload=LastReload(ok, gen, message, self.now),
        )
        self.actions.append(ReloadOutcome(run.request_ids, ok, gen, message))
        if phase is Phase.RUNNING:
            if not self.s.ready_sent:
                # A reload asked for while starting (a SIGHUP during start-up) finished first.
                self.log(
                    "info",
                    "master.ready",
                    generation=gen,
                    workers=self.s.target,
                    startup_s=round(self.now - self.s.started_at, 4),
                )
            if not ok:
                self.notify_status()
            self.notify_ready()

    # -- deadlines and reconciliation

    def check_deadlines(self) -> None:
        stop_at = self.s.stop_at
        if stop_at is not None and stop_at <= self.now and self.s.phase is not Phase.STOPPING:
            self.begin_stop(self.s.stop_signal or "SIGTERM")
        for w in list(self.workers.values()):
            deadline = workers.deadline(w)
            if deadline is None or deadline > self.now:
                continue
            limits = w.limits
            match w.state:
                case WState.SPAWNING | WState.BOOTING:
                    self._wlog("error", "worker.boot_timeout", w, timeout_s=limits.boot_timeout_s)
                    self.kill(w, Cause.BOOT_TIMEOUT)
                case WState.READY:
                    silent = round(self.now - (w.last_seen or w.spawned_at), 3)
                    self._wlog(
                        "error", "worker.hung", w, silent_s=silent, action="dump stack, kill"
                    )
                    self._signal(w, "SIGUSR1", Cause.HUNG, WState.HUNG)
                case WState.HUNG:
                    self.kill(w, Cause.HUNG)
                case WState.DRAINING:
                    self._wlog(
                        "warning", "worker.drain_timeout", w, timeout_s=limits.graceful_timeout_s
                    )
                    self.kill(w, w.cause or Cause.DRAIN)
                case WState.KILLED:
                    self._wlog(
                        "warning",
                        "worker.kill_pending",
                        w,
                        waited_s=round(self.now - (w.signalled_at or self.now), 3),
                    )
                    self.kill(w, w.cause or Cause.STOP)

    def reconcile(self) -> None:
        if self.s.phase is Phase.STOPPING:
            if not self.workers:
                code = self.s.exit_code or 0
                self.log(
                    "info",
                    "master.stopped",
                    uptime_s=round(self.now - self.s.started_at, 3),
                    exit_code=code,
                )
                self.actions.append(Exit(code))
                self.s = replace(self.s, exit_code=code)
            return
        gen = self.s.current.number
        target = self.s.target
        live = [w for w in self.workers.values() if w.live]
        booting = sum(1 for w in live if w.state in (WState.SPAWNING, WState.BOOTING))
        surge = max(1, self.s.current.settings.reload.surge)
        for slot in range(target):
            in_slot = [w for w in live if w.slot == slot]
            current = [w for w in in_slot if fresh(w, gen)]
            stale = [w for w in in_slot if not fresh(w, gen)]
            if any(w.state is WState.READY for w in current):
                for w in stale:
                    self.drain(w, Cause.RETIRE if w.generation == gen else Cause.DRAIN)
                continue
            if current:
                continue  # booting, or hung and about to be killed
            if any(
                w.slot == slot and w.cause in (Cause.BOOT_TIMEOUT, Cause.HUNG)
                for w in self.workers.values()
            ):
                continue  # killed for failing: its exit decides the backoff
            if stale:
                # Rolling replacement: the old worker serves until its successor is ready.
                if booting < surge and all(w.state is WState.READY for w in stale):
                    self.spawn(slot)
                    booting += 1
                continue
            health = self.slots.get(slot, SlotHealth())
            if health.next_spawn_at <= self.now:
                self.spawn(slot)
                booting += 1
        ready_slots = ready_fresh_slots(self.workers.values(), gen, target)
        full = len(ready_slots) == target
        if full:
            for w in live:
                if w.slot >= target:
                    self.drain(w, Cause.SCALE)
        self.slots = {k: v for k, v in self.slots.items() if k < target}
        run = self.s.reload
        if run is not None:
            replaced = len(ready_slots)
            if replaced > run.replaced:
                self.s = replace(self.s, reload=replace(run, replaced=replaced))
                self.actions.append(
                    ReloadProgress(
                        run.request_ids,
                        gen,
                        replaced,
                        target,
                        f"worker {replaced} of {target} ready in generation {gen}",
                    )
                )
            # Done when only the new generation takes connections: every old worker is gone,
            # killed, or has confirmed it closed its listening sockets.
            stale_left = any(
                not fresh(w, gen) and (w.live or (w.state is WState.DRAINING and w.accepting))
                for w in self.workers.values()
            )
            if full and not stale_left:
                self.finish_reload(
                    ok=True, message=f"generation {gen} serving with {target} workers"
                )
        elif self.s.phase is Phase.STARTING and full:
            self.s = replace(self.s, phase=Phase.RUNNING)
            self.log(
                "info",
                "master.ready",
                generation=gen,
                workers=target,
                startup_s=round(self.now - self.s.started_at, 4),
            )
            self.notify_status()
            self.notify_ready()

    def watchdog(self) -> None:
        interval = self.s.watchdog_interval_s
        if interval is None or self.now < self.s.watchdog_next:
            return
        if pool_healthy(self._frozen(), self.now):
            self.notify(systemd.watchdog())
            self.s = replace(self.s, watchdog_next=self.now + interval)
        else:
            # Ask again soon: recovering between two pings must not cost a missed deadline.
            self.s = replace(self.s, watchdog_next=self.now + interval / 4)

    def _frozen(self) -> MasterState:
        return replace(
            self.s,
            workers=tuple(sorted(self.workers.values(), key=lambda w: w.key)),
            slots=tuple(sorted(self.slots.items())),
        )

    def finish(self, *, judge_deadlines: bool) -> tuple[MasterState, list[Action]]:
        if judge_deadlines:
            self.check_deadlines()
        self.reconcile()
        text = status_text(self._frozen())
        if text != self.s.status_text:
            self.s = replace(self.s, status_text=text)
            note = Notify(systemd.status(text))
            if note not in self.actions:
                # systemd should see the new status no later than READY=1.
                ready = Notify(systemd.ready())
                at = self.actions.index(ready) if ready in self.actions else len(self.actions)
                self.actions.insert(at, note)
        # After the status: a ping that a recovery allows follows the status that says so.
        self.watchdog()
        return self._frozen(), self.actions
