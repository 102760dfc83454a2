"""``appliance serve`` as PID 1 of a container: reaps orphans, drains on SIGTERM, logs JSON
to stdout.

Runs the master as PID 1 of a new PID namespace (``unshare --pid --fork --mount-proc``, root
only), as a Kubernetes pod or ``docker run`` without an init would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from harness import APPS, Deadline, Load, base_config

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _in_namespace(ns: str) -> dict[int, tuple[str, str, int]]:
    """pid -> (comm, state, ppid) of every process in the PID namespace ``ns``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != ns:
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        found[int(entry.name)] = (comm, state, int(ppid))
    return found


def test_pid1_reaps_orphans_drains_on_sigterm_and_logs_json(start_master, workdir):
    cfg = base_config(
        workdir,
        app={"target": "orphanapp:app", "directory": str(APPS)},
        log={"format": "auto"},  # not a terminal, no journal: JSON lines
    )
    # As PID 1 the logs go to stdout (log.stream = "auto"), where a container runtime reads.
    m = start_master(
        cfg, prefix=["unshare", "--pid", "--fork", "--mount-proc"], logs_on="stdout"
    )
    started = m.started()
    assert started["pid"] == 1
    m.ready()
    deadline = time.monotonic() + 10
    while not (kids := _children(m.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (master,) = kids  # unshare's one child: PID 1 inside
    ns = os.readlink(f"/proc/{master}/ns/pid")

    gate = workdir / "orphans-may-exit"
    for _ in range(3):
        assert m.get(f"/orphan?gate={gate}")[0] == 200
    seen = {p: v for p, v in _in_namespace(ns).items() if v[0] == "apl-orphan"}
    assert len(seen) == 3
    assert {ppid for _c, _s, ppid in seen.values()} == {master}  # re-parented to the master
    gate.touch()
    deadline = time.monotonic() + 10
    while any(p in _in_namespace(ns) for p in seen):  # a zombie would stay listed
        if time.monotonic() > deadline:
            raise Deadline(f"orphans not reaped: {_in_namespace(ns)}")
        time.sleep(0.05)

    with Load(m.port, keepalive=1, fresh=1, path="/") as load:
        load.wait_requests(50)
    assert load.failures == []
    mark = m.logs.mark()
    os.kill(master, signal.SIGTERM)  # a container runtime signals PID 1
    m.logs.wait_for("master.stopping", since=mark, signal="SIGTERM")
    assert m.wait(30) == 0  # unshare exits with PID 1's status
    assert m.logs.find("master.stopped", exit_code=0)
    lines = [line for line in m.logs.text().splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)


def _cpu_quota_cgroup(name: str) -> tuple[Path, str] | None:
    """A cgroup limited to 1 CPU (v1 cpu controller or v2 cpu.max), or None if we cannot."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        group = v1 / name
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        return group, "cgroup.procs"
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists() and "cpu" in (
        root / "cgroup.subtree_control"
    ).read_text().split():
        group = root / name
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text("100000 100000")
        return group, "cgroup.procs"
    return None


def test_pid1_sizes_the_pool_from_the_cgroup_cpu_quota(start_master, workdir):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs to tell a quota of 1 from the machine")
    name = f"appliance-pid1-{os.getpid()}"
    made = _cpu_quota_cgroup(name)
    if made is None:
        pytest.skip("no writable cgroup cpu controller")
    group, procs = made
    try:
        cfg = base_config(workdir, workers={"count": "auto", "reserve_cores": 0})
        # As a container runtime does: the pod's cgroup first, then PID 1 in it.
        enter = f"echo $$ > {group / procs} && exec \"$@\""
        m = start_master(
            cfg,
            prefix=["sh", "-c", enter, "sh", "unshare", "--pid", "--fork", "--mount-proc"],
            logs_on="stdout",
        )
        started = m.started()
        assert started["pid"] == 1
        assert started["workers"] == 1, started["sizing"]
        assert "cgroup CPU quota 1" in started["sizing"]
        m.ready()
        assert len(m.worker_pids()) == 1
        (master,) = _children(m.pid)  # PID 1 inside; a container runtime signals it
        os.kill(master, signal.SIGTERM)
        assert m.wait(30) == 0
    finally:
        if "m" in locals():
            m.kill_group()
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # its last processes are still exiting
