"""Regenerate docs/benchmarks.md (and its PNG plots) from a harness result JSON.

  python -m bench.report [bench/results/latest.json]

Every number and every sentence of the reading ("What the numbers mean") is derived from the
result, so a re-run keeps the document true; the hand-kept sections at its end (the fault and
soak suite, written from scripts/fault-soak) are carried over unchanged. Plots need matplotlib
(installed in the bench venv by scripts/bench); without it the report is written without them.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.peers import APPLIANCE, APPLIANCE_KERNEL, APPLIANCE_WSGI, ASGI_PEERS, WSGI_PEERS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
PLOTS = ROOT / "bench" / "results" / "plots"

# Who is compared with whom is declared once, in bench/peers.py: the "best Python peer" of the
# ASGI tables is the fastest of ASGI_PEERS in each repetition, appliance-wsgi's of WSGI_PEERS.
PY_PEERS = ASGI_PEERS
KERNEL = APPLIANCE_KERNEL
REF_NAMES = {"best": "best Python peer", "nginx": "nginx `return 200` (ceiling)",
             "node": "Node cluster", "kernel": 'accept = "kernel"', "wsgi": "best WSGI peer"}

# Targets (issue 14 and issue 10; DESIGN.md section 6).
BUSIEST_MAX = 0.55
SCALING_MIN = 1.8
STRETCH = 1.25
REPLACEMENT_MS_MAX = 50.0
READY_S_MAX = 0.3
PSS_MIB_MAX = 40.0


def _f(x: Any, fmt: str = "{:.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{x:.0%}"


def _pct1(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def suite_of(r: dict[str, Any]) -> str:
    """The throughput suite of a row (older results have none: inferred from the peer)."""
    if r.get("suite"):
        return str(r["suite"])
    if r["app"] == "hello" and r["peer"] in (APPLIANCE_WSGI, *WSGI_PEERS):
        return "hello-wsgi"
    return str(r["app"])


def _row(rows: list[dict[str, Any]], peer: str, app: str, w: int, c: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["peer"] == peer and r["app"] == app
                 and r["workers"] == w and r["concurrency"] == c), None)


def _per_rep(row: dict[str, Any] | None) -> dict[int, float]:
    """rep index -> req/s of one cell (a row without per-rep data counts as rep 0)."""
    if row is None:
        return {}
    if row.get("reps"):
        return {r.get("rep", i): r["rps"] for i, r in enumerate(row["reps"])}
    return {0: row["rps"]}


def ratio_to(rows: list[dict[str, Any]], app: str, w: int, c: int, refs: tuple[str, ...],
             peer: str = APPLIANCE) -> dict[str, Any] | None:
    """Median over repetitions of peer / the best of ``refs`` *in the same repetition*, its
    range, and which ref was best most often."""
    mine = _per_rep(_row(rows, peer, app, w, c))
    others = {p: _per_rep(_row(rows, p, app, w, c)) for p in refs}
    ratios, best_names = [], []
    for rep, v in mine.items():
        cands = [(o[rep], p) for p, o in others.items() if rep in o]
        if not cands or not max(cands)[0]:
            continue
        best, name = max(cands)
        ratios.append(v / best)
        best_names.append(name)
    if not ratios:
        return None
    return {"median": _median(ratios), "min": min(ratios), "max": max(ratios),
            "best": max(set(best_names), key=best_names.count), "n": len(ratios)}


def ratio_to_best_python(rows: list[dict[str, Any]], app: str, w: int, c: int,
                         peer: str = APPLIANCE) -> dict[str, Any] | None:
    """appliance / the best ASGI Python peer of the same repetition (median over reps)."""
    return ratio_to(rows, app, w, c, PY_PEERS, peer)


def scaling(rows: list[dict[str, Any]], peer: str, app: str, n: int, c: int
            ) -> dict[str, Any] | None:
    """Median over repetitions of (N workers req/s) / (1 worker req/s) of the same rep."""
    one, nn = _per_rep(_row(rows, peer, app, 1, c)), _per_rep(_row(rows, peer, app, n, c))
    ratios = [nn[k] / one[k] for k in nn if one.get(k)]
    if not ratios:
        return None
    return {"median": _median(ratios), "min": min(ratios), "max": max(ratios)}


def _ratio_cell(x: dict[str, Any] | None, name: bool = True, bold: bool = True) -> str:
    if x is None:
        return "–"
    head = f"**{x['median']:.2f}x**" if bold else f"{x['median']:.2f}x"
    rng = f"{x['min']:.2f}–{x['max']:.2f}" if x["n"] > 1 else ""
    tail = "; ".join(t for t in (rng, x["best"] if name else "") if t)
    return head + (f" ({tail})" if tail else "")


# -- plots -----------------------------------------------------------------------------------

def plots(res: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []
    rows = res.get("throughput", [])
    titles = {"hello": "hello app (ASGI)", "hello-wsgi": "hello app (WSGI)", "cpu": "cpu app"}
    for suite in ("hello", "hello-wsgi", "cpu"):
        these = [r for r in rows if suite_of(r) == suite]
        if not these:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, peer in enumerate(dict.fromkeys(r["peer"] for r in these)):
            for w in sorted({r["workers"] for r in these}):
                pts = sorted((r["concurrency"], r["rps"]) for r in these
                             if r["peer"] == peer and r["workers"] == w)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts],
                            marker="o" if w > 1 else "x", color=f"C{i % 10}",
                            linestyle="-" if w > 1 else ":", label=f"{peer} ({w}w)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections (keep-alive)")
        ax.set_xticks(sorted({r["concurrency"] for r in these}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylabel("requests/s (median)")
        ax.set_title(f"{titles[suite]}: throughput vs concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        name = f"throughput-{suite}.png"
        fig.tight_layout()
        fig.savefig(PLOTS / name, dpi=90)
        plt.close(fig)
        made.append(name)
    hello = [r for r in rows if suite_of(r) == "hello"]
    if any(r["peer"] == APPLIANCE for r in hello):
        concs = sorted({r["concurrency"] for r in hello})
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (key, refs) in enumerate((("best", PY_PEERS), ("nginx", ("nginx",)),
                                         ("node", ("node",)))):
            for w in sorted({r["workers"] for r in hello}):
                pts = [(c, x["median"]) for c in concs
                       if (x := ratio_to(hello, "hello", w, c, refs)) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts],
                            marker="o" if w > 1 else "x", color=f"C{i}",
                            linestyle="-" if w > 1 else ":",
                            label=f"/ {REF_NAMES[key].replace('`', '')} ({w}w)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(STRETCH, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent connections (keep-alive)")
        ax.set_ylabel("appliance req/s / reference req/s")
        ax.set_title("hello (ASGI): appliance relative to the references, same repetition")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(PLOTS / "ratio-hello.png", dpi=90)
        plt.close(fig)
        made.append("ratio-hello.png")
    nc = res.get("newconn", [])
    if nc:
        concs = sorted({r["concurrency"] for r in nc})
        names = list(dict.fromkeys(r["peer"] for r in nc))
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(concs))
        for j, c in enumerate(concs):
            vals = [next((r["rps"] for r in nc if r["peer"] == p and r["concurrency"] == c), 0)
                    for p in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=f"c={c}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, fontsize=8, rotation=20)
        ax.set_ylabel("requests/s (median)")
        ax.set_title("new connection per request (Connection: close)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(PLOTS / "newconn.png", dpi=90)
        plt.close(fig)
        made.append("newconn.png")
    rel = res.get("reload", [])
    if rel:
        fig, ax = plt.subplots(figsize=(6, 3))
        ka = [(r.get("modes") or {}).get("keepalive", {}).get("failed", r["failed"]) for r in rel]
        cl = [(r.get("modes") or {}).get("close", {}).get("failed", 0) for r in rel]
        ax.bar([r["peer"] for r in rel], ka, color="tab:red", label="keep-alive client")
        ax.bar([r["peer"] for r in rel], cl, bottom=ka, color="tab:orange",
               label="new-connection client")
        ax.legend(fontsize=7)
        ax.set_ylabel(f"failed requests / {rel[0]['reloads']} reloads")
        ax.set_title("failed requests during reloads under load")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(PLOTS / "reload-failures.png", dpi=90)
        plt.close(fig)
        made.append("reload-failures.png")
    return made


# -- targets ---------------------------------------------------------------------------------

def _hello_ratios(rows: list[dict[str, Any]], refs: tuple[str, ...], app: str = "hello",
                  peer: str = APPLIANCE, min_c: int = 0,
                  ) -> list[tuple[int, int, dict[str, Any]]]:
    ws = sorted({r["workers"] for r in rows if r["peer"] == peer and r["app"] == app})
    cs = sorted({r["concurrency"] for r in rows if r["peer"] == peer and r["app"] == app})
    return [(w, c, x) for w in ws for c in cs if c >= min_c
            if (x := ratio_to(rows, app, w, c, refs, peer)) is not None]


def _worst(points: list[tuple[int, int, dict[str, Any]]]) -> str:
    w, c, x = min(points, key=lambda p: p[2]["median"])
    return f"{x['median']:.2f}x at {w} worker{'s' if w > 1 else ''}, c={c}"


def targets(res: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for appliance: issue 14's and issue 10's."""
    n = res["workers"]
    rows = res.get("throughput", [])
    out: list[tuple[str, str, bool | None]] = []
    pts = _hello_ratios(rows, PY_PEERS)
    if pts:
        out.append((("hello (ASGI), keep-alive: ≥ 1.0x the best Python peer at every point "
                    "(1 and N workers, every c)"),
                    (f"{min(p[2]['median'] for p in pts):.2f}x–"
                    f"{max(p[2]['median'] for p in pts):.2f}x; lowest {_worst(pts)}"),
                    all(p[2]["median"] >= 1.0 for p in pts)))
        hi = [p for p in pts if p[1] >= 16]
        if hi:
            out.append((f"stretch: ≥ {STRETCH}x the best Python peer at c ≥ 16",
                        ", ".join(f"{w}w c={c}: {x['median']:.2f}x" for w, c, x in hi),
                        all(p[2]["median"] >= STRETCH for p in hi)))
    nc = res.get("newconn", [])
    if nc:
        cs = sorted({r["concurrency"] for r in nc if r["peer"] == APPLIANCE})
        vs_k = [(c, ratio_to(nc, "hello", n, c, (KERNEL,))) for c in cs]
        vs_b = [(c, ratio_to(nc, "hello", n, c, PY_PEERS)) for c in cs]
        meas = ", ".join(f"c={c}: {_f(k and k['median'], '{:.2f}x')} kernel / "
                         f"{_f(b and b['median'], '{:.2f}x')} best" for (c, k), (_, b)
                         in zip(vs_k, vs_b))
        vals = [x["median"] for _, x in vs_k + vs_b if x]
        if vals:
            out.append((("new connection per request: ≥ 1.0x `accept = \"kernel\"` and the "
                        "best Python peer"), meas, min(vals) >= 1.0))
    wp = _hello_ratios(rows, WSGI_PEERS, peer=APPLIANCE_WSGI)
    if wp:
        out.append(("hello (WSGI): ≥ 1.0x the best of gunicorn sync and gthread at every point",
                    (f"{min(p[2]['median'] for p in wp):.2f}x–"
                    f"{max(p[2]['median'] for p in wp):.2f}x; lowest {_worst(wp)}"),
                    all(p[2]["median"] >= 1.0 for p in wp)))
    concs = [c for c in sorted({r["concurrency"] for r in rows if r["app"] == "cpu"}) if c >= 4]
    if concs and n > 1:
        shares = [(c, r) for c in concs
                  if (r := _row(rows, APPLIANCE, "cpu", n, c)) is not None
                  and r.get("busiest_share") is not None]
        if shares:
            worst = max(max(r["busiest_share"], r.get("busiest_conn_share") or 0)
                        for _, r in shares)
            out.append((f"busiest worker ≤ {BUSIEST_MAX:.0%} at c ≥ 4 (cpu app, {n} workers)",
                        ", ".join(f"c={c}: {_pct(r['busiest_share'])} req / "
                                  f"{_pct(r.get('busiest_conn_share'))} conns"
                                  for c, r in shares), worst <= BUSIEST_MAX))
        sc = [(c, x) for c in concs if (x := scaling(rows, APPLIANCE, "cpu", n, c)) is not None]
        if sc:
            out.append((f"cpu app {n} workers / 1 worker ≥ {SCALING_MIN}x at c ≥ 4",
                        ", ".join(f"c={c}: {x['median']:.2f}x" for c, x in sc),
                        all(x["median"] >= SCALING_MIN for _, x in sc)))
    mc = [r for r in res.get("mastercpu", []) if r["peer"] == APPLIANCE]
    if mc:
        out.append(("master CPU under full load < 1 % of a core",
                    ", ".join(f"{r.get('mode', 'keepalive')}: {r['master_cpu_pct']:.2f} % "
                              f"(max {r.get('master_cpu_pct_max', r['master_cpu_pct']):.2f} %)"
                              for r in mc),
                    all(r.get("master_cpu_pct_max", r["master_cpu_pct"]) < 1.0 for r in mc)))
    rl = next((r for r in res.get("reload", []) if r["peer"] == APPLIANCE), None)
    if rl:
        out.append((f"0 failed requests across {rl['reloads']} reloads under load",
                    f"{rl['failed']} failed of {rl['ok'] + rl['failed']}", rl["failed"] == 0))
    kl = next((r for r in res.get("kill", []) if r["peer"] == APPLIANCE), None)
    if kl and kl.get("replacement_ms_max") is not None:
        out.append((f"kill -9 of a worker → replacement answering ≤ {REPLACEMENT_MS_MAX:.0f} ms",
                    (f"{_f(kl['replacement_ms_median'])} ms median, "
                    f"{_f(kl['replacement_ms_max'])} ms max ({_n(kl['kills'], 'kill')}, under load)"),
                    kl["replacement_ms_max"] <= REPLACEMENT_MS_MAX))
    wb = next((r for r in res.get("workerboot", []) if r["peer"] == APPLIANCE), None)
    if wb and wb.get("replacement_boot_s_median") is not None:
        out.append((("replacement worker boots in milliseconds (spawn to ready, a fork from "
                    f"the template; ≤ {REPLACEMENT_MS_MAX:.0f} ms)"),
                    (f"{1000 * wb['replacement_boot_s_median']:.1f} ms median, "
                    f"{1000 * wb['replacement_boot_s_max']:.1f} ms max "
                    f"({_n(wb['kills_replaced'], 'kill')}, idle)"),
                    wb["replacement_boot_s_max"] <= REPLACEMENT_MS_MAX / 1000))
    st = next((r for r in res.get("startup", []) if r["peer"] == APPLIANCE), None)
    if st:
        v = st.get("ready_s_median") or st["first_response_s_median"]
        out.append((f"start to READY=1 / first response ≤ {READY_S_MAX} s",
                    (f"READY {_f(st.get('ready_s_median'), '{:.3f}')} s, first response "
                    f"{st['first_response_s_median']:.3f} s (median)"),
                    max(v, st["first_response_s_median"]) <= READY_S_MAX))
    mem = next((r for r in res.get("memory", []) if r["peer"] == APPLIANCE), None)
    if mem:
        tpl = mem.get("template_pss_mib") or []
        out.append((f"PSS master + {n} workers (+ template) ≤ {PSS_MIB_MAX:.0f} MiB",
                    f"{mem['total_pss_mib']:.1f} MiB"
                    + (f" (template {sum(tpl):.1f}; without it "
                       f"{mem.get('total_without_template_mib', mem['total_pss_mib']):.1f})"
                       if tpl else ""), mem["total_pss_mib"] <= PSS_MIB_MAX))
    return out


