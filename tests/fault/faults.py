"""The fault suite's helpers, on top of tests/process/harness.py.

A :class:`Subject` is the real master (``harness.Master``) plus the invariants every fault test
checks after its one fault:

* the master is alive (:meth:`Subject.alive`);
* the pool settles back to what the master says it runs, and nothing more
  (:meth:`Subject.settled`): every live descendant of the master is a worker in its status
  document or an ancestor of one, no child is left unreaped, and the master's open
  descriptors are, kind by kind, what they were before the fault;
* SIGTERM stops it within the graceful timeout plus a margin, with exit status 0 and no
  process of its session left behind (:meth:`Subject.stop_within`).

Requests are counted by ``harness.Load``; each test decides how many failures its fault may
cause (none for a reload, the killed worker's in-flight requests for a kill).

Everything waits on an event or a state with a deadline. Where a state has no event (the
process table, the descriptor table, a control reply), it is polled every few milliseconds
until the deadline; a fault's own duration (a SIGSTOP that lasts 3 s) is the only plain wait.

The figures each test records (:class:`Figures`) feed the long form, ``scripts/fault-soak``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PROCESS_TESTS = Path(__file__).resolve().parent.parent / "process"
if str(_PROCESS_TESTS) not in sys.path:
    sys.path.insert(0, str(_PROCESS_TESTS))

from harness import (
    APPS,
    Deadline,
    Load,
    Master,
    base_config,
    clean_env,
    cli,
    http_get,
    write_config,
)

__all__ = [
    "APPS",
    "GRACEFUL_S",
    "HEARTBEAT_TIMEOUT_S",
    "MARGIN_S",
    "SCALE",
    "Control",
    "Deadline",
    "Figures",
    "Load",
    "Master",
    "Scale",
    "Subject",
    "clean_env",
    "cli",
    "cpu_share",
    "descendants",
    "fault_config",
    "fd_kinds",
    "http_get",
    "limit_nofile",
    "poll_until",
    "proc_state",
    "session_members",
    "under_load",
    "write_config",
]

GRACEFUL_S = 3.0
HEARTBEAT_TIMEOUT_S = 2.0
HEARTBEAT_INTERVAL_S = 0.5
#: SIGTERM must stop the master within graceful_timeout_s plus this.
MARGIN_S = 5.0
_POLL_S = 0.01
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Scale:
    """How hard the suite pushes. The short form (pytest over tests/) uses the defaults;
    ``scripts/fault-soak --reloads N --connections N`` sets ``FAULT_RELOADS`` and
    ``FAULT_CONNECTIONS``."""

    storm: int = 50  # SIGHUPs sent back to back
    pairs: int = 20  # pairs of reloads requested at the same moment
    connections: int = 300  # slowloris connections held open
    idle_clients: int = 200  # idle clients against the descriptor limit below
    nofile: int = 64  # RLIMIT_NOFILE of the master (and its workers) in the fd tests

    @classmethod
    def from_env(cls) -> Scale:
        scale = cls()
        reloads = os.environ.get("FAULT_RELOADS")
        if reloads:
            n = int(reloads)
            scale = dataclasses.replace(scale, storm=n, pairs=max(n // 2, 1))
        connections = os.environ.get("FAULT_CONNECTIONS")
        if connections:
            n = int(connections)
            # The numbers at scale: 3000 slow clients against the default limit 1024.
            big = n >= 3000
            scale = dataclasses.replace(
                scale,
                connections=n,
                idle_clients=3000 if big else min(n, 200),
                nofile=1024 if big else 64,
            )
        return scale


SCALE = Scale.from_env()


@dataclass
class Figures:
    """What one test measured; printed by scripts/fault-soak."""

    test: str
    reloads: int = 0
    requests: int = 0
    failed: int = 0
    leaked_processes: int | None = None
    leaked_fds: int | None = None
    stop_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    outcome: str = "?"
    seconds: float = 0.0

    def count_load(self, load: Load) -> None:
        self.requests += load.ok + len(load.failures)
        self.failed += len(load.failures)


# --- the process table -----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command (state is [0], ppid [1], session [3])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def proc_state(pid: int) -> str | None:
    """R, S, T (stopped), Z (zombie)... or None when there is no such process."""
    fields = _stat(pid)
    return None if fields is None else fields[0]


def _live(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def descendants(pid: int) -> dict[int, int]:
    """Every descendant of ``pid`` (zombies included), mapped to its parent."""
    parents: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child in _children(parent):
            if child not in parents:
                parents[child] = parent
                todo.append(child)
    return parents


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the master ran with ``start_new_session``), wherever
    they were reparented to."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            members.append(int(name))
    return sorted(members)


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_share(pids: list[int], window_s: float = 1.0) -> dict[int, float]:
    """CPU time each process used over a ``window_s`` window, as a share of the window.

    The window is a measurement interval, not a synchronisation: a busy loop shows as ~1.0.
    """
    before = {pid: cpu_seconds(pid) for pid in pids}
    start = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - start
    return {pid: (cpu_seconds(pid) - before[pid]) / elapsed for pid in pids}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


# --- descriptors -----------------------------------------------------------------------------


def fd_kinds(pid: int) -> Counter[str]:
    """Open descriptors of ``pid`` by kind: ``pipe``, ``socket``, ``anon_inode:[eventpoll]``,
    or the path of a file."""
    kinds: Counter[str] = Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return kinds
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed while we looked
        kind = target.split(":", 1)[0] if target.startswith(("pipe:", "socket:")) else target
        kinds[kind] += 1
    return kinds


def _fd_diff(now: Counter[str], base: Counter[str]) -> dict[str, int]:
    return {k: now[k] - base[k] for k in set(now) | set(base) if now[k] != base[k]}


# --- waiting ---------------------------------------------------------------------------------


def poll_until(
    what: str, check: Callable[[], Any], timeout: float, explain: Callable[[], str] = lambda: ""
) -> Any:
    """Call ``check`` until it returns something truthy; raise :class:`Deadline` at the
    deadline, with ``explain()`` in the message. For states without an event (/proc, status)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise Deadline(f"{what}: not within {timeout} s. {explain()}")
        time.sleep(_POLL_S)


