"""Typed inputs to :func:`appliance.master.policy.step` and the actions it returns.

The runtime turns everything that happens (a signal, a byte on a worker's pipe, a reaped child,
a control request, a deadline) into one of these events, and carries out the returned actions.
Keeping both sides as plain frozen data is what lets the policy be tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Action",
    "ApplyLive",
    "ConfigRejected",
    "Event",
    "Exit",
    "Generation",
    "Heartbeat",
    "Kill",
    "Log",
    "Notify",
    "ReloadOutcome",
    "ReloadProgress",
    "ReloadRequested",
    "ScaleRequested",
    "Spawn",
    "SpawnFailed",
    "StopRequested",
    "Tick",
    "WorkerBootFailed",
    "WorkerDraining",
    "WorkerExited",
    "WorkerForked",
    "WorkerReady",
]


@dataclass(frozen=True, slots=True)
class Generation:
    """A cohort of workers that share one effective configuration.

    ``config`` is opaque to the policy (the runtime's loaded config); the policy only reads the
    numbers it needs, copied into the fields below so that tests can build one without files.
    """

    number: int
    config: Any
    digest: str
    target: int
    boot_timeout_s: float
    heartbeat_timeout_s: float
    graceful_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    backoff_reset_s: float
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_rss_mb: int = 0
    surge: int = 1
    min_healthy: int = 1
    preload: bool = False


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """A deadline passed (or the loop woke up for no other reason)."""


@dataclass(frozen=True, slots=True)
class StopRequested:
    """SIGTERM/SIGINT (``force`` for a second SIGINT: kill now)."""

    signal_name: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class WorkerForked:
    key: int
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    key: int
    error: str


@dataclass(frozen=True, slots=True)
class WorkerReady:
    key: int


@dataclass(frozen=True, slots=True)
class WorkerDraining:
    """The worker closed its listening sockets: it takes no new connection from now on."""

    key: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    key: int
    requests: int
    in_flight: int
    rss_mb: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerBootFailed:
    """The worker told us why it cannot boot (e.g. the app raised at import)."""

    key: int
    error: str


@dataclass(frozen=True, slots=True)
class WorkerExited:
    key: int
    exit_code: int | None
    signal_name: str | None


@dataclass(frozen=True, slots=True)
class ReloadRequested:
    """A valid new configuration to roll out (``generation.number`` is ignored: the policy numbers).

    ``live_only`` means nothing changed that needs new workers (e.g. only the log level).
    """

    request_id: int
    generation: Generation
    live_only: bool = False
    source: str = "SIGHUP"


@dataclass(frozen=True, slots=True)
class ConfigRejected:
    """A reload was asked for but the new configuration is invalid or needs a restart."""

    request_id: int
    error: str
    source: str = "SIGHUP"


@dataclass(frozen=True, slots=True)
class ScaleRequested:
    """SIGTTIN (+1), SIGTTOU (-1) or ``appliance scale N`` (absolute)."""

    request_id: int
    delta: int = 0
    absolute: int | None = None


Event = (
    Tick
    | StopRequested
    | WorkerForked
    | SpawnFailed
    | WorkerReady
    | WorkerDraining
    | Heartbeat
    | WorkerBootFailed
    | WorkerExited
    | ReloadRequested
    | ConfigRejected
    | ScaleRequested
)


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    key: int
    slot: int
    generation: Generation


@dataclass(frozen=True, slots=True)
class Kill:
    key: int
    pid: int
    signal_name: Literal["SIGTERM", "SIGKILL", "SIGUSR1"]


@dataclass(frozen=True, slots=True)
class Notify:
    """One sd_notify datagram, e.g. ``READY=1`` or ``STATUS=...``."""

    message: str


@dataclass(frozen=True, slots=True)
class Log:
    level: Literal["debug", "info", "warning", "error"]
    event: str
    fields: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class ApplyLive:
    """Apply settings that need no new workers (log level)."""

    generation: Generation


@dataclass(frozen=True, slots=True)
class ReloadProgress:
    request_ids: tuple[int, ...]
    generation: int
    replaced: int
    total: int
    message: str


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """Answer every waiting ``appliance reload`` (and record the last outcome)."""

    request_ids: tuple[int, ...]
    ok: bool
    generation: int
    message: str


@dataclass(frozen=True, slots=True)
class Exit:
    code: int


Action = Spawn | Kill | Notify | Log | ApplyLive | ReloadProgress | ReloadOutcome | Exit
