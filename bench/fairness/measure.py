"""Measure the fairness prototypes: req/s, p99 and the busiest worker's share per mechanism.

Run from the repo root with the bench venv (uvicorn, uvloop, httptools):
  .venv-bench/bin/python -m bench.fairness.measure [--mechs baseline,shm] [--reps 3] [--secs 2]
Writes bench/results/fairness-<stamp>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import client
from bench.fairness.prefork import MECHS

ROOT = Path(__file__).resolve().parents[2]


def start(mech: str, workers: int, app: str, port: int,
          extra: list[str] | None = None) -> subprocess.Popen[str]:
    base = mech.split("@")[0]
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.fairness.prefork", "--mech", base, "--workers",
         str(workers), "--app", app, "--port", str(port)] + (extra or []),
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("READY"):
        p.kill()
        raise RuntimeError(f"{mech}: prototype did not start: {line!r}")
    return p


def stop(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def variant_args(mech: str) -> list[str]:
    """``shm@5`` means the shm mechanism with --max-defer-ms 5; ``shm@5@16`` also --batch 16;
    ``shm@5@16@0.5`` also --recheck-ms 0.5."""
    parts = mech.split("@")[1:]
    flags = ["--max-defer-ms", "--batch", "--recheck-ms"]
    return [x for f, v in zip(flags, parts) for x in (f, v)]


def measure(configs: list[tuple[str, int]], app: str, mode: str, concs: list[int],
            reps: int, secs: float, port0: int) -> list[dict]:
    """Start every (mech, workers) server at once, then interleave runs round-robin so the
    machine's noise spreads over all of them alike."""
    procs = {}
    runs: dict[tuple[str, int, int], list[dict]] = {}
    try:
        for i, (mech, w) in enumerate(configs):
            procs[(mech, w)] = (start(mech, w, app, port0 + i, variant_args(mech)), port0 + i)
        for rep in range(reps):
            for c in concs:
                for mech, w in configs:
                    port = procs[(mech, w)][1]
                    r = client.run(f"http://127.0.0.1:{port}/", c, secs, mode).to_dict()
                    runs.setdefault((mech, w, c), []).append(r)
            print(f"rep {rep + 1}/{reps} done", flush=True)
    finally:
        for p, _ in procs.values():
            stop(p)
    rows = []
    for (mech, w, c), rs in runs.items():
        med = statistics.median
        rows.append({
            "mech": mech, "workers": w, "app": app, "mode": mode, "concurrency": c,
            "rps": med(r["rps"] for r in rs),
            "p99_ms": med(r["p99_ms"] or 0 for r in rs),
            "busiest_share": med(r["busiest_share"] or 0 for r in rs),
            "busiest_share_max": max(r["busiest_share"] or 0 for r in rs),
            "busiest_conn_share": med(r["busiest_conn_share"] or 0 for r in rs),
            "failed": sum(r["failed"] for r in rs),
            "runs": [{k: r[k] for k in ("rps", "p99_ms", "busiest_share", "failed", "pids",
                                        "conn_pids")} for r in rs],
        })
    base1 = {r["concurrency"]: r["rps"] for r in rows
             if r["workers"] == 1 and r["mech"] == "baseline"}
    for r in rows:
        r["x_vs_1worker"] = round(r["rps"] / base1[r["concurrency"]], 2) \
            if base1.get(r["concurrency"]) else None
    return rows


def table(rows: list[dict]) -> str:
    out = ["| mechanism | workers | app | mode | conc | req/s | x vs 1 worker | p99 ms "
           "| busiest (req) | worst run | busiest (conns) | failed |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["app"], r["mode"], r["workers"], r["mech"],
                                         r["concurrency"])):
        out.append(f"| {r['mech']} | {r['workers']} | {r['app']} | {r['mode']} | "
                   f"{r['concurrency']} | {r['rps']:.0f} | {r['x_vs_1worker']} | "
                   f"{r['p99_ms']:.1f} | {r['busiest_share']:.0%} | "
                   f"{r['busiest_share_max']:.0%} | {r['busiest_conn_share']:.0%} | "
                   f"{r['failed']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mechs", default=",".join(MECHS))
    ap.add_argument("--apps", default="cpu")
    ap.add_argument("--modes", default="keepalive")
    ap.add_argument("--concs", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--one-worker", default="baseline",
                    help="mechanisms also measured with 1 worker (for the scaling ratio)")
    a = ap.parse_args(argv)
    concs = [int(c) for c in a.concs.split(",")]
    rows: list[dict] = []
    configs = [(m, 1) for m in a.one_worker.split(",") if m] + \
        [(m, 2) for m in a.mechs.split(",") if m]
    for app in a.apps.split(","):
        for mode in a.modes.split(","):
            rows += measure(configs, app, mode, concs, a.reps, a.secs, a.port)
    print(table(rows))
    out = ROOT / "bench" / "results" / f"fairness-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv, "nproc": os.cpu_count(), "when": time.strftime("%F %T")}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
