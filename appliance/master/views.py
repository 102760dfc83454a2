"""What the master says about itself: STATUS=, the status document, watchdog health.

Pure reads of a :class:`MasterState`; nothing here decides or changes anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.engines.balance import Readiness
from appliance.master.state import MasterState, Phase, Worker, WState

__all__ = [
    "agent_reply",
    "fresh",
    "pool_healthy",
    "readiness",
    "ready_fresh_slots",
    "serving_percent",
    "snapshot",
    "status_text",
]


def fresh(w: Worker, generation: int) -> bool:
    """Of the current generation and not being recycled."""
    return w.generation == generation and w.retire is None


def ready_fresh_slots(workers: Iterable[Worker], generation: int, target: int) -> set[int]:
    return {
        w.slot
        for w in workers
        if w.state is WState.READY and fresh(w, generation) and w.slot < target
    }


def _healthy(w: Worker, now: float) -> bool:
    return (
        w.state is WState.READY
        and w.last_seen is not None
        and now - w.last_seen <= w.limits.heartbeat_timeout_s
    )


def pool_healthy(state: MasterState, now: float) -> bool:
    """Whether the master may tell systemd's watchdog that all is well.

    Starting and stopping are governed by systemd's own start/stop timeouts, so only the
    master's liveness matters then. Otherwise at least ``min_healthy`` workers (capped at the
    pool size) must be READY and heartbeating within their timeout.
    """
    if state.phase in (Phase.STARTING, Phase.STOPPING):
        return True
    need = min(state.current.settings.watchdog.min_healthy, state.target)
    return sum(1 for w in state.workers if _healthy(w, now)) >= need


def readiness(state: MasterState) -> Readiness:
    """What the pool tells balancers (the board's readiness word, the agent reply).

    An operator's ``maint`` outranks everything (a host in maintenance that is also stopped
    stays in maintenance); stopping or the drain delay outrank an operator's ``drain``; a
    master that has not sent READY=1 yet is starting.
    """
    if state.maint:
        return Readiness.MAINT
    if state.leaving:
        return Readiness.STOPPING
    if state.drained:
        return Readiness.DRAINED
    if not state.ready_sent:
        return Readiness.STARTING
    return Readiness.READY


def serving_percent(state: MasterState) -> int:
    """Ready, accepting workers (of any generation) as a share of the pool size, 0-100.

    A rolling reload may briefly have more ready workers than the target (``reload.surge``):
    capacity is capped at 100 %. Any ready worker counts for at least 1 %.
    """
    serving = sum(1 for w in state.workers if w.state is WState.READY and w.accepting)
    if serving <= 0 or state.target <= 0:
        return 0
    return max(1, min(100, serving * 100 // state.target))


def agent_reply(state: MasterState) -> str:
    """The HAProxy agent-check line (see :mod:`appliance.agent` for what the words mean)."""
    match readiness(state):
        case Readiness.MAINT:
            return "maint"
        case Readiness.STOPPING | Readiness.DRAINED:
            return "drain"
        case _:
            return f"ready {serving_percent(state)}%"


def status_text(state: MasterState) -> str:
    """The one line systemd shows (``STATUS=``) and ``appliance status`` starts with."""
    gen = state.current.number
    ready = len(ready_fresh_slots(state.workers, gen, state.target))
    if state.phase is Phase.STOPPING:
        live = sum(1 for w in state.workers if w.state is not WState.KILLED)
        if state.exit_code:
            return f"failed to start: {state.last_boot_error or 'no worker could boot'}"
        return f"stopping, {live} workers finishing"
    text = f"{ready}/{state.target} workers ready, generation {gen}"
    if state.phase is Phase.RELOADING and state.reload is not None:
        text = f"reloading to generation {gen}: {ready}/{state.target} workers replaced"
    elif state.phase is Phase.STARTING:
        text = f"starting: {text}"
        if state.last_boot_error is not None:
            text += f"; last boot failed: {state.last_boot_error}"
    if state.phase is Phase.RUNNING and state.last_reload is not None and not state.last_reload.ok:
        text += f"; reload failed: {state.last_reload.message}"
    if state.stop_at is not None:
        text = f"stopping after the drain delay ({state.stop_signal}): {text}"
    elif state.maint:
        text += "; in maintenance (balancers told maint)"
    elif state.drained:
        text += "; drained (balancers told drain)"
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
        "last_boot_error": state.last_boot_error,
        # What balancers are told: the agent-check line and the readiness path's state.
        "balancer": {
            "agent": agent_reply(state),
            "readiness": readiness(state).name.lower(),
            "drained": "maint" if state.maint else "drain" if state.drained else None,
        },
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
