"""The core, end to end: the real master serving real requests, signals and crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import APPS, Load, Master, base_config, clean_env, cli, http_get, write_config


def test_default_serve_answers_with_pid_generation_digest_and_healthz(start_master, workdir):
    m = start_master()
    m.ready()
    status, body = m.get("/")
    assert status == 200
    assert body["server"] == "appliance"
    assert body["pid"] in m.worker_pids()
    assert body["generation"] == 1
    assert body["config_digest"] == m.logs.find("master.starting")[0]["config_digest"]
    assert m.get("/healthz") == (200, "ok\n")
    assert m.get("/nope")[0] == 404


def test_no_config_file_runs_on_builtin_defaults(workdir):
    """With no file at the default path, defaults apply (here: the built-in app, 127.0.0.1:8000)."""
    m = Master(workdir / "absent.toml", args=["check"])
    assert m.wait() == 1  # explicit and missing: an error
    # Not explicit: APPLIANCE_CONFIG unset and the default path absent -> `config` shows defaults.
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "config"],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'target = "appliance.apps.hello:app"' in out.stdout
    assert 'address = "127.0.0.1:8000"' in out.stdout


def test_auto_pool_size_matches_usable_cpus(start_master, workdir):
    m = start_master(base_config(workdir, workers={"count": "auto"}))
    started = m.started()
    assert started["workers"] == min(len(os.sched_getaffinity(0)), 64)
    m.ready()


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_taskset_one_cpu_gives_one_worker(start_master, workdir):
    m = start_master(
        base_config(workdir, workers={"count": "auto", "reserve_cores": 0}), prefix=["taskset", "-c", "0"]
    )
    assert m.started()["workers"] == 1
    m.ready()
    assert len(m.worker_pids()) == 1


def test_configured_asgi_app(start_master, workdir):
    m = start_master(
        base_config(workdir, app={"target": "testapp:app", "directory": str(APPS)})
    )
    m.ready()
    status, body = m.get("/hello")
    assert status == 200 and body["path"] == "/hello" and body["generation"] == 1
    assert body["import_pid"] == body["pid"], "without preload the worker imports the app"


def test_configured_wsgi_app(start_master, workdir):
    m = start_master(
        base_config(
            workdir,
            app={"target": "wsgiapp:application", "interface": "wsgi", "directory": str(APPS)},
        )
    )
    m.ready()
    status, body = m.get("/x")
    assert status == 200 and body == {"pid": body["pid"], "wsgi": True, "path": "/x"}


def test_preload_imports_once_per_generation_in_its_template_never_in_the_master(
    start_master, workdir
):
    m = start_master(
        base_config(
            workdir,
            app={"target": "testapp:app", "directory": str(APPS), "preload": True},
            workers={"count": 2},
        )
    )
    m.ready()
    (template,) = m.logs.find("template.ready")
    seen = {}
    while len(seen) < 2:
        _, body = http_get(m.port, "/")
        seen[body["pid"]] = body["import_pid"]
    assert set(seen.values()) == {template["pid"]}
    assert m.pid not in seen.values() and template["pid"] not in seen
    # The workers are the master's children (re-parented from the template's fork).
    for pid in seen:
        assert _ppid(pid) == m.pid


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_kill_9_of_a_worker_under_load_only_its_requests_fail(start_master, workdir):
    m = start_master(base_config(workdir, app={"target": "testapp:app", "directory": str(APPS)}))
    m.ready()
    with Load(m.port, keepalive=2, fresh=2) as load:
        load.wait_requests(200)
        victim = m.worker_pids()[0]
        mark = m.logs.mark()
        os.kill(victim, signal.SIGKILL)
        exited = m.logs.wait_for("worker.exited", since=mark, pid=victim)
        assert exited["signal"] == "SIGKILL" and exited["reason"] == "crashed"
        assert exited["respawn_in_s"] == 0
        new = m.logs.wait_for("worker.ready", since=mark, worker_id=exited["worker_id"])
        load.wait_requests(200)
    assert new["pid"] != victim
    # Only requests that were on the killed worker's connections may fail: at most one per
    # keep-alive client plus the fresh-connection requests in flight at the kill.
    assert len(load.failures) <= 4, load.failures
    pids = {b["pid"] for b in load.seen[-100:]}
    assert new["pid"] in pids or len(pids) >= 1


def test_crash_looping_app_backs_off_and_says_why(start_master, workdir):
    cfg = base_config(
        workdir,
        app={"target": "broken:app", "directory": str(APPS)},
        workers={
            "count": 1,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.4,
            "start_attempts": 100,
        },
    )
    m = start_master(cfg)
    sixth = m.logs.wait_for("worker.exited", count=6)
    exits = m.logs.find("worker.exited")[:6]
    delays = [e["respawn_in_s"] for e in exits]
    assert delays[:6] == [0.0, 0.05, 0.1, 0.2, 0.4, 0.4]
    assert all(e["exit_code"] == 3 for e in exits)
    assert "this app is broken on purpose" in sixth["reason"]
    assert m.logs.find("worker.boot_failed")
    assert not m.logs.find("master.ready")
    # Meanwhile the operator sees why in `appliance status`.
    out = cli("status", "--json", "--config", str(workdir / "appliance.toml"))
    assert out.returncode == 0, out.stderr
    assert "broken on purpose" in json.loads(out.stdout)["last_boot_error"]
    m.signal(signal.SIGTERM)
    assert m.wait() == 0


def test_an_app_that_never_boots_makes_the_master_exit_3_with_the_cause(
    start_master, workdir, notify
):
    """gunicorn exits 3 at once; we retry workers.start_attempts times per slot, then exit 3 so
    that systemd's Restart= and start limit act (instead of waiting out TimeoutStartSec=)."""
    cfg = base_config(
        workdir,
        app={"target": "broken:app", "directory": str(APPS)},
        workers={"count": 2, "start_attempts": 3, "backoff_initial_s": 0.01},
    )
    m = start_master(cfg, env=clean_env(NOTIFY_SOCKET=notify.path))
    assert m.wait() == 3
    (failed,) = m.logs.find("master.start_failed")
    assert "this app is broken on purpose" in failed["error"] and failed["attempts"] == 3
    assert len(m.logs.find("worker.exited")) >= 6
    notify.wait_for(lambda text: text.startswith("STATUS=failed to start: "))
    assert "READY=1" not in notify.texts()


