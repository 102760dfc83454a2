"""Every decision the master makes, as pure functions of (state, event, now).

``step(state, event, now) -> (state, actions)`` is the whole master: the runtime turns what
happened into an event, calls :func:`step`, and carries out the actions. Nothing here forks,
signals, reads a clock or touches a file, so every path (crash loops, hung workers, rolling
reloads and their aborts, coalesced reloads, TERM during a reload) is tested with plain pytest.

Inside :func:`step` a private :class:`_Tx` collects changes with ordinary mutation and freezes
them into a new :class:`MasterState` at the end; callers only ever see immutable values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from appliance.master.events import (
    Action,
    ApplyLive,
    ConfigRejected,
    Event,
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
    SpawnFailed,
    StopRequested,
    Tick,
    WorkerBootFailed,
    WorkerDraining,
    WorkerExited,
    WorkerForked,
    WorkerReady,
)
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

__all__ = [
    "HANG_DUMP_GRACE_S",
    "MAX_POOL",
    "initial_state",
    "max_requests_for",
    "next_deadline",
    "pool_healthy",
    "respawn_delay",
    "snapshot",
    "start",
    "status_text",
    "step",
]

#: Time between asking a hung worker for its stack (SIGUSR1) and SIGKILL: long enough for
#: faulthandler to write a few hundred frames, short enough not to matter to anyone waiting.
HANG_DUMP_GRACE_S = 1.0
#: Upper bound for ``appliance scale`` / SIGTTIN, matching the schema's limit on workers.count.
MAX_POOL = 1024


# --- pure numeric decisions ---------------------------------------------------------------------


def respawn_delay(failures: int, initial_s: float, maximum_s: float) -> float:
    """Delay before respawning a slot after its ``failures``-th recent failure.

    The first failure is replaced at once: one crash after a healthy run is an accident, and
    the replacement should answer within milliseconds. From the second on the delay doubles
    from ``initial_s`` up to ``maximum_s``, so an app that raises at import costs a few forks a
    second at first and one every ``maximum_s`` after that: never a hot loop. No jitter: the
    slots of one master are not a thundering herd against a shared resource.
    """
    if failures <= 1:
        return 0.0
    return min(maximum_s, initial_s * 2.0 ** (failures - 2))


def max_requests_for(key: int, max_requests: int, jitter: int) -> int:
    """This worker's request budget: ``max_requests`` plus a per-worker spread in ``[0, jitter]``.

    The spread is derived from the worker key (Knuth's multiplicative hash) rather than a random
    generator, so the policy stays deterministic while workers spawned together still retire at
    different times.
    """
    if max_requests <= 0:
        return 0
    if jitter <= 0:
        return max_requests
    return max_requests + (key * 2654435761) % (jitter + 1)


def _healthy(w: Worker, now: float) -> bool:
    return (
        w.state is WState.READY
        and w.last_seen is not None
        and now - w.last_seen <= w.heartbeat_timeout_s
    )


def pool_healthy(state: MasterState, now: float) -> bool:
    """Whether the master may tell systemd's watchdog that all is well.

    Starting and stopping are governed by systemd's own start/stop timeouts, so only the
    master's liveness matters then. Otherwise at least ``min_healthy`` workers (capped at the
    pool size) must be READY and heartbeating within their timeout.
    """
    if state.phase in (Phase.STARTING, Phase.STOPPING):
        return True
    need = min(state.current.min_healthy, state.target)
    return sum(1 for w in state.workers if _healthy(w, now)) >= need


def _worker_deadline(w: Worker) -> float | None:
    match w.state:
        case WState.SPAWNING | WState.BOOTING:
            return w.spawned_at + w.boot_timeout_s
        case WState.READY:
            assert w.last_seen is not None
            return w.last_seen + w.heartbeat_timeout_s
        case WState.HUNG:
            assert w.signalled_at is not None
            return w.signalled_at + HANG_DUMP_GRACE_S
        case WState.DRAINING:
            assert w.signalled_at is not None
            return w.signalled_at + w.graceful_timeout_s
        case _:
            return None


def next_deadline(state: MasterState) -> float | None:
    """The earliest time at which :func:`step` has something to do without any event."""
    candidates: list[float] = []
    for w in state.workers:
        d = _worker_deadline(w)
        if d is not None:
            candidates.append(d)
    if state.phase is not Phase.STOPPING:
        occupied = {w.slot for w in state.workers if w.live}
        for slot, health in state.slots:
            if slot < state.target and slot not in occupied and health.next_spawn_at > 0:
                candidates.append(health.next_spawn_at)
    if state.watchdog_interval_s is not None:
        candidates.append(state.watchdog_next)
    return min(candidates) if candidates else None


# --- state construction -------------------------------------------------------------------------


def initial_state(
    generation: Generation, *, watchdog_interval_s: float | None, now: float
) -> MasterState:
    return MasterState(
        phase=Phase.STARTING,
        current=generation,
        target=generation.target,
        next_generation=generation.number + 1,
        watchdog_interval_s=watchdog_interval_s,
        watchdog_next=now,
        started_at=now,
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
        preload=state.current.preload,
    )
    return tx.finish()


def step(state: MasterState, event: Event, now: float) -> tuple[MasterState, list[Action]]:
    """Apply one event, then every deadline that has passed, then reconcile the pool."""
    tx = _Tx(state, now)
    match event:
        case Tick():
            pass
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
    return tx.finish()


# --- views --------------------------------------------------------------------------------------


def _fresh(w: Worker, generation: int) -> bool:
    return w.generation == generation and w.retire is None


def _ready_fresh_slots(state_workers: Iterable[Worker], generation: int, target: int) -> set[int]:
    return {
        w.slot
        for w in state_workers
        if w.state is WState.READY and _fresh(w, generation) and w.slot < target
    }


def status_text(state: MasterState) -> str:
    """The one line systemd shows (``STATUS=``) and ``appliance status`` starts with."""
    gen = state.current.number
    ready = len(_ready_fresh_slots(state.workers, gen, state.target))
    if state.phase is Phase.STOPPING:
        live = sum(1 for w in state.workers if w.state is not WState.KILLED)
        return f"stopping, {live} workers finishing"
    text = f"{ready}/{state.target} workers ready, generation {gen}"
    if state.phase is Phase.RELOADING and state.reload is not None:
        text = f"reloading to generation {gen}: {ready}/{state.target} workers replaced"
    elif state.phase is Phase.STARTING:
        text = f"starting: {text}"
    if state.phase is Phase.RUNNING and state.last_reload is not None and not state.last_reload.ok:
        text += f"; reload failed: {state.last_reload.message}"
    return text


def snapshot(state: MasterState, now: float) -> dict[str, Any]:
    """The status document served on the control socket (times relative to ``now``)."""
    last = state.last_reload
    run = state.reload
    return {
        "phase": state.phase.value,
        "generation": state.current.number,
        "target": state.target,
        # Serving capacity: ready workers of any generation (old ones serve during a reload).
        "ready": sum(1 for w in state.workers if w.state is WState.READY),
        "config_digest": state.current.digest,
        "status": state.status_text,
        "uptime_s": round(now - state.started_at, 3),
        "workers": [
            {
                "id": w.slot,
                "pid": w.pid,
                "generation": w.generation,
                "state": w.state.value,
                "uptime_s": round(now - w.spawned_at, 3),
                "requests": w.requests,
                "in_flight": w.in_flight,
                "rss_mb": round(w.rss_mb, 1),
                **({"retiring": w.retire} if w.retire else {}),
            }
            for w in sorted(state.workers, key=lambda w: (w.slot, w.generation, w.key))
        ],
        "reload": {
            "state": "in_progress" if run is not None else "idle",
            **(
                {}
                if run is None
                else {
                    "generation": run.generation,
                    "replaced": run.replaced,
                    "total": state.target,
                    "running_s": round(now - run.started_at, 3),
                }
            ),
            "last": None
            if last is None
            else {
                "ok": last.ok,
                "generation": last.generation,
                "message": last.message,
                "error": None if last.ok else last.message,
                "age_s": round(now - last.finished_at, 3),
            },
        },
    }


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

    def log(self, level: Any, event: str, **fields: Any) -> None:
        self.actions.append(Log(level, event, tuple(fields.items())))

    def notify(self, message: str) -> None:
        self.actions.append(Notify(message))

    def _wlog(self, level: Any, event: str, w: Worker, **fields: Any) -> None:
        self.log(level, event, worker_id=w.slot, pid=w.pid, generation=w.generation, **fields)

    def _signal(self, w: Worker, signal_name: Any, cause: Cause, state: WState) -> None:
        if w.pid is not None:
            self.actions.append(Kill(w.key, w.pid, signal_name))
        self.workers[w.key] = replace(
            w,
            state=state,
            cause=cause if w.cause is None or state is WState.DRAINING else w.cause,
            signalled_at=self.now,
        )

    def drain(self, w: Worker, cause: Cause) -> None:
        if w.state is WState.SPAWNING or w.state is WState.BOOTING:
            # Not serving anything yet: nothing to drain.
            self.kill(w, cause)
            return
        self._wlog("info", "worker.draining", w, reason=cause.value)
        self._signal(w, "SIGTERM", cause, WState.DRAINING)

    def kill(self, w: Worker, cause: Cause) -> None:
        self._signal(w, "SIGKILL", cause, WState.KILLED)

    def spawn(self, slot: int) -> None:
        gen = self.s.current
        key = self.s.next_key
        self.s = replace(self.s, next_key=key + 1)
        self.workers[key] = Worker(
            key=key,
            slot=slot,
            generation=gen.number,
            state=WState.SPAWNING,
            spawned_at=self.now,
            boot_timeout_s=gen.boot_timeout_s,
            heartbeat_timeout_s=gen.heartbeat_timeout_s,
            graceful_timeout_s=gen.graceful_timeout_s,
            max_requests=max_requests_for(key, gen.max_requests, gen.max_requests_jitter),
            max_rss_mb=gen.max_rss_mb,
        )
        self.actions.append(Spawn(key, slot, gen))

    def record_failure(self, w: Worker, reason: str) -> float:
        """Count a failure against ``w``'s slot and return the respawn delay."""
        health = self.slots.get(w.slot, SlotHealth())
        failures = health.failures
        if w.ready_at is not None and self.now - w.ready_at >= self.s.current.backoff_reset_s:
            failures = 0
        failures += 1
        delay = respawn_delay(
            failures, self.s.current.backoff_initial_s, self.s.current.backoff_max_s
        )
        self.slots[w.slot] = SlotHealth(failures=failures, next_spawn_at=self.now + delay)
        return delay

    # -- events

    def on_forked(self, key: int, pid: int) -> None:
        w = self.workers.get(key)
        if w is None:
            return
        w = replace(w, pid=pid, state=WState.BOOTING if w.state is WState.SPAWNING else w.state)
        self.workers[key] = w
        self._wlog("info", "worker.spawned", w)

    def on_spawn_failed(self, key: int, error: str) -> None:
        w = self.workers.pop(key, None)
        if w is None:
            return
        delay = self.record_failure(w, error)
        self._wlog("error", "worker.spawn_failed", w, error=error, respawn_in_s=delay)

    def on_ready(self, key: int) -> None:
        w = self.workers.get(key)
        if w is None or w.state is not WState.BOOTING:
            return
        w = replace(w, state=WState.READY, ready_at=self.now, last_seen=self.now)
        self.workers[key] = w
        self._wlog("info", "worker.ready", w, boot_s=round(self.now - w.spawned_at, 4))

    def on_draining(self, key: int) -> None:
        w = self.workers.get(key)
        if w is not None:
            self.workers[key] = replace(w, accepting=False)

    def on_heartbeat(self, hb: Heartbeat) -> None:
        w = self.workers.get(hb.key)
        if w is None:
            return
        w = replace(
            w,
            last_seen=self.now,
            requests=hb.requests,
            in_flight=hb.in_flight,
            rss_mb=hb.rss_mb,
        )
        if w.state is WState.READY and w.retire is None:
            if w.max_requests and w.requests >= w.max_requests:
                w = replace(w, retire=f"served {w.requests} requests (max {w.max_requests})")
            elif w.max_rss_mb and w.rss_mb > w.max_rss_mb:
                w = replace(w, retire=f"RSS {w.rss_mb:.0f} MiB over max {w.max_rss_mb} MiB")
            if w.retire is not None:
                self._wlog("info", "worker.recycling", w, reason=w.retire)
        self.workers[hb.key] = w

    def on_boot_failed(self, key: int, error: str) -> None:
        w = self.workers.get(key)
        if w is None:
            return
        self.workers[key] = replace(w, boot_error=error)
        self._wlog("error", "worker.boot_failed", w, error=error)

    def on_exited(self, ev: WorkerExited) -> None:
        w = self.workers.pop(ev.key, None)
        if w is None:
            return
        uptime = round(self.now - w.spawned_at, 3)
        fields: dict[str, Any] = {"exit_code": ev.exit_code, "signal": ev.signal_name}
        expected = w.cause in EXPECTED_CAUSES
        if expected:
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
        delay = self.record_failure(w, reason)
        self._wlog(
            "error" if never_ready else "warning",
            "worker.exited",
            w,
            **fields,
            reason=reason,
            uptime_s=uptime,
            failures=self.slots[w.slot].failures,
            respawn_in_s=delay,
        )

    def on_stop(self, signal_name: str, *, force: bool) -> None:
        if self.s.phase is not Phase.STOPPING:
            self.s = replace(self.s, phase=Phase.STOPPING, stop_started_at=self.now)
            self.notify("STOPPING=1")
            self.log("info", "master.stopping", signal=signal_name, workers=len(self.workers))
            if self.s.reload is not None:
                self.finish_reload(ok=False, message="interrupted: the master is stopping")
            for w in list(self.workers.values()):
                if w.state in (WState.SPAWNING, WState.BOOTING):
                    self.kill(w, Cause.STOP)
                elif w.state in (WState.READY, WState.HUNG):
                    self._signal(w, "SIGTERM", Cause.STOP, WState.DRAINING)
        if force:
            self.log("warning", "master.force_stop", signal=signal_name)
            for w in list(self.workers.values()):
                if w.state is not WState.KILLED:
                    self.kill(w, Cause.STOP)

    def on_reload(self, ev: ReloadRequested) -> None:
        phase = self.s.phase
        if phase is Phase.STOPPING:
            self.actions.append(
                ReloadOutcome(
                    (ev.request_id,), False, self.s.current.number, "the master is stopping"
                )
            )
            return
        if self.s.ready_sent and phase is Phase.RUNNING:
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={int(self.now * 1_000_000)}")
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
                self.notify("READY=1")
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
                self.kill(w, Cause.SUPERSEDED)
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
        if self.s.phase is Phase.RUNNING and self.s.ready_sent:
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={int(self.now * 1_000_000)}")
            self.s = replace(
                self.s, last_reload=LastReload(False, self.s.current.number, error, self.now)
            )
            self.notify(f"STATUS={status_text(self._frozen())}")
            self.notify("READY=1")
        self.actions.append(outcome)

    def on_scale(self, ev: ScaleRequested) -> None:
        if self.s.phase is Phase.STOPPING:
            return
        new = ev.absolute if ev.absolute is not None else self.s.target + ev.delta
        new = max(1, min(MAX_POOL, new))
        if new != self.s.target:
            self.log("info", "pool.scaled", workers_from=self.s.target, workers=new)
            self.s = replace(self.s, target=new)

    # -- reload bookkeeping

    def abort_reload(self, reason: str) -> None:
        run = self.s.reload
        assert run is not None
        aborted = self.s.current.number
        self.s = replace(self.s, current=run.previous, target=run.previous.target)
        for w in list(self.workers.values()):
            if w.generation == aborted and w.state in (WState.SPAWNING, WState.BOOTING):
                self.kill(w, Cause.ABORT)
        self.finish_reload(ok=False, message=f"aborted: {reason}")

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
            if not ok:
                self.notify(f"STATUS={status_text(self._frozen())}")
            self.notify("READY=1")
            self.s = replace(self.s, ready_sent=True)

    # -- deadlines and reconciliation

    def check_deadlines(self) -> None:
        for w in list(self.workers.values()):
            deadline = _worker_deadline(w)
            if deadline is None or deadline > self.now:
                continue
            match w.state:
                case WState.SPAWNING | WState.BOOTING:
                    self._wlog("error", "worker.boot_timeout", w, timeout_s=w.boot_timeout_s)
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
                    self._wlog("warning", "worker.drain_timeout", w, timeout_s=w.graceful_timeout_s)
                    self.kill(w, w.cause or Cause.DRAIN)

    def reconcile(self) -> None:
        if self.s.phase is Phase.STOPPING:
            if not self.workers:
                self.log("info", "master.stopped", uptime_s=round(self.now - self.s.started_at, 3))
                self.actions.append(Exit(0))
                self.s = replace(self.s, exit_code=0)
            return
        gen = self.s.current.number
        target = self.s.target
        live = [w for w in self.workers.values() if w.live]
        booting = sum(1 for w in live if w.state in (WState.SPAWNING, WState.BOOTING))
        surge = max(1, self.s.current.surge)
        for slot in range(target):
            in_slot = [w for w in live if w.slot == slot]
            fresh = [w for w in in_slot if _fresh(w, gen)]
            stale = [w for w in in_slot if not _fresh(w, gen)]
            if any(w.state is WState.READY for w in fresh):
                for w in stale:
                    self.drain(w, Cause.RETIRE if w.generation == gen else Cause.DRAIN)
                continue
            if fresh:
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
        ready_slots = _ready_fresh_slots(self.workers.values(), gen, target)
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
                not _fresh(w, gen) and (w.live or (w.state is WState.DRAINING and w.accepting))
                for w in self.workers.values()
            )
            if full and not stale_left:
                self.finish_reload(
                    ok=True, message=f"generation {gen} serving with {target} workers"
                )
        elif self.s.phase is Phase.STARTING and full:
            self.s = replace(self.s, phase=Phase.RUNNING, ready_sent=True)
            self.log(
                "info",
                "master.ready",
                generation=gen,
                workers=target,
                startup_s=round(self.now - self.s.started_at, 4),
            )
            self.notify(f"STATUS={status_text(self._frozen())}")
            self.notify("READY=1")

    def watchdog(self) -> None:
        interval = self.s.watchdog_interval_s
        if interval is None or self.now < self.s.watchdog_next:
            return
        if pool_healthy(self._frozen(), self.now):
            self.notify("WATCHDOG=1")
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

    def finish(self) -> tuple[MasterState, list[Action]]:
        self.check_deadlines()
        self.reconcile()
        self.watchdog()
        state = self._frozen()
        text = status_text(state)
        if text != state.status_text:
            state = replace(state, status_text=text)
            note = Notify(f"STATUS={text}")
            if note not in self.actions:
                # systemd should see the new status no later than READY=1.
                ready = Notify("READY=1")
                at = self.actions.index(ready) if ready in self.actions else len(self.actions)
                self.actions.insert(at, note)
        return state, self.actions
