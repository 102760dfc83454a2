"""What the master says about itself: STATUS=, the status document, watchdog health.

Pure reads of a :class:`MasterState`; nothing here decides or changes anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.master.state import MasterState, Phase, Worker, WState

__all__ = ["fresh", "pool_healthy", "ready_fresh_slots", "snapshot", "status_text"]


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