def limit_nofile(n: int) -> list[str]:
    """A command prefix that sets RLIMIT_NOFILE (soft and hard) to ``n``, then execs the rest:
    the master, and the workers it forks, start with ``n`` descriptors at most."""
    code = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code]


# --- the control socket ----------------------------------------------------------------------


class Control:
    """A plain client for the control socket's JSON lines (no appliance code in between, so
    the abusive tests can say exactly what goes on the wire)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """Connect the way a blocking client does: waiting while the master's accept queue is
        full (a non-blocking connect would get EAGAIN), but no longer than ``timeout``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        whole, frac = divmod(timeout, 1.0)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(whole), int(frac * 1e6))
        )
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock

    @staticmethod
    def final(sock: socket.socket, timeout: float = 30.0) -> dict[str, Any]:
        """Read lines until the final reply (one with ``"ok"``); progress lines are skipped."""
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                reply = json.loads(line)
                if "ok" in reply:
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise Deadline(f"no final control reply within {timeout} s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the master closed the control connection")
            buf += chunk

    def request(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        with self.connect(timeout) as sock:
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            return self.final(sock, timeout)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        reply = self.request("status", timeout=timeout)
        assert reply.get("ok") is True, reply
        return reply["status"]


# --- the master under test -------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_FAULT_DEFAULTS: dict[str, Any] = {
    "app": {"target": "testapp:app", "directory": str(APPS)},
    "workers": {
        "count": 2,
        "graceful_timeout_s": GRACEFUL_S,
        "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        "boot_timeout_s": 10,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
    },
}


def fault_config(workdir: Path, **sections: Any) -> dict[str, Any]:
    """harness.base_config with short timeouts (so a hung worker, a drain or a stop takes
    seconds) and the test app (it reports its generation; /sleep and /block routes), with
    ``sections`` merged over it key by key."""
    return _merge(_merge(base_config(workdir), _FAULT_DEFAULTS), sections)