# -- the document ----------------------------------------------------------------------------

def _throughput_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    concs = sorted({r["concurrency"] for r in rows})
    peers_ = list(dict.fromkeys(r["peer"] for r in rows))
    ws = sorted({r["workers"] for r in rows})
    out = [title, "", "| peer | workers | " + " | ".join(f"c={c}" for c in concs) + " |",
           "| --- | --- | " + " | ".join("---" for _ in concs) + " |"]
    for peer in peers_:
        for w in ws:
            cells = []
            for c in concs:
                r = next((x for x in rows if x["peer"] == peer and x["workers"] == w
                          and x["concurrency"] == c), None)
                cells.append("–" if r is None else
                             f"{r['rps']:.0f} ({_f(r['p99_ms'], '{:.1f}')})"
                             + (f" **{r['failed']} failed**" if r.get("failed") else ""))
            if any(x != "–" for x in cells):
                out.append(f"| {peer} | {w} | " + " | ".join(cells) + " |")
    return out + [""]


def _cpu_table(rows: list[dict[str, Any]], what: str) -> list[str]:
    """Server CPU per request (all of a peer's processes; harness ``server_cpu_us``), by peer,
    workers and concurrency: what serving costs, apart from the load generator's share."""
    if not any(r.get("server_cpu_us") for r in rows):
        return []
    concs = sorted({r["concurrency"] for r in rows})
    ws = sorted({r["workers"] for r in rows})
    out = [(f"Server CPU per request, {what} (µs; every process of the peer, from "
            "/proc/PID/task/*/schedstat around each cell, divided by the requests served; "
            "median over repetitions; lower is better):"), "",
           "| peer | workers | " + " | ".join(f"c={c}" for c in concs) + " |",
           "| --- | --- | " + " | ".join("---" for _ in concs) + " |"]
    for peer in dict.fromkeys(r["peer"] for r in rows):
        for w in ws:
            cells = []
            for c in concs:
                r = next((x for x in rows if x["peer"] == peer and x["workers"] == w
                          and x["concurrency"] == c), None)
                cells.append(_f(None if r is None else r.get("server_cpu_us")))
            if any(x != "–" for x in cells):
                out.append(f"| {peer} | {w} | " + " | ".join(cells) + " |")
    return out + [""]


