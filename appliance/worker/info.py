"""Who this worker is, for apps that want to say so (the built-in app does).

Set once in the child right after ``fork()``; ``None`` in the master and outside appliance.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WorkerInfo", "current", "set_current"]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: int
    pid: int
    generation: int
    config_digest: str


_current: WorkerInfo | None = None


def current() -> WorkerInfo | None:
    """The running worker's identity, or ``None`` when not inside an appliance worker."""
    return _current


def set_current(info: WorkerInfo) -> None:
    global _current
    _current = info
