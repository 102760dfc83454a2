"""Pool sizing: cgroup quota parsing over fake trees, affinity, rounding and clamping."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config.schema import WorkerSettings
from appliance.sizing import (
    cgroup_cpu_limit,
    desired_workers,
    parse_cgroup_v1_quota,
    parse_cgroup_v2_cpu_max,
    pool_size,
    size_pool,
    usable_cpus,
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("150000 100000\n", 1.5),
        ("200000 100000", 2.0),
        ("50000 100000", 0.5),
    ],
)
def test_parse_cgroup_v2_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cgroup_v2_cpu_max(text) == cpus


@pytest.mark.parametrize("text", ["", "a b", "1 2 3", "0 100000"])
def test_parse_cgroup_v2_cpu_max_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"cpu\.max"):
        parse_cgroup_v2_cpu_max(text)


def test_parse_cgroup_v1_quota() -> None:
    assert parse_cgroup_v1_quota("-1\n", "100000\n") is None
    assert parse_cgroup_v1_quota("300000\n", "100000\n") == 3.0
    assert parse_cgroup_v1_quota("25000", "50000") == 0.5


def test_v2_parent_more_restrictive(tmp_path: Path) -> None:
    _write(tmp_path / "system.slice/cpu.max", "100000 100000\n")
    _write(tmp_path / "system.slice/appliance.service/cpu.max", "max 100000\n")
    text = "0::/system.slice/appliance.service\n"
    assert cgroup_cpu_limit(text, tmp_path) == 1.0


def test_v2_own_limit_tighter_than_parent(tmp_path: Path) -> None:
    _write(tmp_path / "a/cpu.max", "400000 100000\n")
    _write(tmp_path / "a/b/cpu.max", "250000 100000\n")
    assert cgroup_cpu_limit("0::/a/b\n", tmp_path) == 2.5


def test_v2_no_limit_and_missing_files(tmp_path: Path) -> None:
    _write(tmp_path / "a/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit("0::/a\n", tmp_path) is None
    assert cgroup_cpu_limit("0::/does/not/exist\n", tmp_path) is None
    assert cgroup_cpu_limit("0::/\n", tmp_path / "nothing") is None
    assert cgroup_cpu_limit("", tmp_path) is None


def test_v1_cpu_cpuacct(tmp_path: Path) -> None:
    base = tmp_path / "cpu,cpuacct/system.slice/appliance.service"
    _write(base / "cpu.cfs_quota_us", "150000\n")
    _write(base / "cpu.cfs_period_us", "100000\n")
    text = (
        "12:memory:/system.slice/appliance.service\n"
        "4:cpu,cpuacct:/system.slice/appliance.service\n"
        "1:name=systemd:/system.slice/appliance.service\n"
    )
    assert cgroup_cpu_limit(text, tmp_path) == 1.5


def test_v1_cpu_alone_and_unlimited(tmp_path: Path) -> None:
    _write(tmp_path / "cpu/x/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu/x/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit("3:cpu:/x\n", tmp_path) is None
    _write(tmp_path / "cpu/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit("3:cpu:/x\n", tmp_path) == 2.0
    # cpuacct alone is not the cpu controller.
    assert cgroup_cpu_limit("2:cpuacct:/x\n", tmp_path / "empty") is None


def test_usable_cpus_is_min_of_affinity_and_quota(tmp_path: Path) -> None:
    _write(tmp_path / "s/cpu.max", "150000 100000\n")
    assert usable_cpus({0, 1, 2, 3}, "0::/s\n", tmp_path) == 1.5
    assert usable_cpus({0}, "0::/s\n", tmp_path) == 1.0
    assert usable_cpus({0, 1, 2}, "0::/none\n", tmp_path) == 3.0


def test_usable_cpus_reads_this_process() -> None:
    assert usable_cpus() >= 0.01


@pytest.mark.parametrize(
    ("count", "reserve", "low", "high", "cpus", "expected"),
    [
        ("auto", 0, 1, 64, 4.0, 4),
        ("auto", 0, 1, 64, 1.5, 1),  # rounds down: a 1.5-CPU quota gets one worker
        ("auto", 0, 1, 64, 0.5, 1),  # never zero
        ("auto", 0, 1, 64, 2.9999999999, 3),  # float noise in quota/period
        ("auto", 1, 1, 64, 4.0, 3),
        ("auto", 8, 1, 64, 4.0, 1),  # reserve larger than the machine: clamped to min
        ("auto", 0, 2, 64, 1.0, 2),
        ("auto", 0, 1, 3, 16.0, 3),
        (5, 0, 1, 64, 1.0, 5),  # an explicit count is taken as is
    ],
)
def test_desired_workers(
    count: int | str, reserve: int, low: int, high: int, cpus: float, expected: int
) -> None:
    assert desired_workers(count, reserve, low, high, cpus) == expected  # type: ignore[arg-type]


def test_desired_workers_rejects_inverted_bounds() -> None:
    with pytest.raises(ValueError, match="min_workers"):
        desired_workers("auto", 0, 5, 4, 8.0)


@given(
    reserve=st.integers(0, 1024),
    bounds=st.tuples(st.integers(1, 1024), st.integers(1, 1024)).map(sorted),
    cpus=st.floats(0.01, 4096, allow_nan=False),
)
def test_auto_is_always_within_bounds(reserve: int, bounds: list[int], cpus: float) -> None:
    low, high = bounds
    assert low <= desired_workers("auto", reserve, low, high, cpus) <= high


def test_pool_size_explains_itself(tmp_path: Path) -> None:
    auto = pool_size(WorkerSettings(reserve_cores=1), affinity_cpus=4, quota_cpus=2.5)
    assert (auto.workers, auto.cpus, auto.quota_cpus) == (1, 2.5, 2.5)
    assert "affinity 4" in auto.reason
    assert "cgroup CPU quota 2.5" in auto.reason
    fixed = pool_size(WorkerSettings(count=3), affinity_cpus=4, quota_cpus=None)
    assert fixed.workers == 3
    assert fixed.reason == "workers.count = 3"
    _write(tmp_path / "s/cpu.max", "200000 100000\n")
    measured = size_pool(
        WorkerSettings(), affinity={0, 1, 2, 3}, proc_self_cgroup="0::/s\n", cgroup_root=tmp_path
    )
    assert (measured.workers, measured.affinity_cpus, measured.quota_cpus) == (2, 4, 2.0)