def _ratio_table(rows: list[dict[str, Any]], app: str, peer: str,
                 refs: list[tuple[str, tuple[str, ...]]], intro: str) -> list[str]:
    concs = sorted({r["concurrency"] for r in rows if r["peer"] == peer and r["app"] == app})
    ws = sorted({r["workers"] for r in rows if r["peer"] == peer and r["app"] == app})
    lines = []
    for w in ws:
        for key, ref in refs:
            cells = [ratio_to(rows, app, w, c, ref, peer) for c in concs]
            if not any(cells):
                continue
            multi = len(ref) > 1
            lines.append(f"| {w} | {REF_NAMES[key]} | " + " | ".join(
                _ratio_cell(x, name=multi, bold=key in ("best", "wsgi")) for x in cells) + " |")
    if not lines:
        return []
    return [intro, "", "| workers | relative to | " + " | ".join(f"c={c}" for c in concs)
            + " |", "| --- | --- | " + " | ".join("---" for _ in concs) + " |", *lines, ""]


def _method(res: dict[str, Any]) -> list[str]:
    desc = res.get("peer_descriptions") or {}
    suites = res.get("suites") or []
    threads = res.get("wsgi_threads")
    out = [
        "Method:",
        "",
        ("- **Interleaved.** In each throughput suite every peer is started with 1 and with N "
        "workers side by side (idle when not measured); each repetition then measures every "
        "one round-robin at each concurrency, the order rotated (and reversed on odd "
        "repetitions) from one repetition to the next. New-connection throughput, master CPU "
        "and start-up are interleaved the same way. Background load from other tenants "
        "therefore lands on all peers alike instead of on whichever peer ran during a busy "
        "minute."),
        ("- **Medians and same-repetition ratios.** Cells show the median over repetitions. "
        "Ratios (appliance / best Python peer, / nginx, / node; N workers / 1 worker) are "
        "computed within each repetition and then the median is taken, so a slow minute "
        "cancels out. The best Python peer is the fastest of uvicorn, gunicorn + uvicorn "
        "worker and granian *in that repetition*, so noise alone puts a peer equal to them "
        "somewhat below 1.0x."),
        "- **Byte-code.** This environment sets PYTHONDONTWRITEBYTECODE=1, so an editable "
        "install never caches .pyc files. Before the run the harness byte-compiles the "
        "repo's appliance/ and bench/ and the venv's site-packages (`compileall`), so no "
        "peer compiles from source at start-up"
        + (f" (result: {res['bytecode']})" if res.get("bytecode") else "") + ".",
        ("- **Load tools.** `wrk` for the hello app (threads = min(2, connections)); our "
        "client (`bench/client.py`, stdlib asyncio, counts every failure and which worker "
        "answered each request and each new connection) for the cpu app and for the "
        "reload/kill runs. The load generator shares the 2 CPUs with the server under "
        "test, so hello numbers are a client+server total, and nginx's are what this "
        "machine can do with wrk beside it (the ceiling)."),
        "- **Apps.** `hello` returns a short body naming the pid (nginx: `return 200` with the "
        "same body); `cpu` does a loop of arithmetic"
        + (f" ({res['python_cpu_iterations']} iterations, calibrated at the start of the run "
           f"to take {res['python_cpu_work_ms']:.2f} ms of CPU time in Python on this machine, so "
           "the "
           "scenario costs the same per request on a fast and a slow host)"
           if res.get("python_cpu_iterations") else
           f" ({res['python_cpu_work_ms']:.2f} ms in Python on this machine at the start of "
           "the run)" if res.get("python_cpu_work_ms") else "")
        + "; node runs the same loop, each worker calibrating its iteration count at start "
        "(after a JIT warm-up) to take the same time, so node's cpu numbers measure its "
        "server overhead and scaling, not the JIT's speed on the loop.",
        ("- **Warm-up.** Every instance gets 0.5 s of load (2 connections) right after it "
        "starts, before any measured cell."),
    ]
    if suites:
        out.append("- **Suites.** " + "; ".join(
            f"`{s['name']}`: {s['app']} app, {', '.join(s['peers'])}"
            + (f" (c ≤ {s['max_conc']})" if s.get("max_conc") else "") for s in suites) + ".")
    if desc:
        out.append("- **Peers.** " + "; ".join(
            f"`{p}`: {d}" + (f" (T = {threads} in this run)"
                             if p == "gunicorn-gthread" and threads else "")
            for p, d in desc.items()) + ".")
    return out + [""]


