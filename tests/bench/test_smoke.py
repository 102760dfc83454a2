"""Smoke test of the bench harness: a tiny run, no timing assertions.

Runs from the main test venv: bench/client.py and bench/harness.py are stdlib-only, and the
peer used (appliance) is installed there. Checks that the client counts failures correctly
and that the harness produces a result with zero failures against a healthy server.
"""

from __future__ import annotations

import http.server
import json
import random
import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import client, harness, peers  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        body = b"hi from pid=4242\n"
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(status: int) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = type("H", (_Handler,), {"status": status})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def test_client_counts_refused_connections_as_failures() -> None:
    res = client.run(f"http://127.0.0.1:{_free_port()}/", 2, 0.3, retry_pause_s=0.01)
    assert res.ok == 0
    assert res.failures["refused"] >= 2
    assert res.failed == sum(res.failures.values())


@pytest.mark.parametrize("mode", ["keepalive", "close"])
def test_client_counts_ok_and_pids(mode: str) -> None:
    srv, port = _serve(200)
    try:
        res = client.run(f"http://127.0.0.1:{port}/", 2, 5.0, mode=mode, max_requests=20)
    finally:
        srv.shutdown()
    assert res.ok == 20 and res.failed == 0
    assert dict(res.pids) == {4242: 20}
    assert res.to_dict()["busiest_share"] == 1.0


def test_client_counts_non200_as_failures() -> None:
    srv, port = _serve(503)
    try:
        res = client.run(f"http://127.0.0.1:{port}/", 1, 5.0, max_requests=5,
                         retry_pause_s=0.0)
    finally:
        srv.shutdown()
    assert res.ok == 0 and res.failures["non200"] == 5


def test_tiny_harness_run_against_appliance(tmp_path: Path) -> None:
    why = peers.available("appliance")
    if why:
        pytest.skip(f"appliance peer unavailable: {why}")
    out = tmp_path / "result.json"
    rc = harness.main(["--peers", "appliance", "--scenarios", "throughput,memory",
                       "--reps", "1", "--secs", "0.5", "--concs", "2", "--workers", "1",
                       "--no-wrk", "--no-report", "--no-compile",
                       "--port", str(random.randrange(20000, 29000)),
                       "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["skipped"] == {}, res["skipped"]
    rows = res["throughput"]
    assert {r["app"] for r in rows} == {"hello", "cpu"}
    for r in rows:
        assert r["failed"] == 0, r
        assert r["rps"] > 0, r
        assert r["busiest_share"] == 1.0  # one worker answered everything
        assert r["server_cpu_us"] > 0, r  # the server's processes were busy serving
    assert res["memory"][0]["total_pss_mib"] > 0
    assert [p["role"] for p in res["memory"][0]["processes"]][:1] == ["master"]
    assert res["monitor"]["cpu"]["throughput"]["busy_pct"] >= 0


def test_rotation_spreads_the_order() -> None:
    items = list("abcde")
    orders = [harness.rotated(items, rep, 3) for rep in range(3)]
    assert all(sorted(o) == items for o in orders)
    assert len({o[0] for o in orders}) == 3  # nobody always goes first


def test_ratios_are_computed_within_a_repetition() -> None:
    from bench import report

    def row(peer: str, w: int, rps: list[float]) -> dict:
        return {"peer": peer, "workers": w, "app": "hello", "concurrency": 4,
                "rps": sorted(rps)[len(rps) // 2],
                "reps": [{"rep": i, "rps": x} for i, x in enumerate(rps)]}

    # A noisy machine: rep 1 is slow for everyone; appliance is 0.9x uvicorn in every rep.
    rows = [row("appliance", 2, [900, 450, 1800]), row("uvicorn", 2, [1000, 500, 2000]),
            row("gunicorn-sync", 2, [100, 50, 200]),
            row("appliance", 1, [600, 300, 1200])]
    x = report.ratio_to_best_python(rows, "hello", 2, 4)
    assert x is not None and abs(x["median"] - 0.9) < 1e-9 and x["best"] == "uvicorn"
    sc = report.scaling(rows, "appliance", "hello", 2, 4)
    assert sc is not None and abs(sc["median"] - 1.5) < 1e-9


def test_report_renders_from_a_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import report

    res = {"when": "now", "reps": 1, "secs": 1.0, "workers": 2, "quick": True,
           "versions": {"python": "3"}, "machine": {"cpus": 2, "cpu_model": "x", "kernel": "k",
                                                   "loadavg_at_start": ["0", "0", "0"]},
           "skipped": {}, "throughput": [
               {"peer": "p", "workers": w, "app": a, "concurrency": 4, "rps": 100.0 * w,
                "p99_ms": 1.0, "busiest_share": 0.5, "busiest_conn_share": 0.5, "failed": 0,
                "server_cpu_us": 40.0 / w}
               for w in (1, 2) for a in ("hello", "cpu")],
           "reload": [], "kill": [], "startup": [], "memory": [], "mastercpu": []}
    text = report.render(res, [])
    assert "2.00x" in text and "| p | 2 |" in text
    assert "Server CPU per request, hello app, ASGI" in text and "| p | 2 | 20 |" in text


def test_pin_limits_every_thread_of_a_process_and_undoes() -> None:
    import os
    import threading

    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    first = min(cpus)
    halt = threading.Event()
    thread = threading.Thread(target=halt.wait)
    thread.start()
    try:
        harness.pin([os.getpid()], {first})
        tids = [int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")]
        assert len(tids) >= 2
        assert all(os.sched_getaffinity(t) == {first} for t in tids)
        harness.pin([os.getpid()], cpus)
        assert all(os.sched_getaffinity(t) == cpus for t in tids)
        harness.pin([2**22 + 1], cpus)  # no such process: skipped
    finally:
        halt.set()
        thread.join()
        os.sched_setaffinity(0, cpus)


def test_report_renders_the_placement_section() -> None:
    from bench import report

    def row(peer: str, where: str, rps: float) -> dict:
        return {"peer": peer, "workers": 1, "app": "hello", "placement": where,
                "concurrency": 1, "rps": rps, "p99_ms": 1.0, "server_cpu_us": 1e6 / rps,
                "failed": 0}

    res = {"placement": [row("appliance", "same", 60000), row("appliance", "apart", 12000),
                         row("appliance", "free", 13000), row("uvicorn", "same", 40000),
                         row("uvicorn", "apart", 12000), row("uvicorn", "free", 11000)]}
    text = "\n".join(report._placement_section(res))
    assert "| appliance | 1 | 60000 (17) | 12000 (83) | 13000 (77) |" in text
    assert "5.0x as many" in text
    assert "same CPU c=1: 1.50x, different CPUs c=1: 1.00x, unpinned c=1: 1.18x" in text
    assert report._placement_section({"placement": []}) == []
