"""The bench harness: run every scenario against every peer, write JSON under bench/results/.

Stdlib only (the report's plots use matplotlib when it is importable; the profile scenario
runs the py-spy binary). Run it with the bench venv through scripts/bench, or directly:

  python -m bench.harness [--quick] [--peers appliance,uvicorn] [--scenarios throughput,...]
                          [--reps 3] [--secs 3] [--workers 2] [--out FILE] [--no-report]

Method: peers are *interleaved*. For the timing scenarios (throughput, newconn, mastercpu,
startup) every peer (and, for throughput, every worker count) is started side by side, idle,
and each repetition measures every one of them round-robin, the order rotated from one
repetition to the next, so the background load of a shared machine spreads over all peers
alike. Ratios (appliance / best Python peer, / nginx, / node, N workers / 1 worker) are
computed within one repetition and the report shows their medians. Before anything runs, the
repo's appliance/ and bench/ and the venv's site-packages are byte-compiled
(PYTHONDONTWRITEBYTECODE=1 would otherwise make every start of the editable appliance compile
from source, and no peer's).

The scenarios, the peers and who takes part in what: SCENARIO_HELP, SCENARIO_PEERS and SUITES
below and peers.DESCRIPTIONS (``scripts/bench --help`` prints them); each scenario's method is
in its method's docstring and in docs/benchmarks.md.

Where results go: --quick writes bench/results/quick.json and nothing else (no report, raw
profiles under bench/results/raw/). A run of every scenario and every peer writes
bench/results/latest.json and regenerates docs/benchmarks.md (unless --no-report); a run of
a subset writes bench/results/partial.json and leaves the report alone (render it with
``python -m bench.report FILE`` if wanted). --out FILE overrides the JSON path.
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import client, peers, profile
from bench.peers import APPLIANCE, APPLIANCE_KERNEL, APPLIANCE_WSGI, ASGI_PEERS, WSGI_PEERS

ROOT = peers.ROOT
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Every scenario, in run order, with what it measures (shown by --help).
SCENARIO_HELP = {
    "throughput": "keep-alive req/s and p99: hello (ASGI) and hello (WSGI) with wrk, cpu with "
    "our client (busiest worker's share of requests and connections); 1 and N workers",
    "newconn": "req/s with a new connection per request (wrk -H 'Connection: close'), N "
    "workers: balanced vs kernel accepting vs the peers",
    "placement": "1 worker, wrk c=1 and c=4 keep-alive with wrk and the serving process "
    "pinned to the same CPU, to different CPUs, and unpinned: how much of a low-concurrency "
    "number is where the scheduler put the load generator",
    "mastercpu": "the master's CPU (schedstat, all threads) under wrk c=16, keep-alive and "
    "Connection: close, % of one core",
    "startup": "spawn to the first 200 response, and to READY=1 (appliance, NOTIFY_SOCKET)",
    "workerboot": "appliance's own events: template fork to worker ready (boot_s), kill -9 to "
    "the replacement's ready, and the start-up steps (master.started, template.ready, "
    "master.ready)",
    "reload": "N x kill -HUP under mixed load (keep-alive and new-connection clients): "
    "failed requests",
    "kill": "kill -9 of one worker under mixed load: failed requests, time to a new pid "
    "answering",
    "memory": "PSS per process (master, template, workers, helpers) after warm-up, by mapping "
    "kind",
    "profile": "py-spy on one worker under wrk c=16 (hello, N workers): top functions by own "
    "and total time, time by component; raw stacks saved",
}
SCENARIOS = tuple(SCENARIO_HELP)

#: Which peers take part in which scenario (a peer not in --peers is skipped, silently).
_ALL = peers.PEERS
SCENARIO_PEERS: dict[str, tuple[str, ...]] = {
    "throughput": _ALL,  # each in the suites it belongs to (SUITES)
    "newconn": (APPLIANCE, APPLIANCE_KERNEL, *ASGI_PEERS, "node", "nginx"),
    "placement": (APPLIANCE, *ASGI_PEERS),
    "mastercpu": (APPLIANCE, APPLIANCE_KERNEL, *ASGI_PEERS, "gunicorn-sync", "node"),
    "startup": (APPLIANCE, *ASGI_PEERS, "gunicorn-sync", "node"),
    "workerboot": (APPLIANCE,),
    "reload": (APPLIANCE, *ASGI_PEERS, "gunicorn-sync", "node"),
    "kill": (APPLIANCE, *ASGI_PEERS, "gunicorn-sync", "node"),
    "memory": (APPLIANCE, APPLIANCE_WSGI, *ASGI_PEERS, *WSGI_PEERS, "node"),
    "profile": (APPLIANCE, "uvicorn", "gunicorn-uvicorn"),
}
#: Where wrk runs relative to the pinned server in the placement scenario, and at what load.
PLACEMENTS = ("same", "apart", "free")
PLACEMENT_CONCS = (1, 4)
#: Concurrency of the load under which master CPU and the profile are measured.
LOAD_CONC = 16
#: The cpu app is measured up to this concurrency (our Python client is its load generator).
CPU_MAX_CONC = 16
#: Sampling rate of the profile, per second.
PROFILE_RATE_HZ = 200


@dataclass(frozen=True)
class Suite:
    """One interleaved group of the throughput scenario: every peer in it is started with 1
    and with N workers, side by side, and measured round-robin."""

    name: str
    app: str
    peers: tuple[str, ...]
    max_conc: int | None = None


SUITES = (
    Suite("hello", "hello", (APPLIANCE, *ASGI_PEERS, "node", "nginx")),
    Suite("hello-wsgi", "hello", (APPLIANCE_WSGI, *WSGI_PEERS)),
    Suite("cpu", "cpu", (APPLIANCE, APPLIANCE_KERNEL, *ASGI_PEERS, "gunicorn-sync", "node"),
          max_conc=CPU_MAX_CONC),
)


# -- measurements ----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of pid, from /proc/PID/task/*/schedstat (ns resolution;
    utime+stime ticks are 10 ms, too coarse for an idle master)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def thread_schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for a CPU) of pid's main thread."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            run_ns, wait_ns = f.read().split()[:2]
        return int(run_ns), int(wait_ns)
    except (OSError, ValueError):
        return 0, 0


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_by_kind(pid: int) -> dict[str, int]:
    """PSS in KiB per kind of mapping: anonymous (heap, Python objects), the interpreter
    binary/libpython, other shared libraries and extension modules (.so), other files."""
    out = {"anon": 0, "python": 0, "so": 0, "files": 0}
    kind = "anon"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else ""
                    if not path or path.startswith("["):
                        kind = "anon"
                    elif re.search(r"/(python3[\d.]*|libpython[^/]*|node|nginx)$", path):
                        kind = "python"
                    elif ".so" in path:
                        kind = "so"
                    else:
                        kind = "files"
                elif first == "Pss:":
                    out[kind] += int(line.split()[1])
    except OSError:
        pass
    return out


def wrk(port: int, conc: int, secs: float, close: bool = False,
        cpu: int | None = None) -> dict[str, Any] | None:
    """One wrk run; with ``cpu``, wrk is pinned to that CPU (taskset)."""
    exe = shutil.which("wrk")
    if exe is None:
        return None
    threads = max(1, min(2, conc))
    pinned = [] if cpu is None else ["taskset", "-c", str(cpu)]
    argv = [*pinned, exe, f"-t{threads}", f"-c{conc}", f"-d{max(1, round(secs))}s", "--latency",
            "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [f"http://127.0.0.1:{port}/"], check=False,
                         capture_output=True, text=True, timeout=secs + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "tool": "wrk",
        "rps": float(rps.group(1)) if rps else 0.0,
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else None,
        "failed": (sum(int(x) for x in errs.groups()) if errs else 0)
        + (int(non2xx.group(1)) if non2xx else 0),
    }


def summary(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """What a load cell's row holds over its repetitions: medians of req/s, p99 and server
    CPU per request, failures summed, the repetitions themselves."""
    return {"tool": reps[0]["tool"], "rps": med([r["rps"] for r in reps]),
            "p99_ms": med([r["p99_ms"] for r in reps]),
            "server_cpu_us": med([r.get("server_cpu_us") for r in reps]),
            "failed": sum(r["failed"] for r in reps), "reps": reps}


def pin(pids: Sequence[int], cpus: set[int]) -> None:
    """Every thread of ``pids`` allowed only on ``cpus`` (a process that exited is skipped)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