class Subject:
    """One running master and the invariants checked around a fault."""

    def __init__(self, master: Master, workdir: Path, config: dict[str, Any], figures: Figures):
        self.master = master
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "appliance.toml"
        self.control = Control(Path(config["control"]["path"]))
        self.figures = figures
        self.graceful_s = float(config["workers"]["graceful_timeout_s"])
        self.base_fds: Counter[str] | None = None

    # shortcuts
    @property
    def pid(self) -> int:
        return self.master.pid

    @property
    def logs(self) -> Any:
        return self.master.logs

    @property
    def port(self) -> int:
        return self.master.port

    def alive(self) -> bool:
        return self.master.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), (
            f"the master died (exit status {self.master.proc.returncode}); last lines:\n"
            + "\n".join(self.logs.lines[-30:])
        )

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Turn an error talking to the master into "the master died" when that is the cause."""
        try:
            yield
        except (OSError, ValueError, AssertionError) as exc:  # Deadline is an AssertionError
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.master.proc.wait(1)
            if not self.alive():
                raise AssertionError(
                    f"the master died (exit status {self.master.proc.returncode}) "
                    f"[{type(exc).__name__}: {exc}]; last lines:\n{self.tail()}"
                ) from exc
            raise

    def killed(self) -> list[str]:
        """Workers that died by a signal so far: the first suspects for a failed request."""
        return [
            f"{e['pid']} gen {e.get('generation')} {e['signal']} ({e.get('reason')}, "
            f"up {e.get('uptime_s')} s)"
            for e in self.logs.find("worker.exited")
            if e.get("signal")
        ]

    def worker_pids(self) -> list[int]:
        return sorted(w["pid"] for w in self.control.status()["workers"] if w["pid"])

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.logs.lines[-n:])

    # invariants
    def baseline(self, timeout: float = 30.0) -> dict[str, Any]:
        """After start: wait until the pool settled, then remember the master's descriptors."""
        status = self.settled(timeout=timeout, check_fds=False)
        self.base_fds = poll_until("a stable descriptor table", self._stable_fds, 10)
        return status

    def _stable_fds(self) -> Counter[str] | None:
        """The descriptor table if it is the same twice, a poll apart (a control connection
        of ours may still be closing)."""
        first = fd_kinds(self.pid)
        time.sleep(_POLL_S * 5)
        return first if first == fd_kinds(self.pid) else None

    def _pool_problems(self) -> tuple[list[str], dict[str, Any] | None, int, int]:
        """What keeps the pool from being settled, the status, leaked processes and fds."""
        problems: list[str] = []
        if not self.alive():
            return [f"master exited with {self.master.proc.returncode}"], None, 0, 0
        fds_now = fd_kinds(self.pid)  # before the status request: its connection is not counted
        try:
            status = self.control.status(timeout=5)
        except (OSError, ValueError, AssertionError, Deadline) as exc:
            return [f"no status: {type(exc).__name__}: {exc}"], None, 0, 0
        workers = status["workers"]
        if status["phase"] != "running":
            problems.append(f"phase {status['phase']}")
        if status["reload"]["state"] != "idle":
            problems.append(f"reload {status['reload']['state']}")
        if len(workers) != status["target"]:
            problems.append(f"{len(workers)} workers in status for a target of {status['target']}")
        odd = [
            w for w in workers if w["state"] != "ready" or w["generation"] != status["generation"]
        ]
        if odd:
            problems.append(f"workers not ready in generation {status['generation']}: {odd}")
        tree = descendants(self.pid)
        # Each generation's template process is the master's child too (status lists them).
        templates = {t["pid"] for t in status.get("templates", []) if t.get("pid")}
        known = {w["pid"] for w in workers if w["pid"]} | templates
        serving = {w["pid"] for w in workers if w["pid"] and w not in odd}

        def with_ancestors(pids: set[int]) -> set[int]:
            """Workers and their ancestors below the master (a per-generation template)."""
            out: set[int] = set()
            for pid in pids:
                while pid in tree and pid not in out:
                    out.add(pid)
                    pid = tree[pid]
            return out

        allowed = with_ancestors(known)
        zombies = [p for p in tree if proc_state(p) == "Z"]
        leaked = [p for p in tree if p not in allowed and _live(p)]
        # For the figures: every live process beyond the serving pool counts.
        extra = [p for p in tree if p not in with_ancestors(serving) and _live(p)]
        missing = [p for p in known if not _live(p)]
        if zombies:
            problems.append(f"unreaped children {zombies}")
        if leaked:
            problems.append(
                "processes the master does not report: "
                + "; ".join(f"{p} ({_cmdline(p)})" for p in leaked)
            )
        if missing:
            problems.append(f"workers in status but not running: {missing}")
        fd_leak = 0
        if self.base_fds is not None:
            diff = _fd_diff(fds_now, self.base_fds)
            if diff:
                problems.append(f"master descriptors differ from the baseline: {diff}")
                fd_leak = sum(v for v in diff.values() if v > 0)
        return problems, status, len(extra) + len(zombies), fd_leak

    def settled(self, timeout: float = 20.0, *, check_fds: bool = True) -> dict[str, Any]:
        """Wait until the pool is exactly what the master reports, and record the leaks."""
        base, self.base_fds = self.base_fds, (self.base_fds if check_fds else None)
        deadline = time.monotonic() + timeout
        try:
            while True:
                problems, status, procs, fds = self._pool_problems()
                if not problems and status is not None:
                    self.figures.leaked_processes = 0
                    self.figures.leaked_fds = 0 if check_fds else self.figures.leaked_fds
                    return status
                if time.monotonic() >= deadline:
                    self.figures.leaked_processes = procs
                    if check_fds:
                        self.figures.leaked_fds = fds
                    raise AssertionError(
                        f"the pool did not settle within {timeout} s: "
                        + " | ".join(problems)
                        + "\nlast lines:\n"
                        + self.tail()
                    )
                time.sleep(_POLL_S * 5)
        finally:
            self.base_fds = base

    def stop_within(self, seconds: float | None = None) -> float:
        """SIGTERM; the master must exit 0 within graceful + margin and leave nothing behind."""
        limit = self.graceful_s + MARGIN_S if seconds is None else seconds
        self.assert_alive()
        started = time.monotonic()
        self.master.signal(signal.SIGTERM)
        try:
            code = self.master.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.figures.stop_s = float("inf")
            tree = descendants(self.pid)
            raise AssertionError(
                f"SIGTERM did not stop the master within {limit} s "
                f"(graceful_timeout_s {self.graceful_s} + {MARGIN_S}); its children: "
                + "; ".join(f"{p} {proc_state(p)} ({_cmdline(p)})" for p in tree)
                + "\nlast lines:\n"
                + self.tail()
            ) from None
        elapsed = time.monotonic() - started
        self.figures.stop_s = max(self.figures.stop_s or 0.0, round(elapsed, 3))
        assert code == 0, f"exit status {code} after SIGTERM; last lines:\n{self.tail()}"
        left = session_members(self.pid)
        if left:
            self.figures.leaked_processes = (self.figures.leaked_processes or 0) + len(left)
        assert not left, "processes outlived the master: " + "; ".join(
            f"{p} ({_cmdline(p)})" for p in left
        )
        return elapsed


@contextlib.contextmanager
def under_load(subject: Subject, *, counted: bool = True, **kw: Any) -> Iterator[Load]:
    """``harness.Load`` against the subject, counted into its figures when it ends (unless
    the test's fault is one that fails requests by design: the master's death or stop)."""
    load = Load(subject.port, **kw)
    load._max_seconds = 3600.0  # the long form runs for longer than the harness's default
    load._max_requests = 10**9
    with load:
        try:
            yield load
        finally:
            load.stop()
            if counted:
                subject.figures.count_load(load)
            else:
                subject.figures.notes["requests_not_counted"] = load.ok + len(load.failures)