def render(res: dict[str, Any], made: list[str]) -> str:
    v, m = res["versions"], res["machine"]
    n = res["workers"]
    mon = res.get("monitor") or {}
    cpu = mon.get("cpu") or {}
    out = [
        "# Benchmarks",
        "",
        "Generated by `scripts/bench` (bench/harness.py, bench/report.py) — do not edit by hand;",
        ("re-run `scripts/bench` to refresh (`scripts/bench --help` lists the scenarios and "
        "peers). Raw numbers: `bench/results/latest.json`."),
        "",
    ]
    tg = targets(res)
    if tg:
        out += ["## Targets (appliance)", "", "| target | measured | met |",
                "| --- | --- | --- |"]
        for name, meas, ok in tg:
            out.append(f"| {name} | {meas} | {'yes' if ok else 'no' if ok is False else '–'} |")
        out.append("")
    out += [
        "## Run, machine, method",
        "",
        f"Run: {res['when']}, {res['reps']} repetition(s) x {res['secs']} s per cell; "
        f"N = {n} workers" + (f"; whole run {res['elapsed_s'] / 60:.1f} min"
                              if res.get("elapsed_s") else "") + ".",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}. Load average "
        f"at start {' '.join(m['loadavg_at_start'])}"
        + (f", at end {' '.join(m['loadavg_at_end'])}" if m.get("loadavg_at_end") else "")
        + (f"; during the run (sampled every 5 s) min {mon['loadavg_min']:.2f}, median "
           f"{mon['loadavg_median']:.2f}, max {mon['loadavg_max']:.2f}"
           if mon.get("loadavg_median") is not None else "") + ".",
    ]
    if cpu:
        out += ["", ("Whole-machine CPU per scenario (/proc/stat; busy = all tenants "
                "including the bench and its load generator; steal = time the hypervisor "
                "gave our vCPUs to someone else):"), "",
                "| scenario | minutes | busy % | steal % |", "| --- | --- | --- | --- |"]
        for name, d in cpu.items():
            out.append(f"| {name} | {d['seconds'] / 60:.1f} | {d['busy_pct']:.0f} | "
                       f"{d['steal_pct']:.1f} |")
    out += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]
    out += _method(res)
    if res.get("skipped"):
        out += ["Skipped: " + "; ".join(f"{k}: {val}" for k, val in res["skipped"].items()), ""]
    out += _throughput_sections(res, made)
    out += _newconn_section(res, made)
    out += _placement_section(res)
    out += _mastercpu_section(res)
    out += _startup_section(res)
    out += _workerboot_section(res)
    out += _reload_kill_sections(res, made)
    out += _memory_section(res)
    out += _profile_section(res)
    out += meaning(res, tg)
    fair = ROOT / "bench" / "FAIRNESS.md"
    if fair.exists():
        out += ["## Fairness study", "",
                "How accepted connections are spread over workers sharing one socket, and the",
                "mechanism appliance uses: see [bench/FAIRNESS.md](../bench/FAIRNESS.md).", ""]
    return "\n".join(out)


def _throughput_sections(res: dict[str, Any], made: list[str]) -> list[str]:
    rows = res.get("throughput", [])
    n = res["workers"]
    out: list[str] = []
    if not rows:
        return out
    hello = [r for r in rows if suite_of(r) == "hello"]
    wsgi = [r for r in rows if suite_of(r) == "hello-wsgi"]
    cpu = [r for r in rows if suite_of(r) == "cpu"]
    if hello:
        out += _throughput_table(hello, "## Throughput, hello app, ASGI (req/s, median; p99 ms "
                                 "in brackets)")
        out += _ratio_table(
            hello, "hello", APPLIANCE,
            [("best", PY_PEERS), ("nginx", ("nginx",)), ("node", ("node",))],
            "Appliance relative to the best Python peer (uvicorn, gunicorn + uvicorn worker, "
            "granian; bold, with the range over repetitions and the peer that was best most "
            "often), to nginx's `return 200` (the ceiling of this machine) and to Node "
            "cluster; median of per-repetition ratios:")
        out += _cpu_table(hello, "hello app, ASGI")
        for name in ("throughput-hello.png", "ratio-hello.png"):
            if name in made:
                out += [f"![{name}](../bench/results/plots/{name})", ""]
    if wsgi:
        out += _throughput_table(wsgi, "## Throughput, hello app, WSGI (req/s, median; p99 ms "
                                 "in brackets)")
        out += ["appliance-wsgi runs the WSGI app in each worker's thread pool (its own bridge, "
                "`[wsgi] threads`); gunicorn sync serves one request at a time per worker and "
                "closes every connection; gthread keeps connections alive with a thread pool "
                "of the same size." + (f" (T = {res['wsgi_threads']}.)"
                                       if res.get("wsgi_threads") else ""), ""]
        out += _ratio_table(wsgi, "hello", APPLIANCE_WSGI, [("wsgi", WSGI_PEERS)],
                            "appliance-wsgi / the best of gunicorn sync and gthread, same "
                            "repetition (median; range; the peer that was best most often):")
        out += _cpu_table(wsgi, "hello app, WSGI")
        if "throughput-hello-wsgi.png" in made:
            out += [("![throughput-hello-wsgi.png](../bench/results/plots/"
                    "throughput-hello-wsgi.png)"), ""]
    if cpu:
        out += _throughput_table(cpu, "## Throughput, cpu app (req/s, median; p99 ms in "
                                 "brackets)")
        out += _ratio_table(cpu, "cpu", APPLIANCE, [("best", PY_PEERS)],
                            "Appliance / best Python peer, cpu app (median of per-repetition "
                            "ratios; range; the peer that was best most often):")
        out += _cpu_table(cpu, "cpu app (the app's own loop is about "
                          f"{_f(res.get('python_cpu_work_ms'), '{:.2f}')} ms of it)")
        concs = sorted({r["concurrency"] for r in cpu})
        peers_ = list(dict.fromkeys(r["peer"] for r in cpu))
        out += [f"## Scaling and evenness, cpu app ({n} workers vs 1)", "",
                (f"Ratio = {n}-worker req/s / 1-worker req/s of the same repetition (median). "
                "Busiest = share of requests / of new connections served by the worker that "
                f"served most ({n} workers, median). Targets for appliance: ratio ≥ "
                f"{SCALING_MIN}x and busiest ≤ {BUSIEST_MAX:.0%} at c ≥ 4."), "",
                "| peer | " + " | ".join(f"c={c}: ratio / busiest req / conns" for c in concs)
                + " |", "| --- | " + " | ".join("---" for _ in concs) + " |"]
        for peer in peers_:
            cells = []
            for c in concs:
                sc = scaling(cpu, peer, "cpu", n, c)
                nn = _row(cpu, peer, "cpu", n, c)
                if sc is None or nn is None:
                    cells.append("–")
                    continue
                cells.append(f"{sc['median']:.2f}x / {_pct(nn.get('busiest_share'))} / "
                             f"{_pct(nn.get('busiest_conn_share'))}")
            out.append(f"| {peer} | " + " | ".join(cells) + " |")
        out.append("")
        split = []
        for peer in peers_:
            for c in concs:
                nn = _row(cpu, peer, "cpu", n, c)
                if nn and nn.get("reps") and c >= 4:
                    sp = []
                    for r in nn["reps"]:
                        cp = sorted((r.get("conn_pids") or {}).values(), reverse=True)
                        cp += [0] * (n - len(cp))
                        if any(cp):
                            sp.append("/".join(str(x) for x in cp))
                    if sp:
                        split.append((peer, c, ", ".join(sp)))
        if split:
            out += [("New connections per worker in each repetition (cpu app, "
                    f"{n} workers; the client opens one connection per concurrent loop, so "
                    "this is who accepted them):"), "",
                    "| peer | " + " | ".join(f"c={c}" for c in concs if c >= 4) + " |",
                    "| --- | " + " | ".join("---" for c in concs if c >= 4) + " |"]
            for peer in peers_:
                cells = [next((x[2] for x in split if x[0] == peer and x[1] == c), "–")
                         for c in concs if c >= 4]
                out.append(f"| {peer} | " + " | ".join(cells) + " |")
            out.append("")
        if "throughput-cpu.png" in made:
            out += ["![throughput-cpu.png](../bench/results/plots/throughput-cpu.png)", ""]
    return out


