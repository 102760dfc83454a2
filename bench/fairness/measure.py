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


def start(mech: str, workers: int, app: str, port: int) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.fairness.prefork", "--mech", mech, "--workers",
         str(workers), "--app", app, "--port", str(port)],
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


def measure(mech: str, workers: int, app: str, mode: str, concs: list[int], reps: int,
            secs: float, port: int) -> list[dict]:
    rows = []
    p = start(mech, workers, app, port)
    try:
        for c in concs:
            runs = [client.run(f"http://127.0.0.1:{port}/", c, secs, mode).to_dict()
                    for _ in range(reps)]
            rows.append({
                "mech": mech, "workers": workers, "app": app, "mode": mode, "concurrency": c,
                "rps": statistics.median(r["rps"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] or 0 for r in runs),
                "busiest_share": statistics.median(r["busiest_share"] or 0 for r in runs),
                "busiest_share_max": max(r["busiest_share"] or 0 for r in runs),
                "failed": sum(r["failed"] for r in runs),
                "runs": [{k: r[k] for k in ("rps", "p99_ms", "busiest_share", "failed", "pids")}
                         for r in runs],
            })
            print(f"{mech:14} w={workers} {app} {mode:9} c={c:2} rps={rows[-1]['rps']:8.0f} "
                  f"p99={rows[-1]['p99_ms']:7.2f}ms busiest={rows[-1]['busiest_share']:.0%} "
                  f"(max {rows[-1]['busiest_share_max']:.0%}) failed={rows[-1]['failed']}",
                  flush=True)
    finally:
        stop(p)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mechs", default=",".join(MECHS))
    ap.add_argument("--apps", default="cpu")
    ap.add_argument("--modes", default="keepalive")
    ap.add_argument("--concs", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--one-worker", default="baseline,shm",
                    help="mechanisms also measured with 1 worker (for the scaling ratio)")
    a = ap.parse_args(argv)
    concs = [int(c) for c in a.concs.split(",")]
    rows: list[dict] = []
    for app in a.apps.split(","):
        for mode in a.modes.split(","):
            for mech in a.one_worker.split(","):
                if mech:
                    rows += measure(mech, 1, app, mode, concs, a.reps, a.secs, a.port)
            for mech in a.mechs.split(","):
                rows += measure(mech, 2, app, mode, concs, a.reps, a.secs, a.port)
    out = ROOT / "bench" / "results" / f"fairness-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv, "nproc": os.cpu_count(), "when": time.strftime("%F %T")}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
