"""Typed inputs to :func:`appliance.master.policy.step` and the actions it returns.

The runtime turns everything that happens (a signal, a byte on a worker's pipe, a reaped child,
a control request, a deadline) into one of these events, and carries out the returned actions.
Keeping both sides as plain frozen data is what lets the policy be tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from appliance.config.schema import Settings

__all__ = [
    "Action",
    "ApplyLive",
    "CancelSpawn",
    "ConfigRejected",
    "DrainOutcome",
    "DrainRequested",
    "Event",
    "Exit",
    "Generation",
    "Heartbeat",
    "Kill",
    "Log",
    "MasterStalled",
    "Notify",
    "ReloadOutcome",
    "ReloadProgress",
    "ReloadRequested",
    "ScaleOutcome",
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

    The policy reads its numbers from ``settings`` (the validated schema, typed), so a setting
    is declared once, in :mod:`appliance.config.schema`, and never copied field by field.
    ``digest`` names the effective settings (``appliance status``, the built-in app).
    """

    number: int
    settings: Settings
    digest: str
    target: int


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
class MasterStalled:
    """The master could not read its workers' pipes for ``seconds`` (SIGSTOP, suspend, a slow
    step): deadlines that ran out meanwhile are not the workers' fault."""

    seconds: float


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


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """``appliance drain`` (``drain``; ``maint`` for ``--maint``) or ``appliance undrain``:
    what balancers are told, nothing else (the workers keep serving)."""

    request_id: int
    drain: bool
    maint: bool = False


Event = (
    Tick
    | MasterStalled
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
    | DrainRequested
)


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    key: int
    slot: int
    generation: Generation


@dataclass(frozen=True, slots=True)
class CancelSpawn:
    """Give up on a worker whose fork was not reported yet (it timed out while booting)."""

    key: int


@dataclass(frozen=True, slots=True)
class Kill:
    key: int
    pid: int
    #: SIGTERM: stop (drain; WebSockets close 1001), SIGUSR2: being replaced (drain; 1012),
    #: SIGKILL, SIGUSR1: dump the stack (a hung worker).
    signal_name: Literal["SIGTERM", "SIGUSR2", "SIGKILL", "SIGUSR1"]


@dataclass(frozen=True, slots=True)
class Notify:
    """One sd_notify datagram, built by :mod:`appliance.systemd`'s message builders (which own
    the format: ``READY=1``, ``STATUS=`` with newlines folded), never written by hand."""

    message: str


@dataclass(frozen=True, slots=True)
class Log:
    level: Literal["debug", "info", "warning", "error"]
    event: str
    fields: tuple[tuple[str, object], ...] = ()


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
class ScaleOutcome:
    """Answer an ``appliance scale`` (SIGTTIN/SIGTTOU have nobody waiting)."""

    request_id: int
    ok: bool
    workers: int
    message: str


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    """Answer an ``appliance drain``/``undrain``; ``agent`` is the agent-check line now."""

    request_id: int
    ok: bool
    agent: str
    message: str


@dataclass(frozen=True, slots=True)
class Exit:
    code: int


Action = (
    Spawn
    | CancelSpawn
    | Kill
    | Notify
    | Log
    | ApplyLive
    | ReloadProgress
    | ReloadOutcome
    | ScaleOutcome
    | DrainOutcome
    | Exit
)