def test_sigterm_lets_a_slow_request_finish_then_exits_0(start_master, workdir):
    import threading

    m = start_master(base_config(workdir, app={"target": "testapp:app", "directory": str(APPS)}))
    m.ready()
    result: dict[str, object] = {}

    def slow() -> None:
        result["r"] = http_get(m.port, "/sleep?s=2", timeout=30)

    t = threading.Thread(target=slow)
    mark = m.logs.mark()
    t.start()
    # Wait until the request is in flight on a worker (a heartbeat would take a second; the
    # access log is off, so poll the status over the control socket instead).
    _wait_in_flight(workdir, m)
    m.signal(signal.SIGTERM)
    m.logs.wait_for("master.stopping", since=mark)
    t.join(30)
    assert result["r"][0] == 200
    assert m.wait() == 0
    assert m.logs.find("master.stopped")


def _wait_in_flight(workdir: Path, m: Master) -> None:
    import json
    import socket
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(workdir / "control.sock"))
            s.sendall(b'{"cmd":"status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                data += s.recv(65536)
        status = json.loads(data)["status"]
        if any(w["in_flight"] for w in status["workers"]):
            return
        time.sleep(0.05)  # polling the status document, with a deadline
    raise AssertionError("request never showed up in flight")


def test_hung_worker_stack_dumped_killed_and_replaced(start_master, workdir):
    cfg = base_config(
        workdir,
        app={"target": "testapp:app", "directory": str(APPS)},
        workers={"count": 1, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.0},
    )
    m = start_master(cfg)
    ready = m.ready()
    import threading

    threading.Thread(target=lambda: _quiet_get(m.port, "/block?s=30"), daemon=True).start()
    hung = m.logs.wait_for("worker.hung", timeout=30)
    assert hung["silent_s"] >= 1.0
    exited = m.logs.wait_for("worker.exited", pid=hung["pid"])
    assert exited["signal"] == "SIGKILL" and exited["reason"] == "heartbeat timeout"
    m.logs.wait_for("worker.ready", count=2)
    assert "in app" in m.logs.text() or "testapp.py" in m.logs.text()  # faulthandler's dump
    assert m.get("/")[0] == 200
    del ready


def _quiet_get(port: int, path: str) -> None:
    try:
        http_get(port, path, timeout=60)
    except Exception:  # noqa: BLE001 - the worker is killed under this request on purpose
        pass


# --- bad input: one clear line, non-zero exit, nothing forked ----------------------------------


def _serve_fails(workdir: Path, cfg_text: str | None, *, path: Path | None = None) -> str:
    if cfg_text is not None:
        path = workdir / "appliance.toml"
        path.write_text(cfg_text)
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(path)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    assert "worker.spawned" not in out.stderr
    return out.stderr


def test_bad_toml(workdir):
    err = _serve_fails(workdir, "[workers\ncount = 2\n")
    assert "appliance.toml: line 1" in err


def test_wrong_type_and_negative_count(workdir):
    err = _serve_fails(workdir, '[workers]\ncount = "sixteen"\nreserve_cores = -1\n')
    assert 'workers.count: ' in err and '(got "sixteen")' in err
    assert "workers.reserve_cores" in err and "(got -1)" in err


def test_unknown_key_suggests(workdir):
    err = _serve_fails(workdir, "[workers]\ncuont = 2\n")
    assert 'did you mean "workers.count"' in err


def test_unimportable_app(workdir):
    err = _serve_fails(workdir, '[app]\ntarget = "no_such_module_xyz:app"\n')
    assert "no module named \"no_such_module_xyz\"" in err
    assert len(err.strip().splitlines()) == 1


def test_port_in_use(workdir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = f'[[listen]]\nname = "http"\naddress = "127.0.0.1:{port}"\n'
        err = _serve_fails(workdir, cfg + f'[control]\npath = "{workdir}/c.sock"\n')
    assert "address already in use" in err and str(port) in err


def test_missing_explicit_config(workdir):
    err = _serve_fails(workdir, None, path=workdir / "missing.toml")
    assert err.strip() == f"{workdir}/missing.toml: file not found"


def test_check_and_config_origin(workdir):
    main = write_config(workdir, {"workers": {"count": 3}})
    (workdir / "conf.d").mkdir()
    (workdir / "conf.d" / "50-site.toml").write_text("[workers]\ncount = 2\n")
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "appliance", *a, "--config", str(main)],
        env=clean_env(), capture_output=True, text=True,
    )
    ok = run("check")
    assert ok.returncode == 0 and "configuration ok" in ok.stdout
    origin = run("config", "--origin")
    line = [ln for ln in origin.stdout.splitlines() if ln.startswith("count")][0]
    assert "50-site.toml" in line and "2" in line
    (workdir / "conf.d" / "60-bad.toml").write_text("[workers]\ncount = 0\n")
    bad = run("check")
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"{workdir}/conf.d/60-bad.toml: workers.count: ")
    assert "(got 0)" in bad.stderr


def test_workers_exit_when_the_master_dies(start_master, workdir):
    import time

    m = start_master()
    m.ready()
    workers = m.worker_pids()
    os.kill(m.pid, signal.SIGKILL)
    m.wait()
    deadline = time.monotonic() + 20
    alive = set(workers)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
            except FileNotFoundError:
                state = "gone"
            if state in ("Z", "gone", "X"):
                alive.discard(pid)
        time.sleep(0.05)  # polling /proc with a deadline: there is no event to wait on
    assert not alive, f"orphaned workers still running: {alive}"