def _newconn_section(res: dict[str, Any], made: list[str]) -> list[str]:
    nc = res.get("newconn", [])
    if not nc:
        return []
    n = res["workers"]
    concs = sorted({r["concurrency"] for r in nc})
    out = ["## New connection per request (hello app, Connection: close)", "",
           (f"wrk with `-H \"Connection: close\"`, {n} workers: every request pays a TCP "
           "handshake, an accept in some worker and a close, so this measures the accept path "
           "(appliance's balanced accepting vs `accept = \"kernel\"`, libuv's own accept "
           "loop) rather than the HTTP one. Interleaved like the throughput suites. req/s, "
           "median (p99 ms):"), "",
           "| peer | " + " | ".join(f"c={c}" for c in concs) + " |",
           "| --- | " + " | ".join("---" for _ in concs) + " |"]
    for peer in dict.fromkeys(r["peer"] for r in nc):
        cells = []
        for c in concs:
            r = next((x for x in nc if x["peer"] == peer and x["concurrency"] == c), None)
            cells.append("–" if r is None else f"{r['rps']:.0f} ({_f(r['p99_ms'], '{:.1f}')})"
                         + (f" **{r['failed']} failed**" if r.get("failed") else ""))
        out.append(f"| {peer} | " + " | ".join(cells) + " |")
    out.append("")
    out += _ratio_table(nc, "hello", APPLIANCE,
                        [("kernel", (KERNEL,)), ("best", PY_PEERS), ("nginx", ("nginx",)),
                         ("node", ("node",))],
                        "Appliance relative to the others, same repetition (median; range):")
    out += _cpu_table(nc, "new connection per request")
    if "newconn.png" in made:
        out += ["![newconn.png](../bench/results/plots/newconn.png)", ""]
    return out


#: Placement scenario cases as the report names them.
_PLACEMENT_NAMES = {"same": "same CPU", "apart": "different CPUs", "free": "unpinned"}


def _placement_section(res: dict[str, Any]) -> list[str]:
    rows = res.get("placement", [])
    if not rows:
        return []
    places = [p for p in _PLACEMENT_NAMES if any(r["placement"] == p for r in rows)]
    out = ["## Where the load generator runs (1 worker, hello, keep-alive)", "",
           ("wrk and the serving process (every thread of it) pinned to the same CPU, to "
            "different CPUs, or left to the scheduler as in the throughput suites; "
            "interleaved like them. req/s, median (server CPU per request, µs):"), "",
           "| peer | c | " + " | ".join(_PLACEMENT_NAMES[p] for p in places) + " |",
           "| --- | --- | " + " | ".join("---" for _ in places) + " |"]
    concs = sorted({r["concurrency"] for r in rows})

    def row(peer: str, where: str, c: int) -> dict[str, Any] | None:
        return next((x for x in rows if x["peer"] == peer and x["placement"] == where
                     and x["concurrency"] == c), None)

    def rps(peer: str, where: str, c: int) -> float | None:
        r = row(peer, where, c)
        return None if r is None else r["rps"]

    for peer in dict.fromkeys(r["peer"] for r in rows):
        for c in concs:
            cells = [("–" if r is None else f"{r['rps']:.0f} ({_f(r.get('server_cpu_us'))})")
                     for r in (row(peer, p, c) for p in places)]
            out.append(f"| {peer} | {c} | " + " | ".join(cells) + " |")
    out.append("")

    same, apart = rps(APPLIANCE, "same", 1), rps(APPLIANCE, "apart", 1)
    if same and apart:
        out += [(f"One request at a time, appliance answers {same / apart:.1f}x as many "
                 "requests when wrk shares its CPU as when each has its own, and spends less "
                 "CPU on each: a request that wakes a sleeping process on the other CPU pays "
                 "a cross-CPU wake-up on both sides, which on this machine costs more than "
                 "serving the request. So at low concurrency, and with 2 workers and wrk's 2 "
                 "threads on 2 CPUs, a throughput cell also measures where the scheduler "
                 "happened to put wrk's threads and the workers."), ""]
    ratios = []
    for where in places:
        for c in concs:
            mine = rps(APPLIANCE, where, c)
            best = max((x for x in (rps(p, where, c) for p in PY_PEERS) if x), default=None)
            if mine and best:
                ratios.append(f"{_PLACEMENT_NAMES[where]} c={c}: {mine / best:.2f}x")
    if ratios:
        out += ["Appliance / the best Python peer, placement by placement (of the medians): "
                + ", ".join(ratios) + ".", ""]
    return out


def _mastercpu_section(res: dict[str, Any]) -> list[str]:
    if not res.get("mastercpu"):
        return []
    out = ["## Master CPU under full load (hello app, wrk c=16)", "",
           ("CPU time of the master process (all its threads, from "
           "/proc/PID/task/*/schedstat, ns resolution) over the load run, as % of one "
           "core; median and max over repetitions. Workers CPU is the request-serving "
           "children's (appliance's template is not among them). `close` = every request on "
           "a new connection (`-H \"Connection: close\"`)."), "",
           "| peer | load | master CPU % (median / max) | workers CPU % | req/s |",
           "| --- | --- | --- | --- | --- |"]
    for r in res["mastercpu"]:
        out.append(f"| {r['peer']} | {r.get('mode', 'keepalive')} | "
                   f"{r['master_cpu_pct']:.2f} / "
                   f"{r.get('master_cpu_pct_max', r['master_cpu_pct']):.2f} | "
                   f"{_f(r.get('workers_cpu_pct'))} | "
                   f"{r['rps']:.0f}" + (f" ({r['failed']} failed)" if r.get("failed")
                                         else "") + " |")
    return out + [""]


def _startup_section(res: dict[str, Any]) -> list[str]:
    if not res.get("startup"):
        return []
    n = res["workers"]
    out = ["## Start to first response", "",
           ("Spawn of the server process to the first 200 response (polled every 5 ms) "
           f"with {n} workers; for appliance also to READY=1 on a NOTIFY_SOCKET the "
           "harness owns (sent once every first-generation worker, forked from the "
           "generation's template, reported ready). Interleaved, byte-code precompiled for "
           "everyone."), "",
           "| peer | first response, median s | runs | READY=1, median s |",
           "| --- | --- | --- | --- |"]
    for r in res["startup"]:
        out.append(f"| {r['peer']} | {r['first_response_s_median']:.3f} | "
                   f"{', '.join(f'{x:.3f}' for x in r['runs_s'])} | "
                   f"{_f(r.get('ready_s_median'), '{:.3f}')} |")
    return out + [""]


def _ms(x: Any) -> str:
    return "–" if x is None else f"{1000 * x:.1f}"


def _workerboot_section(res: dict[str, Any]) -> list[str]:
    wb = res.get("workerboot", [])
    if not wb:
        return []
    out = ["## Worker boot and start-up steps (appliance's own events)", "",
           ("appliance started with `[log] level = \"info\"` (JSON lines on stderr, read by the "
           "harness), idle, N workers, a fresh start per repetition, then kill -9 of a worker "
           "(the slots in turn, 0.5 s apart). From the events (docs/events.md): "
           "**replacement boot** = the replacement's `worker.ready` `boot_s`, i.e. from the "
           "master's spawn decision to the worker's `ready` on its pipe: the request to the "
           "template, the fork there, the worker's own set-up (signals, sockets, engine); "
           "**kill → ready** = wall time from `kill -9` to that event (adds noticing the exit "
           "and any crash backoff, `respawn_in_s`); **generation 1 boot** = the first "
           "workers' `boot_s`, which includes waiting for the template's own boot. Event "
           "timestamps have millisecond resolution. The peers' equivalent under load is the "
           "kill -9 table's \"replacement\" column."), "",
           ("| peer | replacement boot ms (median / max) | kill → ready ms (median / max) | "
           "kills | generation 1 boot ms (median) | backoff before respawn s |"),
           "| --- | --- | --- | --- | --- | --- |"]
    for r in wb:
        backoff = sorted({k.get("respawn_in_s") for run in r["runs"] for k in run["kills"]
                          if k.get("respawn_in_s") is not None})
        out.append(f"| {r['peer']} | {_ms(r['replacement_boot_s_median'])} / "
                   f"{_ms(r['replacement_boot_s_max'])} | {_ms(r['kill_to_ready_s_median'])} / "
                   f"{_ms(r['kill_to_ready_s_max'])} | {r['kills_replaced']}/{r['kills']} | "
                   f"{_ms(r['gen1_boot_s_median'])} | "
                   f"{', '.join(f'{b:g}' for b in backoff) or '–'} |")
    out += ["", ("Start-up, step by step (medians over the starts; the master's clock for "
            "`boot_s`/`startup_s`, the harness's for the rest):"), "",
            ("| peer | spawn → `master.started` s | template boot s (`template.ready`) | "
            "master start → READY s (`master.ready` `startup_s`) | spawn → READY=1 s |"),
            "| --- | --- | --- | --- | --- |"]
    for r in wb:
        out.append(f"| {r['peer']} | {_f(r.get('spawn_to_master_started_s_median'), '{:.3f}')}"
                   f" | {_f(r.get('template_boot_s_median'), '{:.3f}')} | "
                   f"{_f(r.get('master_startup_s_median'), '{:.3f}')} | "
                   f"{_f(r.get('ready_s_median'), '{:.3f}')} |")
    return out + [""]


