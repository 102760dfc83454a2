"""How many workers ``workers.count = "auto"`` means on this machine, and why.

``os.cpu_count()`` is the host's core count, which is wrong twice over under systemd: the unit
may pin the service to some CPUs (``CPUAffinity=``, honoured by ``sched_getaffinity``) and may
cap its CPU time (``CPUQuota=``, a cgroup limit invisible to the affinity mask). Forking one
worker per host core inside a 2-CPU quota just makes the kernel throttle them all.

The parsers and the decision are pure functions over text and numbers, tested with fake cgroup
trees; the readers are thin and take the paths as arguments.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable

    from appliance.config.schema import WorkerSettings

__all__ = [
    "CGROUP_ROOT",
    "PoolSize",
    "cgroup_cpu_limit",
    "desired_workers",
    "parse_cgroup_v1_quota",
    "parse_cgroup_v2_cpu_max",
    "pool_size",
    "size_pool",
    "usable_cpus",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
_ROUNDING_SLACK = 1e-9  # 3 CPUs expressed as 299999/100000-ish float error still counts as 3


def parse_cgroup_v2_cpu_max(text: str) -> float | None:
    """``cpu.max`` (``"QUOTA PERIOD"``, quota may be ``max``) -> CPUs, or None if unlimited.

    ``"150000 100000"`` is 1.5 CPUs. Malformed text raises ``ValueError``: it comes from the
    kernel, so guessing would hide a real surprise.
    """
    fields = text.split()
    if len(fields) not in (1, 2):
        msg = f"cpu.max: expected 'QUOTA PERIOD', got {text.strip()!r}"
        raise ValueError(msg)
    if fields[0] == "max":
        return None
    try:
        period = int(fields[1]) if len(fields) == 2 else 100_000  # kernel default period
        quota = int(fields[0])
    except ValueError:
        msg = f"cpu.max: expected 'QUOTA PERIOD' as integers, got {text.strip()!r}"
        raise ValueError(msg) from None
    if quota <= 0 or period <= 0:
        msg = f"cpu.max: quota and period must be positive, got {text.strip()!r}"
        raise ValueError(msg)
    return quota / period


def parse_cgroup_v1_quota(quota_text: str, period_text: str) -> float | None:
    """``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` -> CPUs, or None (quota ``-1``)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    if quota < 0:
        return None
    if quota == 0 or period <= 0:
        msg = f"cfs quota/period must be positive, got {quota}/{period}"
        raise ValueError(msg)
    return quota / period


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def _self_and_parents(root: Path, relative: str) -> Iterable[Path]:
    """``root/a/b``, ``root/a``, ``root``: a parent's limit also caps its children."""
    parts = [part for part in relative.split("/") if part]
    for end in range(len(parts), -1, -1):
        yield root.joinpath(*parts[:end])


def _min_limit(limits: Iterable[float | None]) -> float | None:
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _v2_limit(root: Path, relative: str) -> float | None:
    def limits() -> Iterable[float | None]:
        for directory in _self_and_parents(root, relative):
            text = _read(directory / "cpu.max")
            yield None if text is None else parse_cgroup_v2_cpu_max(text)

    return _min_limit(limits())


def _v1_limit(root: Path, relative: str) -> float | None:
    # The cpu controller is mounted as cpu,cpuacct on most distributions, sometimes alone.
    mounts = [root / name for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu")]
    mount = next((candidate for candidate in mounts if candidate.is_dir()), None)
    if mount is None:
        return None

    def limits() -> Iterable[float | None]:
        for directory in _self_and_parents(mount, relative):
            quota = _read(directory / "cpu.cfs_quota_us")
            period = _read(directory / "cpu.cfs_period_us")
            yield None if quota is None or period is None else parse_cgroup_v1_quota(quota, period)

    return _min_limit(limits())


def cgroup_cpu_limit(proc_self_cgroup: str, cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup path, or None.

    ``proc_self_cgroup`` is the text of ``/proc/self/cgroup``: ``0::/path`` on cgroup v2,
    ``N:cpu,cpuacct:/path`` for the v1 cpu controller (hybrid hosts may have both; we take the
    smaller limit). Each level up to the root is checked, because ``CPUQuota=`` on a slice
    limits every service in it while the service's own ``cpu.max`` says ``max``.
    """
    limits: list[float | None] = []
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if not relative:
            continue
        if hierarchy == "0" and controllers == "":
            limits.append(_v2_limit(cgroup_root, relative))
        elif "cpu" in controllers.split(","):
            limits.append(_v1_limit(cgroup_root, relative))
    return _min_limit(limits)


def _affinity_cpus(affinity: set[int] | None) -> int:
    if affinity is not None:
        return len(affinity)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - non-Linux


def _own_cgroup(proc_self_cgroup: str | None) -> str:
    if proc_self_cgroup is not None:
        return proc_self_cgroup
    return _read(Path("/proc/self/cgroup")) or ""


def usable_cpus(
    affinity: set[int] | None = None,
    proc_self_cgroup: str | None = None,
    cgroup_root: Path = CGROUP_ROOT,
) -> float:
    """CPUs this process may really use: ``min(len(affinity), cgroup quota)``.

    Defaults read ``sched_getaffinity(0)`` and ``/proc/self/cgroup``; tests pass both.
    """
    cpus = float(_affinity_cpus(affinity))
    quota = cgroup_cpu_limit(_own_cgroup(proc_self_cgroup), cgroup_root)
    return cpus if quota is None else min(cpus, quota)


def desired_workers(
    count: int | Literal["auto"],
    reserve_cores: int,
    min_workers: int,
    max_workers: int,
    cpus: float,
) -> int:
    """The pool size for ``workers.count``.

    An integer count is taken as is (the schema already checked it against min and max).
    ``"auto"`` is ``max(1, floor(cpus))`` minus ``reserve_cores``, clamped to
    ``[min_workers, max_workers]``. Rounding *down* is deliberate: a 1.5-CPU quota serves
    CPU-bound work better with 1 worker than with 2 that get throttled in turn, and the
    ``max(1, ...)`` keeps a sub-CPU quota (0.5) from meaning zero workers. A tiny slack absorbs
    float error in quota/period, so 3 CPUs never becomes 2.
    """
    if min_workers > max_workers:
        msg = f"min_workers ({min_workers}) > max_workers ({max_workers})"
        raise ValueError(msg)
    if count != "auto":
        return count
    whole = max(1, math.floor(cpus + _ROUNDING_SLACK))
    return max(min_workers, min(max_workers, whole - reserve_cores))


@dataclass(frozen=True, slots=True)
class PoolSize:
    """The decided pool size with its inputs, so the master can log how it decided."""

    workers: int
    cpus: float
    affinity_cpus: int
    quota_cpus: float | None
    reason: str


def _number(value: float) -> str:
    return f"{value:g}"


def pool_size(workers: WorkerSettings, affinity_cpus: int, quota_cpus: float | None) -> PoolSize:
    """Pure: the pool size for ``[workers]`` given the measured CPU facts."""
    cpus = float(affinity_cpus) if quota_cpus is None else min(float(affinity_cpus), quota_cpus)
    size = desired_workers(workers.count, workers.reserve_cores, workers.min, workers.max, cpus)
    if workers.count != "auto":
        reason = f"workers.count = {workers.count}"
    else:
        quota = (
            "no cgroup CPU quota"
            if quota_cpus is None
            else (f"cgroup CPU quota {_number(quota_cpus)}")
        )
        reason = (
            f"auto: {_number(cpus)} usable CPUs (affinity {affinity_cpus}, {quota}), "
            f"reserve {workers.reserve_cores}, clamped to [{workers.min}, {workers.max}]"
        )
    return PoolSize(size, cpus, affinity_cpus, quota_cpus, reason)


def size_pool(
    workers: WorkerSettings,
    *,
    affinity: set[int] | None = None,
    proc_self_cgroup: str | None = None,
    cgroup_root: Path = CGROUP_ROOT,
) -> PoolSize:
    """Measure this process's CPUs and decide the pool size (what the master calls)."""
    quota = cgroup_cpu_limit(_own_cgroup(proc_self_cgroup), cgroup_root)
    return pool_size(workers, _affinity_cpus(affinity), quota)
