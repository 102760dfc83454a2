"""The master's state: frozen records the policy replaces, never mutates.

Puma's split, in data: a :class:`Worker` is the master's *handle* on a child (what it knows and
when it expects to hear from it); the child's own code lives in :mod:`appliance.worker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from appliance.master.events import Generation

if TYPE_CHECKING:
    from appliance.config.schema import WorkerSettings

__all__ = [
    "Cause",
    "LastReload",
    "MasterState",
    "Phase",
    "ReloadRun",
    "SlotHealth",
    "WState",
    "Worker",
]


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"


class WState(StrEnum):
    """A worker's life as the master sees it."""

    SPAWNING = "spawning"  # fork asked for, pid not known yet
    BOOTING = "booting"  # forked, importing the app / starting the engine
    READY = "ready"  # accepting; heartbeats expected
    HUNG = "hung"  # heartbeats stopped: stack dump asked for, SIGKILL next
    DRAINING = "draining"  # SIGTERM sent: finishing in-flight requests
    KILLED = "killed"  # SIGKILL sent: waiting to reap


class Cause(StrEnum):
    """Why the master signalled a worker; decides whether its exit counts as a failure."""

    DRAIN = "replaced"
    RETIRE = "recycled"
    SCALE = "scaled down"
    STOP = "stopping"
    SUPERSEDED = "superseded by a newer reload"
    ABORT = "reload aborted"
    BOOT_TIMEOUT = "boot timeout"
    HUNG = "heartbeat timeout"


EXPECTED_CAUSES = frozenset(
    {Cause.DRAIN, Cause.RETIRE, Cause.SCALE, Cause.STOP, Cause.SUPERSEDED, Cause.ABORT}
)


@dataclass(frozen=True, slots=True)
class Worker:
    """The master's handle on one child.

    ``limits`` are the ``[workers]`` settings of the worker's own generation (an old worker
    keeps the timeouts it was started with while a reload rolls out new ones); ``max_requests``
    is this worker's budget, the setting plus its spread (:func:`rules.max_requests_for`).
    """

    key: int
    slot: int
    generation: int
    state: WState
    spawned_at: float
    limits: WorkerSettings
    max_requests: int = 0
    pid: int | None = None
    ready_at: float | None = None
    last_seen: float | None = None
    signalled_at: float | None = None
    cause: Cause | None = None
    retire: str | None = None
    boot_error: str | None = None
    requests: int = 0
    in_flight: int = 0
    rss_mb: float = 0.0
    accepting: bool = True

    @property
    def live(self) -> bool:
        """Counted as serving capacity (not on its way out)."""
        return self.state in (WState.SPAWNING, WState.BOOTING, WState.READY, WState.HUNG)


@dataclass(frozen=True, slots=True)
class SlotHealth:
    """Recent failures of one pool slot: ``failures`` drives the respawn backoff,
    ``boot_failures`` (boots in a row that never became ready) the start give-up rule."""

    failures: int = 0
    next_spawn_at: float = 0.0
    boot_failures: int = 0


@dataclass(frozen=True, slots=True)
class ReloadRun:
    request_ids: tuple[int, ...]
    generation: int
    previous: Generation
    started_at: float
    replaced: int = 0


@dataclass(frozen=True, slots=True)
class LastReload:
    ok: bool
    generation: int
    message: str
    finished_at: float


@dataclass(frozen=True, slots=True)
class MasterState:
    phase: Phase
    current: Generation
    target: int
    workers: tuple[Worker, ...] = ()
    slots: tuple[tuple[int, SlotHealth], ...] = ()
    next_key: int = 1
    next_generation: int = 2
    reload: ReloadRun | None = None
    last_reload: LastReload | None = None
    status_text: str = ""
    ready_sent: bool = False
    watchdog_interval_s: float | None = None
    watchdog_next: float = 0.0
    started_at: float = 0.0
    stop_started_at: float | None = None
    #: The status the master exits with once its last worker is gone (set when it stops).
    exit_code: int | None = None
    #: Some worker of any generation reported ready since the master started.
    ever_ready: bool = False
    #: Why the latest boot failed, shown in STATUS= and ``appliance status`` while starting.
    last_boot_error: str | None = None
    #: ``appliance drain``: balancers are told to send nothing new (agent ``drain``, readiness
    #: 503) while the workers keep serving; ``maint`` (``drain --maint``) says ``maint``.
    drained: bool = False
    maint: bool = False
    #: SIGTERM arrived with a drain delay: balancers are told ``drain`` and the pool keeps
    #: serving until this moment, then it stops (``stop_signal`` names the signal).
    stop_at: float | None = None
    stop_signal: str | None = None

    @property
    def leaving(self) -> bool:
        """Stopping, or about to (in the drain delay): nothing new may be started."""
        return self.phase is Phase.STOPPING or self.stop_at is not None
