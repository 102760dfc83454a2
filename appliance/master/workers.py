"""The worker state machine, as data: which report may arrive in which state, and what it does.

Two rules, then a table (h11's ``_state.py`` shape):

1. A worker moves only forward: SPAWNING -> BOOTING -> READY -> (HUNG) -> DRAINING -> KILLED,
   and leaves the table when it is reaped (``exited``) or its fork failed. The master decides
   the moves it starts itself (drain, kill, hang probe) in :mod:`appliance.master.policy`; the
   table below covers what *the child* (or the fork) reports.
2. Every (state, report) pair is a decision. :data:`TRANSITIONS` lists the pairs that advance
   the machine; :data:`LATE` lists reports a dying or superseded worker may still send, which
   are harmless and ignored. Anything else is :data:`Verdict.UNEXPECTED`: the policy logs it
   and, for a fork report, kills the process it names, so no event is ever silently absorbed
   and no child is ever left without an owner.
"""

from __future__ import annotations

from enum import StrEnum

from appliance.master.rules import HANG_DUMP_GRACE_S, KILL_RESEND_S
from appliance.master.state import Worker, WState

__all__ = ["LATE", "TRANSITIONS", "Report", "Verdict", "deadline", "judge"]


class Report(StrEnum):
    """What the runtime heard about a worker (from the fork, its pipe or waitpid)."""

    FORKED = "forked"
    SPAWN_FAILED = "spawn_failed"
    READY = "ready"
    HEARTBEAT = "heartbeat"
    DRAINING = "draining"
    BOOT_FAILED = "boot_failed"
    EXITED = "exited"


class Verdict(StrEnum):
    ADVANCE = "advance"  # the report moves the worker along the table
    LATE = "late"  # a dying or superseded worker said something: harmless, ignored
    UNEXPECTED = "unexpected"  # impossible by the protocol: logged, handled defensively


_S = WState
_R = Report

#: (state, report) -> the state after the report. Reports that only update counters keep it.
TRANSITIONS: dict[tuple[WState, Report], WState | None] = {
    (_S.SPAWNING, _R.FORKED): _S.BOOTING,
    (_S.SPAWNING, _R.SPAWN_FAILED): None,  # gone: nothing was forked
    # Killed before the fork reported its pid (a second reload superseded it): SIGKILL the
    # pid now. Without this pair the child lived on, serving old code, owned by nobody.
    (_S.KILLED, _R.FORKED): _S.KILLED,
    (_S.KILLED, _R.SPAWN_FAILED): None,
    # Asked to stop (SIGTERM) before its pid was known: the signal goes out with the pid.
    (_S.DRAINING, _R.FORKED): _S.DRAINING,
    (_S.DRAINING, _R.SPAWN_FAILED): None,
    (_S.BOOTING, _R.READY): _S.READY,
    (_S.BOOTING, _R.HEARTBEAT): _S.BOOTING,  # the engine beats once just before "ready"
    (_S.BOOTING, _R.BOOT_FAILED): _S.BOOTING,  # the reason; its exit follows
    (_S.READY, _R.HEARTBEAT): _S.READY,
    (_S.READY, _R.DRAINING): _S.READY,  # drained on its own (the master died, then not)
    (_S.HUNG, _R.HEARTBEAT): _S.HUNG,  # too late: the kill is decided
    (_S.DRAINING, _R.HEARTBEAT): _S.DRAINING,
    (_S.DRAINING, _R.DRAINING): _S.DRAINING,
    **{(state, _R.EXITED): None for state in WState},
}

#: Reports that may arrive after the master already moved the worker on (it signalled it
#: while the report was in flight). Ignored, never logged as a problem.
LATE: frozenset[tuple[WState, Report]] = frozenset(
    {
        (_S.KILLED, _R.READY),
        (_S.KILLED, _R.HEARTBEAT),
        (_S.KILLED, _R.DRAINING),
        (_S.KILLED, _R.BOOT_FAILED),
        (_S.DRAINING, _R.READY),
        (_S.DRAINING, _R.BOOT_FAILED),
        (_S.HUNG, _R.DRAINING),
        (_S.HUNG, _R.READY),
    }
)


def judge(state: WState, report: Report) -> Verdict:
    """The verdict on ``report`` arriving while the worker is in ``state``."""
    if (state, report) in TRANSITIONS:
        return Verdict.ADVANCE
    if (state, report) in LATE:
        return Verdict.LATE
    return Verdict.UNEXPECTED


def deadline(w: Worker) -> float | None:
    """When the master must act on ``w`` if it hears nothing (None: it waits for an event)."""
    limits = w.limits
    match w.state:
        case WState.SPAWNING | WState.BOOTING:
            return w.spawned_at + limits.boot_timeout_s
        case WState.READY:
            assert w.last_seen is not None
            return w.last_seen + limits.heartbeat_timeout_s
        case WState.HUNG:
            assert w.signalled_at is not None
            return w.signalled_at + HANG_DUMP_GRACE_S
        case WState.DRAINING:
            assert w.signalled_at is not None
            return w.signalled_at + limits.graceful_timeout_s
        case WState.KILLED:
            if w.pid is None or w.signalled_at is None:
                return None  # the fork report will deliver the SIGKILL
            return w.signalled_at + KILL_RESEND_S
