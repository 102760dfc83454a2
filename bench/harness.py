"""The bench harness: run every scenario against every peer, write JSON under bench/results/.

Stdlib only (the report's plots use matplotlib when it is importable). Run it with the bench
venv through scripts/bench, or directly:

  python -m bench.harness [--quick] [--peers appliance,uvicorn] [--scenarios throughput,...]
                          [--reps 3] [--secs 3] [--workers 2] [--out FILE] [--no-report]

Method: peers are *interleaved*. For the timing scenarios (throughput, mastercpu, startup)
every peer (and, for throughput, every worker count) is started side by side, idle, and each
repetition measures every one of them round-robin, the order rotated from one repetition to
the next, so the background load of a shared machine spreads over all peers alike. Ratios
(appliance / best Python peer, N workers / 1 worker) are computed within one repetition and
the report shows their medians. Before anything runs, the repo's appliance/ and bench/ and
the venv's site-packages are byte-compiled (PYTHONDONTWRITEBYTECODE=1 would otherwise make
every start of the editable appliance compile from source, and no peer's).

Scenarios (see docs/benchmarks.md for what each measures):
  throughput  hello with wrk (or our client when wrk is missing) and cpu with our client,
              1 and N workers: req/s, p99, busiest worker's share of requests and connections
  mastercpu   master CPU (schedstat, all threads) under wrk c=16 load, keep-alive and
              Connection: close, % of one core
  startup     spawn to first 200 response, and to READY=1 (appliance, via NOTIFY_SOCKET)
  reload      10 x kill -HUP under mixed load (keep-alive and new-connection clients)
  kill        kill -9 of one worker under mixed load: failures, time to a new pid answering
  memory      PSS per process (master, workers, helpers) after warm-up, by mapping kind
All load goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import compileall
import json
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
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from bench import client, peers

ROOT = peers.ROOT
RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("throughput", "mastercpu", "startup", "reload", "kill", "memory")
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Scenarios a variant peer (peers.VARIANTS) takes part in.
VARIANT_SCENARIOS = ("throughput", "mastercpu")


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
                    elif re.search(r"/(python3[\d.]*|libpython[^/]*|node)$", path):
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


def wrk(port: int, conc: int, secs: float, close: bool = False) -> dict[str, Any] | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    threads = max(1, min(2, conc))
    argv = [exe, f"-t{threads}", f"-c{conc}", f"-d{max(1, round(secs))}s", "--latency",
            "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=secs + 30).stdout
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


def med(xs: Sequence[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def python_cpu_work_ms() -> float:
    """Median time of one call of the cpu app's loop in this interpreter, in ms."""
    from bench.apps.work import cpu_work

    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(20):
            cpu_work()
        times.append((time.perf_counter() - t0) / 20 * 1000)
    return round(statistics.median(times), 3)


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

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.port = args.port
        self.log = RESULTS / "raw" / "peers.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.skipped: dict[str, str] = {}

    def say(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start(self, peer: str, workers: int, app: str) -> tuple[peers.Running, float]:
        # A fresh port per start (no TIME_WAIT or straggler confusion); on a shared machine a
        # port may be taken by someone else, so try a few.
        for attempt in range(3):
            self.port += 1 + 7 * attempt
            try:
                return peers.start(peer, self.port, workers, app, log=self.log)
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

    def one_cell(self, port: int, app: str, conc: int) -> dict[str, Any]:
        r: dict[str, Any] | None = None
        if app == "hello" and not self.a.no_wrk:
            r = wrk(port, conc, self.a.secs)
        if r is None:
            d = client.run(f"http://127.0.0.1:{port}/", conc, self.a.secs).to_dict()
            r = {"tool": "client", "rps": d["rps"], "p99_ms": d["p99_ms"],
                 "failed": d["failed"], "failures": d["failures"],
                 "busiest_share": d["busiest_share"],
                 "busiest_conn_share": d["busiest_conn_share"], "pids": d["pids"],
                 "conn_pids": d["conn_pids"]}
        return r

    def throughput(self, names: list[str]) -> list[dict[str, Any]]:
        rows = []
        for app in ("hello", "cpu"):
            insts = [(p, w) for p in names for w in sorted({1, self.a.workers})
                     if not (app == "hello" and p in peers.VARIANTS)]
            running = self.start_all(insts, app, "throughput")
            cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
            try:
                for rep in range(self.a.reps):
                    order = rotated([i for i in insts if i in running], rep, self.a.reps)
                    self.say(f"{app} rep {rep + 1}/{self.a.reps}: order "
                             + ", ".join(f"{p}/{w}w" for p, w in order))
                    for conc in self.a.concs:
                        for peer, w in order:
                            r = self.one_cell(running[(peer, w)].port, app, conc)
                            r["rep"] = rep
                            r["t"] = round(time.monotonic(), 2)
                            cells.setdefault((peer, w, conc), []).append(r)
                        self.say(f"  c={conc}: " + ", ".join(
                            f"{p}/{w}w {cells[(p, w, conc)][-1]['rps']:.0f}" for p, w in order))
            finally:
                for run in running.values():
                    run.stop()
            for (peer, w, conc), reps in sorted(cells.items(), key=lambda kv: (
                    names.index(kv[0][0]), kv[0][1], kv[0][2])):
                rows.append({"peer": peer, "workers": w, "app": app, "concurrency": conc,
                             "tool": reps[0]["tool"],
                             "rps": med([r["rps"] for r in reps]),
                             "p99_ms": med([r["p99_ms"] for r in reps]),
                             "busiest_share": med([r.get("busiest_share") for r in reps]),
                             "busiest_conn_share": med([r.get("busiest_conn_share")
                                                        for r in reps]),
                             "failed": sum(r["failed"] for r in reps), "reps": reps})
        return rows

    def mastercpu(self, names: list[str]) -> list[dict[str, Any]]:
        """Master CPU while wrk c=16 loads the workers, keep-alive and Connection: close."""
        insts = [(p, self.a.workers) for p in names]
        running = self.start_all(insts, "hello", "mastercpu")
        out: dict[tuple[str, str], list[dict[str, float]]] = {}
        try:
            for rep in range(self.a.reps):
                for peer, w in rotated([i for i in insts if i in running], rep, self.a.reps):
                    run = running[(peer, w)]
                    for mode in ("keepalive", "close"):
                        c0, t0 = cpu_seconds(run.master_pid), time.monotonic()
                        wc0 = sum(cpu_seconds(p) for p in run.worker_pids())
                        r = None if self.a.no_wrk else wrk(run.port, 16, self.a.secs,
                                                           close=(mode == "close"))
                        if r is None:
                            d = client.run(f"http://127.0.0.1:{run.port}/", 16, self.a.secs,
                                           mode=mode).to_dict()
                            r = {"rps": d["rps"], "failed": d["failed"]}
                        c1, t1 = cpu_seconds(run.master_pid), time.monotonic()
                        wc1 = sum(cpu_seconds(p) for p in run.worker_pids())
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

    def _wait_reloaded(self, run: peers.Running, old: set[int], timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            # Done when N new children exist and N old ones are gone (a peer may keep a helper
            # child, e.g. multiprocessing's resource tracker, across the reload).
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
                durations.append(self._wait_reloaded(run, old, 10.0))
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
        ok_durs = [d for d in durations if d == d]
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
        rows: list[dict[str, Any]] = []
        for _ in range(self.a.kills):
            run, _ = self.start(peer, self.a.workers, "hello")
            halt = threading.Event()
            threads: list[threading.Thread] = []
            try:
                threads, box = self._mixed(run.port, 3.0, halt)
                time.sleep(1.0)
                before = set(run.worker_pids())
                victim = sorted(before)[-1]
                t_kill = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                for t in threads:
                    t.join(10)
            finally:
                halt.set()
                for t in threads:
                    t.join(10)
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
        run, _ = self.start(peer, self.a.workers, "hello")
        try:
            client.run(f"http://127.0.0.1:{run.port}/", 4, 1.0)
            procs = [("master", run.master_pid)] + [("child", p) for p in run.worker_pids()]
            detail: list[dict[str, Any]] = []
            for role, pid in procs:
                detail.append({"role": role, "pid": pid, "pss_kib": pss_kib(pid) or 0,
                               "by_kind_kib": pss_by_kind(pid),
                               "cmd": _cmdline(pid)})
        finally:
            run.stop()
        master = detail[0]["pss_kib"]
        kids = [d["pss_kib"] for d in detail[1:]]
        total = master + sum(kids)
        row = {"peer": peer, "workers": self.a.workers, "master_pss_mib": master / 1024,
               "worker_pss_mib": [k / 1024 for k in kids], "total_pss_mib": total / 1024,
               "processes": detail}
        self.say(f"{peer} PSS: master {row['master_pss_mib']:.1f} MiB, children "
                 f"{[round(x, 1) for x in row['worker_pss_mib']]}, total "
                 f"{row['total_pss_mib']:.1f} MiB")
        return row


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return ""


def failure_kinds(res: client.Result, before: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for t, kind in res.failure_log:
        if t < before:
            out[kind] = out.get(kind, 0) + 1
    return out


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for mod in ("appliance", "uvicorn", "uvloop", "httptools", "gunicorn", "uvicorn_worker",
                "a2wsgi"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod.replace("_", "-"))
        except Exception:
            pass
    try:
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                     timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        out["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True,
                                    timeout=10).stdout.split("[")[0].strip() or "wrk"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        out["appliance_git"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short",
                                               "HEAD"], capture_output=True, text=True,
                                              timeout=10).stdout.strip()
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run: 1 rep x 1 s, c=1,4")
    ap.add_argument("--peers", default=",".join(peers.PEERS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--concs", default="1,4,8,16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--no-wrk", action="store_true", help="use only our client")
    ap.add_argument("--no-compile", action="store_true",
                    help="don't byte-compile appliance/, bench/ and site-packages first")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-report", action="store_true", help="don't regenerate the docs")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.secs, a.concs, a.reloads, a.kills = 1, 1.0, "1,4", 2, 1
    a.concs = [int(c) for c in a.concs.split(",")]
    if not (1 <= a.reps <= 20 and 0 < a.secs <= 60 and all(1 <= c <= 256 for c in a.concs)
            and 1 <= a.reloads <= 50 and 1 <= a.kills <= 20 and 1 <= a.workers <= 16):
        ap.error("reps 1..20, secs 0..60, concurrency 1..256, reloads 1..50, kills 1..20, "
                 "workers 1..16")
    return a


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    b = Bench(a)
    t_start = time.monotonic()
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv[1:] if argv is None
        else argv, "quick": a.quick, "reps": a.reps, "secs": a.secs, "workers": a.workers,
        "concs": a.concs, "method": "interleaved",
        "versions": versions(), "machine": machine(), "skipped": {},
        **{s: [] for s in SCENARIOS}}
    result["python_cpu_work_ms"] = python_cpu_work_ms()
    peers.NODE_CPU_TARGET_MS = result["python_cpu_work_ms"]
    b.say(f"python cpu loop: {result['python_cpu_work_ms']:.3f} ms (node's is calibrated to it)")
    if not a.no_compile:
        result["bytecode"] = precompile()
        b.say(f"byte-compiled appliance/, bench/, site-packages in "
              f"{result['bytecode']['seconds']} s")
    wanted = [s for s in a.scenarios.split(",") if s]
    for s in wanted:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    names = []
    for peer in [p for p in a.peers.split(",") if p]:
        if peer not in peers.PEERS:
            raise SystemExit(f"unknown peer {peer!r}; known: {', '.join(peers.PEERS)}")
        why = peers.available(peer)
        if why:
            result["skipped"][peer] = why
            b.say(f"skipping {peer}: {why}")
            continue
        names.append(peer)
    mon = Monitor()
    mon.start()
    try:
        for s in wanted:
            mon.begin(s)
            b.say(f"== {s}")
            if s in ("throughput", "mastercpu", "startup"):  # interleaved over peers
                these = [p for p in names if p not in peers.VARIANTS or s in VARIANT_SCENARIOS]
                try:
                    result[s] = getattr(b, s)(these)
                except Exception as e:
                    b.say(f"{s} FAILED: {e!r}")
                    result["skipped"][s] = repr(e)
            else:
                for peer in names:
                    if peer in peers.VARIANTS and s not in VARIANT_SCENARIOS:
                        continue
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
    out = a.out or RESULTS / ("quick.json" if a.quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not a.no_report and not a.quick:
        from bench import report
        report.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