def _reload_kill_sections(res: dict[str, Any], made: list[str]) -> list[str]:
    out: list[str] = []
    if res.get("reload"):
        out += ["## Failed requests across reloads under mixed load", "",
                ("Two clients at once: 4 keep-alive connections and 4 loops that open a new "
                "connection per request, while the master gets `kill -HUP` N times, each "
                "time waiting until every old worker is gone. Every failed attempt counts "
                "(refused, reset, timeout, closed before the response, non-200)."), "",
                ("| peer | reloads | failed | keep-alive / new-conn failed | kinds | ok | "
                "reload time (median s) | how |"),
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in res["reload"]:
            modes = r.get("modes") or {}
            out.append(f"| {r['peer']} | {r['reloads_completed']}/{r['reloads']} | "
                       f"{r['failed']} | {modes.get('keepalive', {}).get('failed', '–')} / "
                       f"{modes.get('close', {}).get('failed', '–')} | "
                       f"{r['failures'] or '–'} | {r.get('ok', '–')} | "
                       f"{_f(r['reload_s_median'], '{:.2f}')} | {r['how']} |")
        out.append("")
        if "reload-failures.png" in made:
            out += ["![reload failures](../bench/results/plots/reload-failures.png)", ""]
    if res.get("kill"):
        out += ["## kill -9 of one worker", "",
                ("Same mixed load; one worker SIGKILLed 1 s in; the load goes on until a new "
                "worker has existed for 1 s (at most 5 s); replacement = time from the kill "
                "to the first response from a pid not seen before."), "",
                "| peer | kills | failed (per kill) | kinds | replacement ms (median / max) |",
                "| --- | --- | --- | --- | --- |"]
        for r in res["kill"]:
            kinds: dict[str, int] = {}
            for x in r["runs"]:
                for k, val in x.get("failures", {}).items():
                    kinds[k] = kinds.get(k, 0) + val
            out.append(f"| {r['peer']} | {r['kills']} | {[x['failed'] for x in r['runs']]} | "
                       f"{{{', '.join(f'{k}: {val}' for k, val in kinds.items() if val)}}} | "
                       f"{_f(r['replacement_ms_median'], '{:.0f}')} / "
                       f"{_f(r['replacement_ms_max'], '{:.0f}')} |")
        out.append("")
    return out


def _role_label(pr: dict[str, Any]) -> str:
    role = str(pr["role"])
    if role in ("helper", "child") and "resource_tracker" in pr.get("cmd", ""):
        return "helper (multiprocessing resource tracker)"
    return role


def _memory_section(res: dict[str, Any]) -> list[str]:
    mem = res.get("memory", [])
    if not mem:
        return []
    n = res["workers"]
    out = ["## Memory (PSS, hello app, after 1 s of warm-up load)", "",
           ("PSS from /proc/PID/smaps_rollup: shared pages are split between the processes that "
           "share them, so the total is what the pool really costs. appliance's template (one "
           "per generation, a child of the master that forks the workers and serves nothing; "
           "named by the master's status) is part of its footprint and of its total; the "
           "workers are the master's children too (re-parented to it, a child subreaper). "
           f"Target: master + {n} workers ≤ {PSS_MIB_MAX:.0f} MiB."), "",
           ("| peer | master MiB | template MiB | workers MiB | helpers MiB | total MiB | "
           "total without template |"),
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in mem:
        tpl = r.get("template_pss_mib") or []
        helpers = r.get("helper_pss_mib") or []
        out.append(f"| {r['peer']} | {r['master_pss_mib']:.1f} | "
                   f"{', '.join(f'{x:.1f}' for x in tpl) or '–'} | "
                   f"{', '.join(f'{x:.1f}' for x in r['worker_pss_mib'])} | "
                   f"{', '.join(f'{x:.1f}' for x in helpers) or '–'} | "
                   f"{r['total_pss_mib']:.1f} | "
                   + (f"{r.get('total_without_template_mib', r['total_pss_mib']):.1f}"
                      if tpl else "–") + " |")
    out.append("")
    det = [r for r in mem if r.get("processes")]
    if det:
        out += [("Per process, by kind of mapping (MiB of PSS; anon = heap and Python "
                "objects, interpreter = python/node/nginx binary or libpython, .so = other "
                "shared libraries and C extensions, files = other mapped files):"), "",
                "| peer | process | pid | PSS | anon | interpreter | .so | files |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in det:
            for pr in r["processes"]:
                k = pr["by_kind_kib"]
                out.append(f"| {r['peer']} | {_role_label(pr)} | {pr['pid']} | "
                           f"{pr['pss_kib'] / 1024:.1f} | {k['anon'] / 1024:.1f} | "
                           f"{k['python'] / 1024:.1f} | {k['so'] / 1024:.1f} | "
                           f"{k['files'] / 1024:.1f} |")
        out.append("")
    return out


def _dso_label(dso: str) -> str:
    if dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith(("libpython", "python")):
        return "interpreter (libpython)"
    if dso.startswith("loop.cpython"):
        return "uvloop (loop.so, with libuv)"
    if dso.startswith(("parser.cpython", "url_parser.cpython")):
        return f"httptools ({dso.split('.')[0]}.so, llhttp)"
    if dso.startswith("_asyncio"):
        return "asyncio (C)"
    if dso.startswith("libc.so"):
        return "libc"
    return dso


def _profile_rows(items: list[dict[str, Any]], top: int) -> list[str]:
    out = [("| # | function | where | own, user space % | own, Python % | own, innermost % "
           "| total % |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(items[:top], 1):
        func = r["func"].replace("|", "\\|")
        out.append(f"| {i} | `{func}` | {r['where']} | "
                   f"{_pct1(r.get('own_python_user_share')) if r.get('python') else '–'} | "
                   f"{_pct1(r.get('own_python_share')) if r.get('python') else '–'} | "
                   f"{_pct1(r.get('own_share'))} | "
                   f"{_pct1(r.get('total_share')) if r.get('python') else '–'} |")
    return out


def _components_table(prof: list[dict[str, Any]], key: str, intro: str) -> list[str]:
    names = [p["peer"] for p in prof]
    comp = {p["peer"]: {c["component"]: c["share"] for c in p.get(key, [])} for p in prof}
    order: list[str] = []
    for p in prof:
        for c in p.get(key, []):
            if c["share"] >= 0.01 and c["component"] not in order:
                order.append(c["component"])
    if not order:
        return []
    out = [intro, "", "| component | " + " | ".join(names) + " |",
           "| --- | " + " | ".join("---" for _ in names) + " |"]
    for c in order:
        out.append(f"| {c} | " + " | ".join(_pct1(comp[p].get(c)) for p in names) + " |")
    return out + [""]


def _profile_section(res: dict[str, Any]) -> list[str]:
    prof = [p for p in res.get("profile", []) if p.get("samples")]
    if not prof:
        return []
    n = res["workers"]
    p0 = prof[0]
    out = ["## Profile: where a hello request's time goes", "",
           (f"One worker of each profiled peer ({n} workers, hello app) under wrk c="
           f"{p0.get('concurrency', 16)}, recorded twice in a row for {p0['seconds']} s each:"),
           "",
           (f"1. **py-spy** (`record --native --function --format raw --rate {p0['rate_hz']}`): "
           "wall-clock stacks with Python and C frames (uvloop's Cython, libuv, llhttp, the "
           "interpreter, libc). Only the main thread counts; samples where it waits in "
           "`epoll_wait` with nothing to do are *idle*, the rest *busy*, and every share below "
           "is of the busy samples. **own, Python** = time under that Python function with "
           "the C code it calls (the interpreter, uvloop, llhttp, syscalls) counted to it; "
           "**own, innermost** = samples whose innermost frame is it; **total** = samples "
           "with it anywhere on the stack; **own, user space** = own, Python over the busy "
           "samples not inside a system call. C work with no Python frame above it but the "
           "process entry and the event loop's `run_forever` (the *trunk*) is the event "
           "loop's. Samples are wall-clock: time the worker waits for a CPU (wrk shares the "
           "two cores, and waking it from `write()` often hands it the CPU) is charged where "
           "it was preempted, mostly at the return of a syscall, so read the `write()` and "
           "`read()` rows with the run-queue column of the first table."),
           ("2. **perf** (`record -e cpu-clock -F 499`): on-CPU samples only, split by shared "
           "object and symbol. Python 3.11 has no perf trampoline (that is 3.12's `-X perf`), "
           "so perf sees C functions only; it says how much of the CPU goes to the kernel "
           "(the loopback TCP path of read/write/epoll), to the interpreter, to uvloop and to "
           "llhttp, which wall-clock samples cannot."), "",
           ("| peer | req/s during | busy samples | busy / idle of wall time | on CPU / in run "
           "queue during py-spy | on CPU / run queue during perf | py-spy errors | raw |"),
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in prof:
        pf = p.get("perf") or {}
        raw = f"`{p['raw']}`" + (f", `{pf['report']}`" if pf.get("report") else "")
        out.append(f"| {p['peer']} | {_f(p.get('rps'))} | {p['samples']} of "
                   f"{p['samples_all_threads']} | {_pct(p.get('busy_share'))} / "
                   f"{_pct(p.get('idle_share'))} | {_pct(p.get('on_cpu_share'))} / "
                   f"{_pct(p.get('runqueue_share'))} | {_pct(pf.get('on_cpu_share'))} / "
                   f"{_pct(pf.get('runqueue_share'))} | {_f(p.get('py_spy_errors'))} | {raw} |")
    out.append("")
    out += _components_table(
        prof, "components", "Busy time by component (py-spy, wall-clock, % of busy samples; "
        "interpreter-internal C frames count to the code that called them; `libc X()` = time "
        "inside that libc call, mostly the system call and, at its return, waiting for a CPU):")
    out += _components_table(
        prof, "components_user", "User-space time by component (py-spy, % of the busy samples "
        "not inside a system call: robust to the wall-clock bias; what the system calls cost "
        "on a CPU is perf's kernel share below):")
    names = [p["peer"] for p in prof]
    if any((p.get("perf") or {}).get("dso") for p in prof):
        dsos: list[str] = []
        for p in prof:
            for d in (p.get("perf") or {}).get("dso", []):
                if _dso_label(d["dso"]) not in dsos and d["share"] >= 0.005:
                    dsos.append(_dso_label(d["dso"]))
        share: dict[str, dict[str, float]] = {p["peer"]: {} for p in prof}
        for p in prof:
            for d in (p.get("perf") or {}).get("dso", []):
                lab = _dso_label(d["dso"])
                share[p["peer"]][lab] = share[p["peer"]].get(lab, 0) + d["share"]
        out += ["On-CPU time by shared object (perf, % of on-CPU samples):", "",
                "| code | " + " | ".join(names) + " |",
                "| --- | " + " | ".join("---" for _ in names) + " |"]
        for lab in dsos:
            out.append(f"| {lab} | " + " | ".join(_pct1(share[p].get(lab)) for p in names)
                       + " |")
        out.append("")
    for p in prof:
        head = p["peer"] == APPLIANCE
        body = [(f"Top 15 by own time in user space (Python function, with the C it calls; "
                f"samples inside a system call left out) — {p['peer']}:"), "",
                *_profile_rows(p.get("own_python_user") or p["own_python"], 15), "",
                f"Top 15 by own time with the system calls (wall-clock) — {p['peer']}:", "",
                *_profile_rows(p["own_python"], 15), "",
                f"Top 15 by total time (Python functions under the trunk) — {p['peer']}:", "",
                *_profile_rows(p["total"], 15), "",
                f"Top 15 innermost frames (C included) — {p['peer']}:", "",
                *_profile_rows(p["own_innermost"], 15), ""]
        pf = p.get("perf") or {}
        if pf.get("symbols"):
            body += [f"Top on-CPU symbols (perf, self time) — {p['peer']}:", "",
                     "| # | symbol | code | on-CPU % |", "| --- | --- | --- | --- |"]
            body += [f"| {i} | `{s['symbol']}` | {_dso_label(s['dso'])} | "
                     f"{_pct1(s['share'])} |" for i, s in enumerate(pf["symbols"][:15], 1)]
            body.append("")
        if head:
            out += [f"### {p['peer']}", "", *body]
            if p.get("trunk"):
                out += ["Trunk (on ≥ 97 % of busy samples, left out of the total table): "
                        + ", ".join(f"`{t}`" for t in p["trunk"][:12])
                        + (" …" if len(p["trunk"]) > 12 else "") + ".", ""]
        else:
            out += [f"<details><summary>{p['peer']}: the same tables</summary>", "", *body,
                    "</details>", ""]
    return out


def meaning(res: dict[str, Any], tg: list[tuple[str, str, bool | None]]) -> list[str]:
    """A short reading of the numbers, derived from them (so it stays true on a re-run)."""
    rows = res.get("throughput", [])
    n = res["workers"]
    out = ["## What the numbers mean", ""]
    pts = _hello_ratios(rows, PY_PEERS)
    if pts:
        lo, hi = min(p[2]["median"] for p in pts), max(p[2]["median"] for p in pts)
        best = [p[2]["best"] for p in pts]
        common = max(set(best), key=best.count)
        ceil = _hello_ratios(rows, ("nginx",))
        node = _hello_ratios(rows, ("node",))
        out.append(
            f"- Hello (ASGI), keep-alive: appliance is at {lo:.2f}x–{hi:.2f}x of the best "
            f"Python peer of the same repetition over 1 and {n} workers and every concurrency "
            f"(lowest {_worst(pts)}); the best peer was most often {common}."
            + (f" Against the ceiling, nginx `return 200` with wrk on the same 2 CPUs, "
               f"appliance reaches {min(p[2]['median'] for p in ceil):.2f}x–"
               f"{max(p[2]['median'] for p in ceil):.2f}x" if ceil else "")
            + (f"; against Node cluster {min(p[2]['median'] for p in node):.2f}x–"
               f"{max(p[2]['median'] for p in node):.2f}x" if node else "") + ".")
    wp = _hello_ratios(rows, WSGI_PEERS, peer=APPLIANCE_WSGI)
    if wp:
        out.append(f"- Hello (WSGI): appliance-wsgi is at "
                   f"{min(p[2]['median'] for p in wp):.2f}x–"
                   f"{max(p[2]['median'] for p in wp):.2f}x of the better of gunicorn sync "
                   f"and gthread (lowest {_worst(wp)}).")
    met = [t for t in tg if t[2]]
    missed = [t for t in tg if t[2] is False]
    if met:
        out.append("- Targets met: " + "; ".join(f"{t[0]} ({t[1]})" for t in met) + ".")
    if missed:
        out.append("- Targets missed: " + "; ".join(f"{t[0]} ({t[1]})" for t in missed) + ".")
    mem = {r["peer"]: r for r in res.get("memory", [])}
    ap = mem.get(APPLIANCE)
    if ap and ap.get("processes"):
        procs = ap["processes"]
        ms = procs[0]
        k = ms["by_kind_kib"]
        tpl = [p for p in procs if p["role"] == "template"]
        ws = [p for p in procs if p["role"] == "worker"]
        anon = sum(c["by_kind_kib"]["anon"] for c in ws) / 1024 / max(1, len(ws))
        gu = mem.get("gunicorn-uvicorn")
        out.append(
            f"- Memory: appliance's pool is {ap['total_pss_mib']:.1f} MiB: the master "
            f"{ms['pss_kib'] / 1024:.1f} MiB ({k['anon'] / 1024:.1f} anonymous, "
            f"{k['so'] / 1024:.1f} in shared libraries whose pages only it touched)"
            + (f", the template {sum(t['pss_kib'] for t in tpl) / 1024:.1f} MiB "
               f"({sum(t['by_kind_kib']['anon'] for t in tpl) / 1024:.1f} anonymous)"
               if tpl else "")
            + f", each worker {_f(ap['worker_pss_mib'][0] if ap['worker_pss_mib'] else None, '{:.1f}')}"
            f" MiB (~{anon:.1f} MiB anonymous: pages made private after the fork, and its own "
            "heap)."
            + (f" gunicorn with the same uvicorn worker class totals {gu['total_pss_mib']:.1f}"
               " MiB." if gu else "")
            + (f" Against the {PSS_MIB_MAX:.0f} MiB target: "
               f"{'met' if ap['total_pss_mib'] <= PSS_MIB_MAX else 'missed'}"
               + (f" (without the template {ap.get('total_without_template_mib', 0):.1f} MiB)"
                  if tpl else "") + "."))
    st = {r["peer"]: r for r in res.get("startup", [])}
    wb = next((r for r in res.get("workerboot", []) if r["peer"] == APPLIANCE), None)
    if APPLIANCE in st:
        s = st[APPLIANCE]
        others = ", ".join(f"{p} {r['first_response_s_median']:.3f} s" for p, r in st.items()
                           if p != APPLIANCE)
        out.append(
            f"- Start-up: appliance {s['first_response_s_median']:.3f} s to the first response, "
            f"{_f(s.get('ready_s_median'), '{:.3f}')} s to READY=1"
            + (f" ({others})" if others else "") + "."
            + (f" By its events: {_f(wb.get('spawn_to_master_started_s_median'), '{:.3f}')} s "
               "from spawn to `master.started` (interpreter, imports, config, sockets), then "
               f"{_f(wb.get('master_startup_s_median'), '{:.3f}')} s to `master.ready`, of which "
               f"the template's own boot is {_f(wb.get('template_boot_s_median'), '{:.3f}')} s."
               if wb else ""))
    if wb and wb.get("replacement_boot_s_median") is not None:
        out.append(f"- Worker boot: a replacement is ready {_ms(wb['replacement_boot_s_median'])}"
                   f" ms (max {_ms(wb['replacement_boot_s_max'])} ms) after the master decides "
                   f"to spawn it, {_ms(wb['kill_to_ready_s_median'])} ms after the kill: a "
                   "fork of the template, not an interpreter start.")
    nc = res.get("newconn", [])
    if nc:
        cs = sorted({r["concurrency"] for r in nc if r["peer"] == APPLIANCE})
        parts = []
        for c in cs:
            k = ratio_to(nc, "hello", n, c, (KERNEL,))
            b = ratio_to(nc, "hello", n, c, PY_PEERS)
            if k or b:
                parts.append(f"c={c}: {_f(k and k['median'], '{:.2f}x')} of kernel accepting, "
                             f"{_f(b and b['median'], '{:.2f}x')} of the best Python peer")
        if parts:
            out.append("- New connection per request: appliance (balanced accepting) is at "
                       + "; ".join(parts) + ".")
    prof = next((p for p in res.get("profile", []) if p["peer"] == APPLIANCE
                 and p.get("samples")), None)
    if prof:
        wall = {c["component"]: c["share"] for c in prof["components"]}
        comps = {c["component"]: c["share"] for c in prof.get("components_user")
                 or prof["components"]}
        ours = sorted(((c, s) for c, s in comps.items() if c.startswith("appliance ")),
                      key=lambda cs: -cs[1])
        uv = sum(s for c, s in comps.items() if c.startswith("uvicorn "))
        top = (prof.get("own_python_user") or prof["own_python"])[:3]
        pf = prof.get("perf") or {}
        kern = sum(d["share"] for d in pf.get("dso", []) if d["dso"].startswith("[kernel"))
        interp = sum(d["share"] for d in pf.get("dso", []) if d["dso"].startswith("libpython"))
        out.append(
            "- Profile (appliance, hello, c=16), user space (py-spy samples not inside a "
            "system call): appliance's own Python modules take "
            f"{_pct1(sum(s for _, s in ours))} % ("
            + (", ".join(f"{c.removeprefix('appliance ')} {_pct1(s)} %" for c, s in ours[:5])
               or "none")
            + f"), uvicorn's code {_pct1(uv)} % (the HTTP protocol and ASGI cycle are "
            "appliance's own, engines/h1.py), uvloop/libuv "
            f"{_pct1(comps.get('uvloop/libuv'))} %, llhttp "
            f"{_pct1(comps.get('httptools/llhttp'))} %, the app "
            f"{_pct1(comps.get('app (bench/apps)'))} %; the most own time: " + ", ".join(
                f"`{r['func']}` ({r['where']}) {_pct1(r['share'])} %" for r in top)
            + f". In wall-clock terms libc `write()` holds {_pct1(wall.get('libc write()'))} % "
            "of the busy samples (the send and, at its return, waiting for a CPU after waking "
            "wrk)."
            + (f" On-CPU (perf): kernel {_pct1(kern)} %, interpreter {_pct1(interp)} %."
               if pf.get("dso") else ""))
    cpu = (res.get("monitor") or {}).get("cpu", {})
    tp = cpu.get("throughput") or cpu.get("all")
    mon = res.get("monitor") or {}
    if tp:
        out.append(f"- The machine: {res['machine']['cpus']} vCPUs shared with other tenants "
                   f"(load average median {_f(mon.get('loadavg_median'), '{:.2f}')}, max "
                   f"{_f(mon.get('loadavg_max'), '{:.2f}')}; whole-machine busy "
                   f"{tp['busy_pct']:.0f} % and steal {tp['steal_pct']:.1f} % during the "
                   "throughput scenario). The load generator runs on the same 2 vCPUs as the "
                   f"servers, so {n} workers never get {n} whole cores: compare appliance's "
                   "scaling with the other peers' in the same table (they share the limit).")
    out.append("")
    return out


#: Sections of docs/benchmarks.md written by other tools (scripts/fault-soak): kept as they are.
KEPT_SECTIONS = ("## Fault and soak suite",)


def _kept_tail(text: str) -> str:
    """The hand-kept sections at the end of the current document, from the first of them."""
    starts = [text.find(f"\n{title}\n") for title in KEPT_SECTIONS]
    found = [at for at in starts if at >= 0]
    return text[min(found):] if found else ""


def write(res: dict[str, Any]) -> Path:
    made = plots(res)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tail = _kept_tail(DOC.read_text()) if DOC.exists() else ""
    DOC.write_text(render(res, made).rstrip("\n") + "\n" + tail)
    print(f"wrote {DOC}" + (f" and {len(made)} plot(s) in {PLOTS}" if made else ""))
    return DOC


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else ROOT / "bench" / "results" / "latest.json"
    write(json.loads(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
