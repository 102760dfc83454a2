"""Property tests: random event sequences never break the master's promises."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.master import policy
from appliance.master.events import (
    Exit,
    Heartbeat,
    Kill,
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
from appliance.master.state import Cause, Phase, WState

from test_policy import gen  # type: ignore[import-not-found]

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["ready", "ready", "ready", "beat", "crash", "bootfail", "exit_drained", "time",
             "reload", "reload", "scale_up", "scale_down", "stop", "fork"]
        ),
        st.integers(min_value=0, max_value=50),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, target=st.integers(min_value=1, max_value=4), surge=st.integers(1, 2))
def test_random_histories_keep_the_invariants(ops, target, surge) -> None:  # noqa: C901
    now = 1000.0
    g = gen(target=target, surge=surge, heartbeat_timeout_s=5.0, boot_timeout_s=3.0)
    state = policy.initial_state(g, watchdog_interval_s=1.0, now=now)
    pid = 100
    state, actions = policy.start(state, now)
    pending = list(actions)
    exited = False
    unforked: list[WorkerForked] = []  # fork reports the runtime has not delivered yet
    sigkilled: set[int] = set()
    deliver = True

    def run(event):
        nonlocal state, pending
        state, acts = policy.step(state, event, now)
        pending += acts
        return acts

    def settle():
        nonlocal pid, exited
        while pending:
            a = pending.pop(0)
            check_action(a)
            if isinstance(a, Spawn):
                pid += 1
                unforked.append(WorkerForked(a.key, pid))
                if deliver:
                    while unforked:
                        run(unforked.pop(0))
            elif isinstance(a, Kill):
                if a.signal_name in ("SIGKILL", "SIGTERM", "SIGUSR2"):
                    sigkilled.add(a.pid)
                if a.signal_name in ("SIGTERM", "SIGUSR2"):
                    run(WorkerDraining(a.key))
            elif isinstance(a, Exit):
                exited = True
                assert state.workers == (), "exit only when every worker is gone"

    def check_action(a):
        if isinstance(a, Kill) and a.signal_name in ("SIGTERM", "SIGUSR2"):
            w = next((w for w in state.workers if w.key == a.key), None)
            if w is not None and w.cause in (Cause.DRAIN, Cause.RETIRE):
                # Never retire a worker before its successor in the same slot is ready.
                successor = [
                    x for x in state.workers
                    if x.slot == w.slot and x.key != w.key and x.state is WState.READY
                    and x.generation == state.current.number and x.retire is None
                ]
                assert successor, f"drained {w} with no ready successor"

    settle()
    rid = 1
    for op, n in ops:
        if exited:
            break
        # Sometimes a fork's report arrives only after the next event (two reloads at once).
        deliver = n % 3 != 0
        live = [w for w in state.workers if w.state is not WState.KILLED]
        pick = live[n % len(live)] if live else None
        stopping = state.phase is Phase.STOPPING
        match op:
            case "ready":
                booting = [w for w in state.workers if w.state is WState.BOOTING]
                if booting:
                    run(WorkerReady(booting[n % len(booting)].key))
            case "beat":
                for w in state.workers:
                    run(Heartbeat(w.key, n, 0))
            case "crash" if pick is not None:
                run(WorkerExited(pick.key, None, "SIGKILL"))
            case "bootfail":
                booting = [w for w in state.workers if w.state is WState.BOOTING]
                if booting:
                    w = booting[n % len(booting)]
                    run(WorkerBootFailed(w.key, "boom"))
                    run(WorkerExited(w.key, 3, None))
            case "exit_drained":
                gone = [w for w in state.workers if w.state in (WState.DRAINING, WState.KILLED)]
                if gone:
                    run(WorkerExited(gone[n % len(gone)].key, 0, None))
            case "time":
                now += n / 10
                run(Tick())
            case "reload":
                rid += 1
                run(ReloadRequested(rid, gen(target=target, surge=surge, heartbeat_timeout_s=5.0,
                                            boot_timeout_s=3.0)))
            case "scale_up":
                run(ScaleRequested(rid, delta=1))
            case "scale_down":
                run(ScaleRequested(rid, delta=-1))
            case "stop":
                run(StopRequested("SIGTERM"))
            case "fork":
                while unforked:
                    run(unforked.pop(0))
        spawned_while_stopping = stopping and any(isinstance(a, Spawn) for a in pending)
        assert not spawned_while_stopping, "no fork once stopping"
        settle()
        # At most one live worker of the current generation per slot.
        fresh = [
            (w.slot) for w in state.workers
            if w.live and w.generation == state.current.number and w.retire is None
        ]
        assert len(fresh) == len(set(fresh)), state.workers
        # No process is left alive by mistake: a worker the policy killed has had SIGKILL
        # sent to its pid once the pid is known.
        for w in state.workers:
            if w.state in (WState.KILLED, WState.DRAINING) and w.pid is not None:
                assert w.pid in sigkilled, f"{w} was never signalled"
        # The policy always knows when to wake up again while anything is pending.
        if state.workers and any(w.state is not WState.KILLED for w in state.workers):
            assert policy.next_deadline(state) is not None