def med(xs: Sequence[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def python_cpu_work_ms(iterations: int) -> float:
    """CPU time of one call of the cpu app's loop of ``iterations`` in this interpreter, in
    ms: the fastest of 15 batches of 10 calls, in process CPU time. Wall-clock medians were
    what another tenant's burst or a preemption made of them (one run calibrated to 2.96 ms a
    count that then took its workers 1.8 ms); the least disturbed batch is the loop's cost."""
    from bench.apps.work import cpu_work

    best = float("inf")
    for _ in range(15):
        t0 = time.process_time()
        for _ in range(10):
            cpu_work(iterations)
        best = min(best, (time.process_time() - t0) / 10 * 1000)
    return best


def calibrate_cpu_work() -> tuple[int, float]:
    """The cpu app's iteration count for ``CPU_TARGET_MS`` here, and what it then takes (ms).

    Exported as ``BENCH_CPU_ITERATIONS``, which every peer's cpu app reads at import (they
    inherit this process's environment), so the cpu scenario costs the same time per request
    on a fast and on a slow machine (bench/apps/work.py). The count is fitted twice: the
    loop's cost per iteration is not quite the same at every length (a short loop pays its
    call more often)."""
    from bench.apps import work

    iterations = work.DEFAULT_ITERATIONS
    for _ in range(2):
        took = python_cpu_work_ms(iterations)
        iterations = max(1000, round(iterations * work.CPU_TARGET_MS / took))
    os.environ["BENCH_CPU_ITERATIONS"] = str(iterations)
    return iterations, round(python_cpu_work_ms(iterations), 3)


def rotated(items: list[Any], rep: int, reps: int) -> list[Any]:
    """The round-robin order of repetition ``rep``: rotated by an even step per repetition,
    and reversed on odd repetitions, so no peer always runs first or right after another."""
    if not items:
        return []
    step = max(1, -(-len(items) // max(1, reps)))
    k = (rep * step) % len(items)
    out = items[k:] + items[:k]
    return out[::-1] if rep % 2 else out


def precompile() -> dict[str, Any]:
    """Byte-compile appliance/, bench/ and the running venv's site-packages (skips files that
    are up to date), so no peer compiles from source at start-up."""
    t0 = time.monotonic()
    ok = True
    for d in (ROOT / "appliance", ROOT / "bench", Path(sysconfig.get_paths()["purelib"])):
        if d.is_dir():
            ok &= bool(compileall.compile_dir(str(d), quiet=2, workers=1))
    return {"precompiled": True, "ok": ok, "seconds": round(time.monotonic() - t0, 2),
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", "")}


def read_events(path: Path) -> list[dict[str, Any]]:
    """appliance's JSON log lines (``{"ts": ..., "event": ...}``) from a peer's output file;
    other lines (a traceback, uvicorn's own text) are skipped."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and "event" in ev:
            out.append(ev)
    return out


def event_time(ev: dict[str, Any]) -> float | None:
    """The wall-clock time of an event (``ts``, ISO 8601 in UTC, millisecond resolution)."""
    from datetime import datetime

    ts = ev.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


class Monitor:
    """Machine load while the bench runs: /proc/loadavg every few seconds and CPU time per
    state (/proc/stat) per scenario, so the report can say how loaded the machine was."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self.marks: dict[str, dict[str, float]] = {}
        self._halt = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._open: dict[str, list[int]] = {}

    @staticmethod
    def cpu_times() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]

    @staticmethod
    def loadavg() -> float:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])

    def _run(self) -> None:
        limit = 4 * 3600 / self.every_s  # bounded even if nobody stops us
        while not self._halt.is_set() and len(self.samples) < limit:
            self.samples.append((round(time.monotonic() - self._t0, 1), self.loadavg()))
            self._halt.wait(self.every_s)

    def start(self) -> None:
        self._open["all"] = self.cpu_times()
        self._thread.start()

    def begin(self, name: str) -> None:
        self._open[name] = self.cpu_times()

    def end(self, name: str) -> None:
        a, b = self._open.pop(name, None), self.cpu_times()
        if a is None:
            return
        d = [y - x for x, y in zip(a, b)]
        total = sum(d) or 1
        # user nice system idle iowait irq softirq steal
        self.marks[name] = {"busy_pct": round(100 * (total - d[3] - d[4]) / total, 1),
                            "steal_pct": round(100 * d[7] / total, 1),
                            "seconds": round(total / CLK_TCK / (os.cpu_count() or 1), 1)}

    def stop(self) -> dict[str, Any]:
        self.end("all")
        self._halt.set()
        self._thread.join(self.every_s + 1)
        loads = [x[1] for x in self.samples]
        return {"loadavg_samples": self.samples,
                "loadavg_min": min(loads, default=None), "loadavg_median": med(loads),
                "loadavg_max": max(loads, default=None), "cpu": self.marks}


# -- scenarios -------------------------------------------------------------------------------

Cell = Callable[[peers.Running, int], dict[str, Any]]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.port = args.port
        self.raw = RESULTS / "raw"
        self.log = self.raw / "peers.log"
        self.raw.mkdir(parents=True, exist_ok=True)
        #: Where the profile's raw stacks go: bench/results/ for a full run, raw/ otherwise.
        self.artifacts = RESULTS if args.keep_artifacts else self.raw
        self.skipped: dict[str, str] = {}

    def say(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start(self, peer: str, workers: int, app: str, *, log: Path | None = None,
              log_level: str = "warning") -> tuple[peers.Running, float]:
        # A fresh port per start (no TIME_WAIT or straggler confusion); on a shared machine a
        # port may be taken by someone else, so try a few.
        for attempt in range(3):
            self.port += 1 + 7 * attempt
            try:
                return peers.start(peer, self.port, workers, app, log=log or self.log,
                                   log_level=log_level)
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def start_all(self, insts: list[tuple[str, int]], app: str, scenario: str,
                  ) -> dict[tuple[str, int], peers.Running]:
        running = {}
        for peer, w in insts:
            try:
                run = self.start(peer, w, app)[0]
                # Warm-up, the same for everyone (JIT, caches, lazily imported code).
                client.run(f"http://127.0.0.1:{run.port}/", 2, 0.5)
                running[(peer, w)] = run
            except Exception as e:  # one broken peer must not lose the others' results
                self.say(f"{peer} w={w} {app}: start FAILED: {e!r}")
                self.skipped[f"{peer}/{scenario}/{app}/w{w}"] = repr(e)
        return running

    def interleaved(self, insts: list[tuple[str, int]], app: str, scenario: str,
                    concs: list[int], cell: Cell, label: str = "",
                    describe: Callable[[int], str] = "c={}".format,
                    ) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
        """Start every instance, then per repetition and concurrency measure each one in the
        rotated order; {(peer, workers, concurrency): [one dict per repetition]}.
        ``describe`` names a concurrency in the log (the placement scenario's are cases)."""
        running = self.start_all(insts, app, scenario)
        cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        try:
            for rep in range(self.a.reps):
                order = rotated([i for i in insts if i in running], rep, self.a.reps)
                self.say(f"{label or app} rep {rep + 1}/{self.a.reps}: order "
                         + ", ".join(f"{p}/{w}w" for p, w in order))
                for conc in concs:
                    for peer, w in order:
                        r = cell(running[(peer, w)], conc)
                        r["rep"] = rep
                        r["t"] = round(time.monotonic(), 2)
                        cells.setdefault((peer, w, conc), []).append(r)
                    self.say(f"  {describe(conc)}: " + ", ".join(
                        f"{p}/{w}w {cells[(p, w, conc)][-1]['rps']:.0f}" for p, w in order))
        finally:
            for run in running.values():
                run.stop()
        return cells

    def one_cell(self, run: peers.Running, app: str, conc: int,
                 close: bool = False, wrk_cpu: int | None = None) -> dict[str, Any]:
        """One load run against ``run``; with the CPU time all of the peer's processes spent
        during it, per request served (``server_cpu_us``): what serving costs, whatever
        share of the two cores the load generator took. ``wrk_cpu`` pins wrk."""
        port = run.port
        pids = [pid for _, pid in run.processes()]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        r: dict[str, Any] | None = None
        if app == "hello" and not self.a.no_wrk:
            r = wrk(port, conc, self.a.secs, close=close, cpu=wrk_cpu)
        if r is None:
            d = client.run(f"http://127.0.0.1:{port}/", conc, self.a.secs,
                           mode="close" if close else "keepalive").to_dict()
            r = {"tool": "client", "rps": d["rps"], "p99_ms": d["p99_ms"],
                 "failed": d["failed"], "failures": d["failures"],
                 "busiest_share": d["busiest_share"],
                 "busiest_conn_share": d["busiest_conn_share"], "pids": d["pids"],
                 "conn_pids": d["conn_pids"]}
        served = r["rps"] * self.a.secs
        spent = sum(cpu_seconds(p) for p in pids) - cpu0
        r["server_cpu_us"] = spent / served * 1e6 if served > 0 else None
        return r

    def throughput(self, names: list[str]) -> list[dict[str, Any]]:
        """Keep-alive throughput, suite by suite (:data:`SUITES`): hello (ASGI) with appliance,
        the ASGI Python peers, node and nginx; hello (WSGI) with appliance-wsgi and gunicorn
        sync/gthread; cpu with the ASGI peers, appliance-kernel, gunicorn sync and node (up to
        c=16, our client, which records who answered). Each suite: every peer with 1 and N
        workers side by side, measured round-robin per repetition and concurrency."""
        rows = []
        for suite in SUITES:
            members = [p for p in suite.peers if p in names]
            if not members:
                continue
            concs = [c for c in self.a.concs if suite.max_conc is None or c <= suite.max_conc]
            concs = concs or self.a.concs[:1]
            insts = [(p, w) for p in members for w in sorted({1, self.a.workers})]
            app = suite.app

            def cell(run: peers.Running, conc: int, app: str = app) -> dict[str, Any]:
                return self.one_cell(run, app, conc)

            cells = self.interleaved(insts, app, "throughput", concs, cell, label=suite.name)
            for (peer, w, conc), reps in sorted(cells.items(), key=lambda kv: (
                    members.index(kv[0][0]), kv[0][1], kv[0][2])):
                rows.append({"suite": suite.name, "peer": peer, "workers": w,
                             "app": suite.app, "concurrency": conc, **summary(reps),
                             "busiest_share": med([r.get("busiest_share") for r in reps]),
                             "busiest_conn_share": med([r.get("busiest_conn_share")
                                                        for r in reps])})
        return rows

    def newconn(self, names: list[str]) -> list[dict[str, Any]]:
        """Every request on a new connection (wrk -H "Connection: close"; our client's close
        mode without wrk), hello app, N workers, at --close-concs: what accepting costs.
        appliance's balanced accepting against accept = "kernel", the ASGI peers, node and
        nginx, interleaved like throughput."""
        insts = [(p, self.a.workers) for p in names]
        cells = self.interleaved(
            insts, "hello", "newconn", self.a.close_concs, label="newconn",
            cell=lambda run, conc: self.one_cell(run, "hello", conc, close=True))
        rows = []
        for (peer, w, conc), reps in sorted(cells.items(), key=lambda kv: (
                names.index(kv[0][0]), kv[0][2])):
            rows.append({"peer": peer, "workers": w, "app": "hello", "concurrency": conc,
                         **summary(reps)})
        return rows

    def placement(self, names: list[str]) -> list[dict[str, Any]]:
        """Keep-alive hello, 1 worker, wrk at :data:`PLACEMENT_CONCS` in three placements:
        ``same`` (wrk and every thread of the serving process pinned to one CPU), ``apart``
        (the server on one CPU, wrk on another) and ``free`` (nobody pinned: what the
        throughput suites see). With the load generator on the machine, a request that wakes
        a process on the other CPU pays a cross-CPU wake-up; this says how much of a
        low-concurrency number that is. Interleaved like throughput; the server's pinning is
        undone after each cell."""
        cpus = sorted(os.sched_getaffinity(0))
        if (len(cpus) < 2 or self.a.no_wrk
                or shutil.which("taskset") is None or shutil.which("wrk") is None):
            self.skipped["placement"] = "needs 2 CPUs, taskset and wrk"
            return []
        server_cpu, other = cpus[0], cpus[1]
        wrk_cpu = {"same": server_cpu, "apart": other, "free": None}
        cases = [(where, conc) for where in PLACEMENTS for conc in PLACEMENT_CONCS]

        def cell(run: peers.Running, case: int) -> dict[str, Any]:
            where, conc = cases[case]
            serving = run.worker_pids() or [run.master_pid]  # uvicorn -w 1 serves itself
            if where != "free":
                pin(serving, {server_cpu})
            try:
                r = self.one_cell(run, "hello", conc, wrk_cpu=wrk_cpu[where])
            finally:
                pin(serving, set(cpus))
            return r

        cells = self.interleaved(
            [(p, 1) for p in names], "hello", "placement", list(range(len(cases))), cell,
            label="placement", describe=lambda case: "{} c={}".format(*cases[case]))
        rows = []
        for (peer, _, case), reps in sorted(cells.items(), key=lambda kv: (
                names.index(kv[0][0]), kv[0][2])):
            where, conc = cases[case]
            rows.append({"peer": peer, "workers": 1, "app": "hello", "placement": where,
                         "concurrency": conc, **summary(reps)})
        return rows

    def mastercpu(self, names: list[str]) -> list[dict[str, Any]]:
        """Master CPU while wrk c=16 loads the workers, keep-alive and Connection: close.
        Workers' CPU is summed over the request-serving children (appliance's template is
        not one of them)."""
        insts = [(p, self.a.workers) for p in names]
        running = self.start_all(insts, "hello", "mastercpu")
        out: dict[tuple[str, str], list[dict[str, float]]] = {}
        try:
            for rep in range(self.a.reps):
                for peer, w in rotated([i for i in insts if i in running], rep, self.a.reps):
                    run = running[(peer, w)]
                    kids = run.worker_pids()
                    for mode in ("keepalive", "close"):
                        c0, t0 = cpu_seconds(run.master_pid), time.monotonic()
                        wc0 = sum(cpu_seconds(p) for p in kids)
                        r = None if self.a.no_wrk else wrk(run.port, LOAD_CONC, self.a.secs,
                                                           close=(mode == "close"))
                        if r is None:
                            d = client.run(f"http://127.0.0.1:{run.port}/", LOAD_CONC,
                                           self.a.secs, mode=mode).to_dict()
                            r = {"rps": d["rps"], "failed": d["failed"]}
                        c1, t1 = cpu_seconds(run.master_pid), time.monotonic()
                        wc1 = sum(cpu_seconds(p) for p in kids)
                        out.setdefault((peer, mode), []).append({
                            "rep": rep, "master_cpu_pct": (c1 - c0) / (t1 - t0) * 100,
                            "workers_cpu_pct": (wc1 - wc0) / (t1 - t0) * 100,
                            "rps": r["rps"], "failed": r.get("failed", 0)})
        finally:
            for run in running.values():
                run.stop()
        rows = []
        for (peer, mode), reps in out.items():
            row = {"peer": peer, "workers": self.a.workers, "mode": mode,
                   "master_cpu_pct": med([r["master_cpu_pct"] for r in reps]),
                   "master_cpu_pct_max": max(r["master_cpu_pct"] for r in reps),
                   "workers_cpu_pct": med([r["workers_cpu_pct"] for r in reps]),
                   "rps": med([r["rps"] for r in reps]),
                   "failed": sum(r["failed"] for r in reps), "reps": reps}
            rows.append(row)
            self.say(f"{peer} master CPU ({mode}): {row['master_cpu_pct']:.2f}% of a core "
                     f"(max {row['master_cpu_pct_max']:.2f}%, {row['rps']:.0f} req/s)")
        return rows

    def startup(self, names: list[str]) -> list[dict[str, Any]]:
        """Spawn to the first 200 (polled every 5 ms) with N workers, interleaved; for
        appliance also spawn to READY=1 on the harness's NOTIFY_SOCKET, which the master sends
        once every first-generation worker (forked from the template) is ready."""
        times: dict[str, list[float]] = {p: [] for p in names}
        ready: dict[str, list[float]] = {p: [] for p in names}
        for rep in range(self.a.reps):
            for peer in rotated(list(names), rep, self.a.reps):
                try:
                    run, first = self.start(peer, self.a.workers, "hello")
                except Exception as e:
                    self.skipped[f"{peer}/startup"] = repr(e)
                    continue
                run.stop()
                times[peer].append(first)
                if run.ready_s is not None:
                    ready[peer].append(run.ready_s)
        rows = []
        for peer in names:
            if not times[peer]:
                continue
            row = {"peer": peer, "workers": self.a.workers,
                   "first_response_s_median": med(times[peer]), "runs_s": times[peer],
                   "ready_s_median": med(ready[peer]), "ready_runs_s": ready[peer]}
            rows.append(row)
            self.say(f"{peer} start to first response: {[round(x, 3) for x in times[peer]]} s"
                     + (f", to READY=1: {[round(x, 3) for x in ready[peer]]} s"
                        if ready[peer] else ""))
        return rows

    def workerboot(self, peer: str) -> dict[str, Any]:
        """appliance's boot times, from its own events (log level info, JSON on stderr into a
        file of ours), idle, --reps fresh starts of N workers, each followed by --kills
        kill -9 of a worker (the slots in turn, 0.5 s apart, so no slot's crash backoff
        grows):

        * start: spawn (harness clock) to ``master.started`` (interpreter, imports, config,
          sockets), ``template.ready`` ``boot_s`` (the template's fork to the app's
          environment in place), ``worker.ready`` ``boot_s`` of generation 1, and
          ``master.ready`` ``startup_s`` (the master's own start to READY=1);
        * per kill: the replacement's ``worker.ready`` ``boot_s`` (the master's spawn
          decision to the worker's ``ready`` on its pipe: the request to the template, the
          fork, the worker's own set-up), and the wall time from ``kill -9`` to that
          ``worker.ready`` (includes noticing the exit and any ``respawn_in_s`` backoff,
          which is recorded too). Event timestamps have millisecond resolution."""
        runs: list[dict[str, Any]] = []
        for rep in range(self.a.reps):
            log = self.raw / f"workerboot-{peer}-{rep}.log"
            log.unlink(missing_ok=True)
            wall0 = time.time()
            run, first = self.start(peer, self.a.workers, "hello", log=log, log_level="info")
            kills: list[dict[str, Any]] = []
            try:
                for k in range(self.a.kills):
                    st = run.status() or {}
                    ws = sorted((w for w in st.get("workers", []) if isinstance(w, dict)),
                                key=lambda w: w.get("id", 0))
                    if not ws:
                        break
                    victim = ws[k % len(ws)]
                    slot, pid = victim.get("id"), int(victim["pid"])
                    t_kill = time.time()
                    os.kill(pid, signal.SIGKILL)
                    ready = exited = None
                    deadline = time.monotonic() + 5.0
                    while time.monotonic() < deadline and ready is None:
                        time.sleep(0.005)
                        for ev in read_events(log):
                            if ev.get("event") == "worker.exited" and ev.get("pid") == pid:
                                exited = ev
                            if (ev.get("event") == "worker.ready" and ev.get("worker_id") == slot
                                    and ev.get("pid") != pid and (event_time(ev) or 0)
                                    >= t_kill - 0.002):
                                ready = ev
                    t_ready = event_time(ready) if ready else None
                    kills.append({
                        "slot": slot, "killed_pid": pid,
                        "new_pid": ready.get("pid") if ready else None,
                        "boot_s": ready.get("boot_s") if ready else None,
                        "kill_to_ready_s": None if t_ready is None else round(t_ready - t_kill, 4),
                        "respawn_in_s": (exited or {}).get("respawn_in_s"),
                        "exit_reason": (exited or {}).get("reason")})
                    time.sleep(0.5)
            finally:
                run.stop()
            evs = read_events(log)
            started = next((e for e in evs if e.get("event") == "master.started"), None)
            tpl = next((e for e in evs if e.get("event") == "template.ready"), None)
            mready = next((e for e in evs if e.get("event") == "master.ready"), None)
            gen1 = [e.get("boot_s") for e in evs if e.get("event") == "worker.ready"
                    and e.get("generation") == 1][: self.a.workers]
            t_started = event_time(started) if started else None
            runs.append({
                "first_response_s": round(first, 4), "ready_s": run.ready_s,
                "spawn_to_master_started_s": None if t_started is None
                else round(t_started - wall0, 4),
                "template_boot_s": (tpl or {}).get("boot_s"),
                "master_startup_s": (mready or {}).get("startup_s"),
                "gen1_worker_boot_s": gen1, "kills": kills})
        kills = [k for r in runs for k in r["kills"]]
        boots = [k["boot_s"] for k in kills if k["boot_s"] is not None]
        k2r = [k["kill_to_ready_s"] for k in kills if k["kill_to_ready_s"] is not None]
        gen1 = [b for r in runs for b in r["gen1_worker_boot_s"] if b is not None]
        row = {"peer": peer, "workers": self.a.workers, "runs": runs,
               "replacement_boot_s_median": med(boots),
               "replacement_boot_s_max": max(boots, default=None),
               "kill_to_ready_s_median": med(k2r), "kill_to_ready_s_max": max(k2r, default=None),
               "gen1_boot_s_median": med(gen1),
               "template_boot_s_median": med([r["template_boot_s"] for r in runs]),
               "master_startup_s_median": med([r["master_startup_s"] for r in runs]),
               "spawn_to_master_started_s_median": med([r["spawn_to_master_started_s"]
                                                        for r in runs]),
               "ready_s_median": med([r["ready_s"] for r in runs]),
               "kills": len(kills), "kills_replaced": len(boots)}
        self.say(f"{peer} worker boot: replacement {boots} s, kill->ready {k2r} s, "
                 f"gen 1 {gen1} s, template {[r['template_boot_s'] for r in runs]} s")
        return row

    def _wait_reloaded(self, run: peers.Running, old: set[int], timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            # Done when N new workers exist and N old ones are gone (a peer may keep a helper
            # child, e.g. multiprocessing's resource tracker, across the reload; appliance's
            # templates are not workers).
            now = set(run.worker_pids())
            if len(now - old) >= run.workers and len(now & old) <= len(old) - run.workers:
                return time.monotonic() - t0
            time.sleep(0.02)
        return float("nan")

    @staticmethod
    def _mixed(port: int, budget: float, halt: threading.Event,
               ) -> tuple[list[threading.Thread], dict[str, client.Result]]:
        """Two load clients at once: 4 keep-alive connections and 4 new-connection loops."""
        box: dict[str, client.Result] = {}
        threads = [threading.Thread(target=lambda m=mode: box.setdefault(
            m, client.run(f"http://127.0.0.1:{port}/", 4, budget, mode=m, stop=halt)))
            for mode in ("keepalive", "close")]
        for t in threads:
            t.start()
        return threads, box

    def reload(self, peer: str) -> dict[str, Any]:
        """--reloads x ``kill -HUP`` of the master under the mixed load (4 keep-alive and 4
        new-connection loops), each time waiting (at most 20 s) until N new workers exist and
        N old ones are gone; every failed request counts, by kind."""
        n = self.a.reloads
        run, _ = self.start(peer, self.a.workers, "hello")
        budget = n * 12.0 + 5
        halt = threading.Event()
        durations = []
        threads: list[threading.Thread] = []
        try:
            threads, box = self._mixed(run.port, budget, halt)
            time.sleep(1.0)
            for _ in range(n):
                old = set(run.worker_pids())
                os.kill(run.master_pid, signal.SIGHUP)
                durations.append(self._wait_reloaded(run, old, 20.0))
                time.sleep(0.3)
            time.sleep(0.5)
        finally:
            halt.set()
            for t in threads:
                t.join(budget + 10)  # in-flight requests finish (bounded by the timeout)
            stop_at = time.monotonic()
            run.stop()
        per_mode: dict[str, dict[str, Any]] = {}
        for mode, res in box.items():
            per_mode[mode] = {"failed": len([ft for ft in res.failure_times if ft < stop_at]),
                              "failures": failure_kinds(res, stop_at), "ok": res.ok}
        ok_durs = [d for d in durations if not math.isnan(d)]
        row = {"peer": peer, "workers": self.a.workers, "reloads": n,
               "failed": sum(m["failed"] for m in per_mode.values()),
               "failures": {f"{mode}:{k}": v for mode, m in per_mode.items()
                            for k, v in m["failures"].items()},
               "ok": sum(m["ok"] for m in per_mode.values()), "modes": per_mode,
               "reload_s_median": med(ok_durs), "reloads_completed": len(ok_durs),
               "how": run.reload_note}
        self.say(f"{peer} reload x{n}: failed={row['failed']} {row['failures']} ok={row['ok']} "
                 f"reload median={row['reload_s_median']} s completed={len(ok_durs)}/{n}")
        return row

    def kill(self, peer: str) -> dict[str, Any]:
        """kill -9 of the newest worker 1 s into the mixed load; the load goes on until a new
        worker pid has existed for 1 s (so it had time to answer) or 5 s after the kill (a
        peer that waits before respawning, e.g. granian's 3.5 s respawn interval)."""
        rows: list[dict[str, Any]] = []
        for _ in range(self.a.kills):
            run, _ = self.start(peer, self.a.workers, "hello")
            halt = threading.Event()
            threads: list[threading.Thread] = []
            try:
                threads, box = self._mixed(run.port, 10.0, halt)
                time.sleep(1.0)
                before = set(run.worker_pids())
                victim = max(before)
                t_kill = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                seen_new: float | None = None
                while time.monotonic() - t_kill < 5.0:
                    if seen_new is None and set(run.worker_pids()) - before:
                        seen_new = time.monotonic()
                    if seen_new is not None and time.monotonic() - seen_new >= 1.0:
                        break
                    time.sleep(0.02)
            finally:
                halt.set()
                for t in threads:
                    t.join(15)
                run.stop()
            new = [ts for res in box.values() for pid, ts in res.first_seen.items()
                   if pid not in before and ts > t_kill]
            rows.append({"failed": sum(r.failed for r in box.values()),
                         "failures": {f"{m}:{k}": v for m, r in box.items()
                                      for k, v in r.failures.items() if v},
                         "replacement_ms": (min(new) - t_kill) * 1000 if new else None})
        out = {"peer": peer, "workers": self.a.workers, "kills": len(rows),
               "failed_median": med([r["failed"] for r in rows]),
               "failed_total": sum(r["failed"] for r in rows),
               "replacement_ms_median": med([r["replacement_ms"] for r in rows]),
               "replacement_ms_max": max((r["replacement_ms"] for r in rows
                                          if r["replacement_ms"] is not None), default=None),
               "runs": rows}
        reps_ms = [None if r["replacement_ms"] is None else round(r["replacement_ms"], 1)
                   for r in rows]
        self.say(f"{peer} kill -9: failed={[r['failed'] for r in rows]} replacement ms={reps_ms}")
        return out

    def memory(self, peer: str) -> dict[str, Any]:
        """PSS of every process of the peer (N workers, hello) after 1 s of load at c=4.
        Roles: the master (the process we started), appliance's template (from its status:
        a child of the master that forks the workers and serves nothing; part of appliance's
        footprint, so in its total), workers (the master's other children: appliance's are
        re-parented to it by the child subreaper), helpers (multiprocessing's resource
        tracker)."""
        run, _ = self.start(peer, self.a.workers, "hello")
        try:
            client.run(f"http://127.0.0.1:{run.port}/", 4, 1.0)
            detail: list[dict[str, Any]] = []
            for role, pid in run.processes():
                detail.append({"role": role, "pid": pid, "pss_kib": pss_kib(pid) or 0,
                               "by_kind_kib": pss_by_kind(pid), "cmd": peers.cmdline(pid)[:120]})
        finally:
            run.stop()

        def mib(role: str) -> list[float]:
            return [d["pss_kib"] / 1024 for d in detail if d["role"] == role]

        master = mib("master")[0]
        total = sum(d["pss_kib"] for d in detail) / 1024
        row = {"peer": peer, "workers": self.a.workers, "master_pss_mib": master,
               "template_pss_mib": mib("template"), "worker_pss_mib": mib("worker"),
               "helper_pss_mib": mib("helper"), "total_pss_mib": total,
               "total_without_template_mib": total - sum(mib("template")),
               "processes": detail}
        self.say(f"{peer} PSS: master {master:.1f} MiB, template "
                 f"{[round(x, 1) for x in row['template_pss_mib']]}, workers "
                 f"{[round(x, 1) for x in row['worker_pss_mib']]}, helpers "
                 f"{[round(x, 1) for x in row['helper_pss_mib']]}, total {total:.1f} MiB")
        return row

    def profile(self, peer: str) -> dict[str, Any]:
        """One worker of the peer (N workers, hello) while wrk c=16 loads the pool, recorded
        twice in a row under the same load, each for --profile-secs (the first starting 0.7 s
        into the load):

        1. py-spy (``record --format raw --function --native --rate 200``): wall-clock stacks
           with Python and C frames, summarised by bench/profile.py (own and total time per
           function, time by component); the collapsed stacks are kept (bench/results/
           profile-PEER.txt for a full run);
        2. perf (``record -e cpu-clock -F 499``): on-CPU samples only, by shared object and
           symbol (kernel, libpython, uvloop, llhttp); the text report is kept beside.

        The main thread's on-CPU and run-queue time over each recording (schedstat) says how
        much of py-spy's wall-clock time was spent waiting for a CPU."""
        secs = max(1, round(self.a.profile_secs))
        run, _ = self.start(peer, self.a.workers, "hello")
        box: dict[str, Any] = {}
        prefix = "" if self.a.keep_artifacts else "quick-" if self.a.quick else "partial-"
        out = self.artifacts / f"{prefix}profile-{peer}.txt"
        perf_txt = self.artifacts / f"{prefix}profile-{peer}.perf.txt"
        perf_data = self.raw / f"{prefix}profile-{peer}.perf.data"
        for f in (out, perf_txt, perf_data):
            f.unlink(missing_ok=True)
        sched: dict[str, dict[str, float | None]] = {}

        def window(name: str, fn: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
            s0, t0 = thread_schedstat(pid), time.monotonic()
            res = fn()
            s1, t1 = thread_schedstat(pid), time.monotonic()
            wall = t1 - t0
            sched[name] = {"on_cpu_share": round((s1[0] - s0[0]) / 1e9 / wall, 3),
                           "runqueue_share": round((s1[1] - s0[1]) / 1e9 / wall, 3)}
            return res

        try:
            client.run(f"http://127.0.0.1:{run.port}/", 2, 0.5)
            pids = run.worker_pids()
            if not pids:
                raise RuntimeError("no worker to profile")
            pid = min(pids)
            load_s = 2 * secs + 3
            load = threading.Thread(target=lambda: box.setdefault(
                "load", wrk(run.port, LOAD_CONC, load_s) if not self.a.no_wrk else
                client.run(f"http://127.0.0.1:{run.port}/", LOAD_CONC, load_s).to_dict()))
            load.start()
            time.sleep(0.7)
            ok, said = window("py_spy", lambda: profile.record(pid, secs, out,
                                                               rate_hz=PROFILE_RATE_HZ))
            perf_ok, perf_said = window("perf", lambda: profile.perf_record(pid, secs,
                                                                            perf_data))
            load.join(load_s + 40)
        finally:
            run.stop()
        if not ok:
            raise RuntimeError(f"py-spy failed: {said}")
        summary = profile.summarise(profile.parse_raw(out.read_text()),
                                    rate_hz=PROFILE_RATE_HZ, seconds=secs)
        on_cpu: dict[str, Any] = {"ok": perf_ok, "said": perf_said}
        if perf_ok:
            rep = profile.perf_report(perf_data)
            perf_txt.write_text(rep.pop("text"))
            on_cpu.update(rep, report=str(perf_txt.relative_to(ROOT)), **sched.get("perf", {}))
        load_res = box.get("load") or {}
        m = re.search(r"Samples: (\d+) Errors: (\d+)", said)
        row = {"peer": peer, "workers": self.a.workers, "pid": pid, "seconds": secs,
               "rate_hz": PROFILE_RATE_HZ, "concurrency": LOAD_CONC,
               "rps": load_res.get("rps"), "raw": str(out.relative_to(ROOT)),
               "py_spy": said, "py_spy_errors": int(m.group(2)) if m else None,
               **sched.get("py_spy", {}), **summary, "perf": on_cpu}
        top = ", ".join(f"{r['func']} {r['share']:.0%}" for r in summary["own_python"][:3])
        dso = ", ".join(f"{d['dso']} {d['share']:.0%}" for d in on_cpu.get("dso", [])[:4])
        self.say(f"{peer} profile: {summary['samples']} busy samples (busy "
                 f"{summary['busy_share']}, idle {summary['idle_share']}, on CPU "
                 f"{row.get('on_cpu_share')}, run queue {row.get('runqueue_share')}), "
                 f"{_f0(row['rps'])} req/s; own: {top}; perf on-CPU: "
                 f"{dso if perf_ok else perf_said}")
        return row


def _f0(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def failure_kinds(res: client.Result, before: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, kind in res.failure_log:
        if t < before:
            out[kind] = out.get(kind, 0) + 1
    return out


def _version_of(argv: list[str], pattern: str = r"(\S+)") -> str | None:
    try:
        p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(pattern, (p.stdout + p.stderr).strip())
    return m.group(1) if m else None


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for mod in ("appliance", "uvicorn", "uvloop", "httptools", "gunicorn", "uvicorn_worker",
                "granian", "py_spy"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod.replace("_", "-"))
        except Exception:
            pass
    for name, argv, pat in (("node", ["node", "--version"], r"(\S+)"),
                            ("nginx", [peers._nginx() or "nginx", "-v"], r"nginx/(\S+)"),
                            ("wrk", ["wrk", "--version"], r"^(wrk [^\[]*?)\s*(?:\[|$)")):
        v = _version_of(argv, pat)
        if v:
            out[name] = v
    try:
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             check=False, capture_output=True, text=True, timeout=10)
        if git.returncode == 0 and git.stdout.strip():
            out["appliance_git"] = git.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")
    except OSError:
        pass
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "loadavg_at_start": load}


#: Defaults of a full run, and of --quick (an explicit option wins over either).
_DEFAULTS = {"reps": 3, "secs": 3.0, "concs": "1,4,8,16,64", "close_concs": "4,16,64",
             "reloads": 10, "kills": 3, "profile_secs": 5.0}
_QUICK = {"reps": 1, "secs": 1.0, "concs": "1,4", "close_concs": "16", "reloads": 2,
          "kills": 1, "profile_secs": 2.0}


def _epilog() -> str:
    import textwrap

    w = max(len(s) for s in (*SCENARIOS, *peers.PEERS)) + 4

    def item(name: str, text: str) -> list[str]:
        return textwrap.wrap(text, 96, break_on_hyphens=False,
                             initial_indent=f"  {name:<{w - 2}}",
                             subsequent_indent=" " * w)

    lines = ["scenarios (default: all, in this order):"]
    for s in SCENARIOS:
        lines += item(s, SCENARIO_HELP[s])
    lines += ["", "peers (default: all; each runs in the scenarios it belongs to):"]
    for p in peers.PEERS:
        lines += item(p, peers.DESCRIPTIONS[p])
    lines += ["", "which peer takes part in which scenario:"]
    for s in SCENARIOS:
        lines += item(s, "all" if SCENARIO_PEERS[s] == _ALL else ", ".join(SCENARIO_PEERS[s]))
    lines += ["", "throughput suites (each interleaved on its own, 1 and N workers):"]
    for su in SUITES:
        lines += item(su.name, f"{su.app} app: {', '.join(su.peers)}"
                      + (f" (c <= {su.max_conc})" if su.max_conc else ""))
    lines += ["", ("output: --quick writes bench/results/quick.json only; a run of every "
                   "scenario and peer"),
              ("writes bench/results/latest.json and docs/benchmarks.md; a subset writes "
               "bench/results/partial.json.")]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/bench", description=(__doc__ or "").splitlines()[0],
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny run: 1 rep x 1 s, c=1,4, close c=16, 2 reloads, 1 kill, 2 s "
                    "profile; writes bench/results/quick.json only")
    ap.add_argument("--peers", default=",".join(peers.PEERS), help="comma-separated")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    ap.add_argument("--reps", type=int, help=f"repetitions (default {_DEFAULTS['reps']})")
    ap.add_argument("--secs", type=float,
                    help=f"seconds per cell (default {_DEFAULTS['secs']}; wrk rounds to >= 1)")
    ap.add_argument("--concs", help=f"keep-alive concurrencies (default {_DEFAULTS['concs']}; "
                    f"the cpu app stops at {CPU_MAX_CONC})")
    ap.add_argument("--close-concs", help="concurrencies of the newconn scenario (default "
                    f"{_DEFAULTS['close_concs']})")
    ap.add_argument("--workers", type=int, default=2, help="N (default 2)")
    ap.add_argument("--reloads", type=int, help=f"default {_DEFAULTS['reloads']}")
    ap.add_argument("--kills", type=int,
                    help=f"kill -9 runs per peer, and kills per workerboot start (default "
                    f"{_DEFAULTS['kills']})")
    ap.add_argument("--profile-secs", type=float,
                    help=f"py-spy recording length (default {_DEFAULTS['profile_secs']})")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--no-wrk", action="store_true", help="use only our client")
    ap.add_argument("--no-compile", action="store_true",
                    help="don't byte-compile appliance/, bench/ and site-packages first")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: see below)")
    ap.add_argument("--no-report", action="store_true", help="don't regenerate the docs")
    a = ap.parse_args(argv)
    for key, value in (_QUICK if a.quick else _DEFAULTS).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    try:
        a.concs = [int(c) for c in a.concs.split(",") if c]
        a.close_concs = [int(c) for c in a.close_concs.split(",") if c]
    except ValueError:
        ap.error("--concs and --close-concs are comma-separated integers")
    if not (1 <= a.reps <= 20 and 0 < a.secs <= 60 and a.concs and a.close_concs
            and all(1 <= c <= 256 for c in (*a.concs, *a.close_concs))
            and 1 <= a.reloads <= 50 and 1 <= a.kills <= 20 and 1 <= a.workers <= 16
            and 1 <= a.profile_secs <= 60):
        ap.error("reps 1..20, secs 0..60, concurrency 1..256, reloads 1..50, kills 1..20, "
                 "workers 1..16, profile-secs 1..60")
    for s in a.scenarios.split(","):
        if s and s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    for p in a.peers.split(","):
        if p and p not in peers.PEERS:
            ap.error(f"unknown peer {p!r}; known: {', '.join(peers.PEERS)}")
    a.full = (not a.quick and set(a.scenarios.split(",")) >= set(SCENARIOS)
              and set(a.peers.split(",")) >= set(peers.PEERS))
    # The profile's raw stacks are kept beside latest.json only by a full run.
    a.keep_artifacts = a.full and a.out is None
    return a


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    b = Bench(a)
    t_start = time.monotonic()
    wanted = [s for s in SCENARIOS if s in a.scenarios.split(",")]
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv[1:] if argv is None
        else argv, "quick": a.quick, "full": a.full, "reps": a.reps, "secs": a.secs,
        "workers": a.workers, "concs": a.concs, "close_concs": a.close_concs,
        "method": "interleaved", "scenarios": wanted,
        "suites": [{"name": s.name, "app": s.app, "peers": list(s.peers),
                    "max_conc": s.max_conc} for s in SUITES],
        "scenario_peers": {s: list(p) for s, p in SCENARIO_PEERS.items()},
        "peer_descriptions": peers.DESCRIPTIONS,
        "versions": versions(), "machine": machine(), "skipped": {},
        **{s: [] for s in SCENARIOS}}
    result["python_cpu_iterations"], result["python_cpu_work_ms"] = calibrate_cpu_work()
    peers.NODE_CPU_TARGET_MS = result["python_cpu_work_ms"]
    b.say(f"python cpu loop: {result['python_cpu_iterations']} iterations, "
          f"{result['python_cpu_work_ms']:.3f} ms (node's is calibrated to it)")
    if not a.no_compile:
        result["bytecode"] = precompile()
        b.say(f"byte-compiled appliance/, bench/, site-packages in "
              f"{result['bytecode']['seconds']} s")
    names = []
    for peer in [p for p in a.peers.split(",") if p]:
        why = peers.available(peer)
        if why:
            result["skipped"][peer] = why
            b.say(f"skipping {peer}: {why}")
            continue
        names.append(peer)
    if "gunicorn-gthread" in names:
        result["wsgi_threads"] = peers.wsgi_threads()
    mon = Monitor()
    mon.start()
    try:
        for s in wanted:
            these = [p for p in names if p in SCENARIO_PEERS[s]]
            if not these:
                continue
            mon.begin(s)
            b.say(f"== {s}: {', '.join(these)}")
            if s in ("throughput", "newconn", "placement", "mastercpu", "startup"):
                try:
                    result[s] = getattr(b, s)(these)
                except Exception as e:
                    b.say(f"{s} FAILED: {e!r}")
                    result["skipped"][s] = repr(e)
            else:
                for peer in these:
                    try:
                        result[s].append(getattr(b, s)(peer))
                    except Exception as e:  # one broken peer must not lose the others'
                        b.say(f"{peer} {s} FAILED: {e!r}")
                        result["skipped"][f"{peer}/{s}"] = repr(e)
            mon.end(s)
    finally:
        result["monitor"] = mon.stop()
        result["skipped"].update(b.skipped)
        result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    with open("/proc/loadavg") as f:
        result["machine"]["loadavg_at_end"] = f.read().split()[:3]
    # appliance is an editable install: note if the tree moved while the bench ran.
    result["versions"]["appliance_git_at_end"] = versions().get("appliance_git", "")
    b.say(f"done in {result['elapsed_s']} s; machine: {result['monitor']['cpu'].get('all')}")
    return result


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    result = run(argv)
    default = "quick.json" if a.quick else "latest.json" if a.full else "partial.json"
    out = a.out or RESULTS / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if a.full and not a.no_report:
        from bench import report
        report.write(result)
    elif not a.no_report and not a.quick:
        print("not a run of every scenario and peer: docs/benchmarks.md left as it is "
              f"(render this one with: python -m bench.report {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
