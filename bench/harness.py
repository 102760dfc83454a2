"""The bench harness: run every scenario against every peer, write JSON under bench/results/.

Stdlib only (the report's plots use matplotlib when it is importable). Run it with the bench
venv through scripts/bench, or directly:

  python -m bench.harness [--quick] [--peers appliance,uvicorn] [--scenarios throughput,...]
                          [--reps 3] [--secs 3] [--workers 2] [--out FILE] [--no-report]

Scenarios (see docs/benchmarks.md for what each measures):
  throughput  hello with wrk (or our client when wrk is missing) and cpu with our client,
              concurrency 1,2,4,8,16, 1 and N workers: req/s, p99, busiest worker's share
  reload      10 x kill -HUP during keep-alive load: failed requests
  kill        kill -9 of one worker during new-connection load: failures, time to a new pid
  startup     spawn to first 200 response
  memory      PSS of master and workers after warm-up (smaps_rollup)
  mastercpu   master utime+stime during full hello load, % of one core
All load goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import client, peers

ROOT = peers.ROOT
RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("throughput", "reload", "kill", "startup", "memory", "mastercpu")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- measurements ----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wrk(port: int, conc: int, secs: float) -> dict[str, Any] | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    threads = max(1, min(2, conc))
    out = subprocess.run(
        [exe, f"-t{threads}", f"-c{conc}", f"-d{max(1, round(secs))}s", "--latency",
         "--timeout", "5s", f"http://127.0.0.1:{port}/"],
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


def med(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


# -- scenarios -------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.port = args.port
        self.log = RESULTS / "raw" / "peers.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)

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

    def throughput(self, peer: str) -> list[dict[str, Any]]:
        rows = []
        for workers in sorted({1, self.a.workers}):
            for app in ("hello", "cpu"):
                run, _ = self.start(peer, workers, app)
                try:
                    for conc in self.a.concs:
                        reps = []
                        for _ in range(self.a.reps):
                            r: dict[str, Any] | None = None
                            if app == "hello" and not self.a.no_wrk:
                                r = wrk(run.port, conc, self.a.secs)
                            if r is None:
                                d = client.run(f"http://127.0.0.1:{run.port}/", conc,
                                               self.a.secs).to_dict()
                                r = {"tool": "client", "rps": d["rps"], "p99_ms": d["p99_ms"],
                                     "failed": d["failed"], "failures": d["failures"],
                                     "busiest_share": d["busiest_share"],
                                     "busiest_conn_share": d["busiest_conn_share"],
                                     "pids": d["pids"]}
                            reps.append(r)
                        row = {"peer": peer, "workers": workers, "app": app, "concurrency": conc,
                               "tool": reps[0]["tool"],
                               "rps": med([r["rps"] for r in reps]),
                               "p99_ms": med([r["p99_ms"] for r in reps]),
                               "busiest_share": med([r.get("busiest_share") for r in reps]),
                               "busiest_conn_share": med([r.get("busiest_conn_share")
                                                          for r in reps]),
                               "failed": sum(r["failed"] for r in reps), "reps": reps}
                        rows.append(row)
                        share = row["busiest_share"]
                        self.say(f"{peer} w={workers} {app} c={conc}: {row['rps']:.0f} req/s "
                                 f"p99={row['p99_ms']} ms failed={row['failed']}"
                                 + (f" busiest={share:.0%}" if share is not None else ""))
                finally:
                    run.stop()
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

    def reload(self, peer: str) -> dict[str, Any]:
        n = self.a.reloads
        run, _ = self.start(peer, self.a.workers, "hello")
        box: dict[str, client.Result] = {}
        budget = n * 12.0 + 5
        halt = threading.Event()
        t = threading.Thread(target=lambda: box.setdefault(
            "r", client.run(f"http://127.0.0.1:{run.port}/", 8, budget, stop=halt)))
        durations = []
        try:
            t.start()
            time.sleep(1.0)
            for _ in range(n):
                old = set(run.worker_pids())
                os.kill(run.master_pid, signal.SIGHUP)
                durations.append(self._wait_reloaded(run, old, 10.0))
                time.sleep(0.3)
            time.sleep(0.5)
        finally:
            halt.set()
            t.join(budget + 10)  # in-flight requests finish (bounded by the client timeout)
            stop_at = time.monotonic()
            run.stop()
        r = box["r"].to_dict()
        fails = [ft for ft in box["r"].failure_times if ft < stop_at]
        kinds = failure_kinds(box["r"], stop_at)
        ok_durs = [d for d in durations if d == d]
        row = {"peer": peer, "workers": self.a.workers, "reloads": n, "failed": len(fails),
               "failures": kinds, "ok": r["ok"],
               "reload_s_median": med(ok_durs), "reloads_completed": len(ok_durs),
               "how": run.reload_note}
        self.say(f"{peer} reload x{n}: failed={row['failed']} {kinds} "
                 f"reload median={row['reload_s_median']} s completed={len(ok_durs)}/{n}")
        return row

    def kill(self, peer: str) -> dict[str, Any]:
        rows = []
        for _ in range(self.a.kills):
            run, _ = self.start(peer, self.a.workers, "hello")
            box: dict[str, client.Result] = {}
            t = threading.Thread(target=lambda: box.setdefault(
                "r", client.run(f"http://127.0.0.1:{run.port}/", 4, 3.0, mode="close")))
            try:
                t.start()
                time.sleep(1.0)
                before = set(run.worker_pids())
                victim = sorted(before)[-1]
                t_kill = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                t.join(10)
            finally:
                run.stop()
            res = box["r"]
            new = [ts for pid, ts in res.first_seen.items() if pid not in before and ts > t_kill]
            rows.append({"failed": res.failed, "failures": dict(res.failures),
                         "replacement_ms": (min(new) - t_kill) * 1000 if new else None})
        out = {"peer": peer, "workers": self.a.workers, "kills": len(rows),
               "failed_median": med([r["failed"] for r in rows]),
               "failed_total": sum(r["failed"] for r in rows),
               "replacement_ms_median": med([r["replacement_ms"] for r in rows]),
               "replacement_ms_max": max((r["replacement_ms"] for r in rows
                                          if r["replacement_ms"] is not None), default=None),
               "runs": rows}
        self.say(f"{peer} kill -9: failed={[r['failed'] for r in rows]} replacement ms="
                 f"{[None if r['replacement_ms'] is None else round(r['replacement_ms'], 1) for r in rows]}")
        return out

    def startup(self, peer: str) -> dict[str, Any]:
        times = []
        for _ in range(self.a.reps):
            run, first = self.start(peer, self.a.workers, "hello")
            run.stop()
            times.append(first)
        row = {"peer": peer, "workers": self.a.workers, "first_response_s_median": med(times),
               "runs_s": times}
        self.say(f"{peer} start to first response: {[round(x, 3) for x in times]} s")
        return row

    def memory(self, peer: str) -> dict[str, Any]:
        run, _ = self.start(peer, self.a.workers, "hello")
        try:
            client.run(f"http://127.0.0.1:{run.port}/", 4, 1.0)
            master = pss_kib(run.master_pid)
            workers = {pid: pss_kib(pid) for pid in run.worker_pids()}
        finally:
            run.stop()
        total = (master or 0) + sum(v or 0 for v in workers.values())
        row = {"peer": peer, "workers": self.a.workers, "master_pss_mib": (master or 0) / 1024,
               "worker_pss_mib": [(v or 0) / 1024 for v in workers.values()],
               "total_pss_mib": total / 1024}
        self.say(f"{peer} PSS: master {row['master_pss_mib']:.1f} MiB, workers "
                 f"{[round(x, 1) for x in row['worker_pss_mib']]}, total "
                 f"{row['total_pss_mib']:.1f} MiB")
        return row

    def mastercpu(self, peer: str) -> dict[str, Any]:
        run, _ = self.start(peer, self.a.workers, "hello")
        try:
            c0, t0 = cpu_seconds(run.master_pid), time.monotonic()
            r = None if self.a.no_wrk else wrk(run.port, 16, self.a.secs)
            if r is None:
                d = client.run(f"http://127.0.0.1:{run.port}/", 16, self.a.secs).to_dict()
                r = {"rps": d["rps"]}
            c1, t1 = cpu_seconds(run.master_pid), time.monotonic()
        finally:
            run.stop()
        row = {"peer": peer, "workers": self.a.workers,
               "master_cpu_pct": (c1 - c0) / (t1 - t0) * 100, "rps": r["rps"]}
        self.say(f"{peer} master CPU under load: {row['master_cpu_pct']:.1f}% of a core "
                 f"({r['rps']:.0f} req/s)")
        return row


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
    ap.add_argument("--concs", default="1,2,4,8,16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--no-wrk", action="store_true", help="use only our client")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-report", action="store_true", help="don't regenerate the docs")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.secs, a.concs, a.reloads, a.kills = 1, 1.0, "1,4", 2, 1
    a.concs = [int(c) for c in a.concs.split(",")]
    if not (1 <= a.reps <= 20 and 0 < a.secs <= 60 and all(1 <= c <= 256 for c in a.concs)
            and 1 <= a.reloads <= 50 and 1 <= a.kills <= 20):
        ap.error("reps 1..20, secs 0..60, concurrency 1..256, reloads 1..50, kills 1..20")
    return a


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    b = Bench(a)
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv[1:] if argv is None
        else argv, "quick": a.quick, "reps": a.reps, "secs": a.secs, "workers": a.workers,
        "versions": versions(), "machine": machine(), "skipped": {},
        **{s: [] for s in SCENARIOS}}
    wanted = [s for s in a.scenarios.split(",") if s]
    for s in wanted:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    for peer in [p for p in a.peers.split(",") if p]:
        why = peers.available(peer)
        if why:
            result["skipped"][peer] = why
            b.say(f"skipping {peer}: {why}")
            continue
        for s in wanted:
            try:
                out = getattr(b, s)(peer)
            except Exception as e:  # one broken peer must not lose the others' results
                b.say(f"{peer} {s} FAILED: {e!r}")
                result["skipped"][f"{peer}/{s}"] = repr(e)
                continue
            result[s] += out if isinstance(out, list) else [out]
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
