"""Rolling reload under load: zero failed requests, aborts that keep the old generation serving."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import json

from harness import APPS, Load, Master, base_config, cli, write_config


def reload_cli(workdir: Path, cfg: Path) -> subprocess.CompletedProcess[str]:
    return cli("reload", "--config", str(cfg))


def status_json(cfg: Path) -> dict:
    out = cli("status", "--json", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_ten_reloads_under_load_lose_nothing_and_show_every_generation(start_master, workdir):
    m = start_master(base_config(workdir, workers={"count": 2}))
    m.ready()
    cfg = workdir / "appliance.toml"
    with Load(m.port, keepalive=3, fresh=3) as load:
        load.wait_requests(300)
        for n in range(2, 12):
            mark = m.logs.mark()
            if n % 2:
                m.signal(signal.SIGHUP)
                m.logs.wait_for("reload.finished", since=mark, generation=n)
            else:
                out = reload_cli(workdir, cfg)
                assert out.returncode == 0, out.stderr
                assert f"(generation {n})" in out.stdout
            load.wait_requests(200)
    assert load.failures == []
    generations = [body["generation"] for body in load.seen]
    assert sorted(set(generations)) == list(range(1, 12))
    # A generation, once replaced, does not come back: the first answer from generation n+1
    # comes after the first answer from generation n.
    firsts = [generations.index(g) for g in range(1, 12)]
    assert firsts == sorted(firsts)


def test_reload_with_config_error_keeps_old_generation(start_master, workdir, notify):
    from harness import clean_env as env_for

    cfg = base_config(workdir)
    path = write_config(workdir, cfg)
    m = Master(path, env=env_for(NOTIFY_SOCKET=notify.path))
    try:
        m.ready()
        (workdir / "conf.d").mkdir()
        (workdir / "conf.d" / "90-bad.toml").write_text("[workers]\ncount = -3\n")
        with Load(m.port) as load:
            load.wait_requests(100)
            mark = notify.mark()
            out = reload_cli(workdir, path)
            load.wait_requests(100)
        assert out.returncode == 1
        assert "90-bad.toml: workers.count" in out.stderr and "(got -3)" in out.stderr
        assert load.failures == []
        assert {b["generation"] for b in load.seen} == {1}
        status = notify.wait_for(lambda t: "reload failed" in t, since=mark)
        assert "90-bad.toml: workers.count" in status
        sequence = [t.split("\n")[0].split("=")[0] for t in notify.texts()[mark:]]
        assert sequence[:3] == ["RELOADING", "STATUS", "READY"], sequence
        assert m.logs.find("reload.failed")
    finally:
        m.kill_group()


def test_reload_with_app_that_now_raises_aborts_and_old_serve(start_master, workdir):
    appdir = workdir / "app"
    appdir.mkdir()
    shutil.copy(APPS / "testapp.py", appdir / "myapp.py")
    cfg = write_config(
        workdir, base_config(workdir, app={"target": "myapp:app", "directory": str(appdir)})
    )
    m = start_master(base_config(workdir, app={"target": "myapp:app", "directory": str(appdir)}))
    m.ready()
    (appdir / "myapp.py").write_text("raise ImportError('new code is broken')\n")
    with Load(m.port) as load:
        load.wait_requests(100)
        out = reload_cli(workdir, cfg)  # an unchanged config still rolls the pool
        load.wait_requests(100)
    assert out.returncode == 1
    assert "aborted" in out.stderr and "new code is broken" in out.stderr
    assert load.failures == []
    assert {b["generation"] for b in load.seen} == {1}
    assert {b["version"] for b in load.seen} == {"v1"}
    last = status_json(cfg)["reload"]["last"]
    assert last["ok"] is False and "new code is broken" in last["error"]


def test_reload_picks_up_new_code_without_preload(start_master, workdir):
    appdir = workdir / "app"
    appdir.mkdir()
    shutil.copy(APPS / "testapp.py", appdir / "myapp2.py")
    cfg_dict = base_config(workdir, app={"target": "myapp2:app", "directory": str(appdir)})
    m = start_master(cfg_dict)
    m.ready()
    assert m.get("/")[1]["version"] == "v1"
    text = (appdir / "myapp2.py").read_text().replace('VERSION = "v1"', 'VERSION = "v2"')
    (appdir / "myapp2.py").write_text(text)
    (workdir / "conf.d").mkdir()
    (workdir / "conf.d" / "10.toml").write_text("[http]\nkeepalive_timeout_s = 4\n")
    out = reload_cli(workdir, workdir / "appliance.toml")
    assert out.returncode == 0, out.stderr
    assert {m.get("/")[1]["version"] for _ in range(6)} == {"v2"}


def test_reload_changes_pool_size_up_and_down(start_master, workdir):
    m = start_master(base_config(workdir, workers={"count": 2}))
    m.ready()
    cfg = workdir / "appliance.toml"
    for count in (3, 1):
        write_config(workdir, base_config(workdir, workers={"count": count}))
        with Load(m.port) as load:
            out = reload_cli(workdir, cfg)
            load.wait_requests(50)
        assert out.returncode == 0, out.stderr
        assert load.failures == []
        assert f"with {count} workers" in out.stdout
        doc = status_json(cfg)
        assert doc["target"] == count and doc["ready"] == count


def test_log_level_only_reload_replaces_no_worker(start_master, workdir):
    m = start_master()
    m.ready()
    before = m.worker_pids()
    mark = m.logs.mark()
    cfg = base_config(workdir)
    cfg["log"]["level"] = "warning"
    write_config(workdir, cfg)
    out = reload_cli(workdir, workdir / "appliance.toml")
    assert out.returncode == 0, out.stderr
    assert "no worker replaced" in out.stdout
    assert not m.logs.find("worker.spawned", since=mark)
    assert m.worker_pids() == before


def test_listen_change_needs_restart_and_changes_nothing(start_master, workdir):
    m = start_master()
    m.ready()
    cfg = base_config(workdir)
    cfg["listen"] = [{"name": "http", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}]
    write_config(workdir, cfg)
    out = reload_cli(workdir, workdir / "appliance.toml")
    assert out.returncode == 1
    assert "listen cannot change on reload" in out.stderr
    assert m.get("/")[0] == 200


def test_ttin_ttou_and_scale(start_master, workdir):
    m = start_master(base_config(workdir, workers={"count": 1}))
    m.ready()
    mark = m.logs.mark()
    m.signal(signal.SIGTTIN)
    m.logs.wait_for("worker.ready", since=mark, worker_id=1)
    mark = m.logs.mark()
    m.signal(signal.SIGTTOU)
    m.logs.wait_for("worker.exited", since=mark, worker_id=1, reason="scaled down")
    out = cli("scale", "3", "--config", str(workdir / "appliance.toml"))
    assert out.returncode == 0, out.stderr
    m.logs.wait_for("worker.ready", since=mark, worker_id=2)


def test_max_requests_recycles_without_failures(start_master, workdir):
    m = start_master(
        base_config(
            workdir,
            workers={"count": 2, "max_requests": 300, "heartbeat_interval_s": 0.1},
        )
    )
    m.ready()
    with Load(m.port, keepalive=2, fresh=2) as load:
        m.logs.wait_for("worker.recycling", count=3, timeout=60)
        m.logs.wait_for("worker.exited", count=3, reason="recycled", timeout=60)
        load.wait_requests(100)
    assert load.failures == []


def test_idle_keepalive_connection_on_a_draining_worker_is_answered_then_closed(
    start_master, workdir
):
    """The race peers lose requests to: a client reuses an idle keep-alive connection just as
    its worker drains. We answer that request (with ``Connection: close``) instead of closing
    the connection under it."""
    import http.client
    import json

    m = start_master(base_config(workdir, workers={"count": 1}, http={"keepalive_timeout_s": 60}))
    m.ready()
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=30)
    conn.request("GET", "/")
    first = conn.getresponse()
    old_pid = json.loads(first.read())["pid"]
    assert first.getheader("connection") != "close"
    mark = m.logs.mark()
    m.signal(signal.SIGHUP)
    m.logs.wait_for("reload.finished", since=mark, generation=2)
    m.logs.wait_for("worker.draining", since=mark, pid=old_pid)
    # The connection is idle on the draining worker; reuse it.
    conn.request("GET", "/")
    second = conn.getresponse()
    body = json.loads(second.read())
    assert second.status == 200 and body["pid"] == old_pid and body["generation"] == 1
    assert second.getheader("connection") == "close"
    m.logs.wait_for("worker.exited", since=mark, pid=old_pid, reason="replaced")
    conn.close()
    assert m.get("/")[1]["generation"] == 2


def test_second_sighup_during_a_reload_is_coalesced(start_master, workdir):
    m = start_master(base_config(workdir, workers={"count": 2}))
    m.ready()
    mark = m.logs.mark()
    m.signal(signal.SIGHUP)
    m.logs.wait_for("reload.started", since=mark, generation=2)
    m.signal(signal.SIGHUP)
    finished = m.logs.wait_for("reload.finished", since=mark)
    assert finished["generation"] == 3
    assert m.logs.find("reload.coalesced", since=mark)
    assert {m.get("/")[1]["generation"] for _ in range(4)} == {3}


def test_sigterm_during_a_reload_stops_cleanly(start_master, workdir):
    import subprocess as sp
    import threading

    appdir = workdir / "app"
    appdir.mkdir()
    marker = workdir / "slow-boot"
    (appdir / "slowboot.py").write_text(
        "import os, sys, time\n"
        f"if os.path.exists({str(marker)!r}):\n"
        "    time.sleep(30)  # the new generation boots slowly: the reload stays in flight\n"
        f"sys.path.insert(0, {str(APPS)!r})\n"
        "from testapp import app\n"
    )
    m = start_master(base_config(workdir, app={"target": "slowboot:app", "directory": str(appdir)}))
    m.ready()
    marker.write_text("")
    result: dict[str, sp.CompletedProcess[str]] = {}
    mark = m.logs.mark()
    t = threading.Thread(
        target=lambda: result.update(r=reload_cli(workdir, workdir / "appliance.toml"))
    )
    t.start()
    m.logs.wait_for("worker.spawned", since=mark, generation=2)
    m.signal(signal.SIGTERM)
    t.join(60)
    assert m.wait() == 0
    out = result["r"]
    assert out.returncode == 1
    assert "interrupted: the master is stopping" in out.stderr
    assert m.logs.find("master.stopped")


def test_after_an_aborted_reload_the_next_plan_diffs_against_what_runs(start_master, workdir):
    """An aborted reload reverts to the old config; the next reload must not treat the aborted
    config as the running one (here: keepalive_timeout_s would silently never apply)."""
    appdir = workdir / "app"
    appdir.mkdir()
    good = (APPS / "testapp.py").read_text()
    (appdir / "app3.py").write_text(good)
    cfg = base_config(workdir, app={"target": "app3:app", "directory": str(appdir)})
    m = start_master(cfg)
    m.ready()
    path = workdir / "appliance.toml"
    (appdir / "app3.py").write_text("raise RuntimeError('broken for a moment')\n")
    cfg["http"] = {"keepalive_timeout_s": 7}
    write_config(workdir, cfg)
    assert reload_cli(workdir, path).returncode == 1
    (appdir / "app3.py").write_text(good)
    cfg["log"]["level"] = "warning"
    write_config(workdir, cfg)
    mark = m.logs.mark()
    out = reload_cli(workdir, path)
    assert out.returncode == 0, out.stderr
    assert "no worker replaced" not in out.stdout
    planned = m.logs.find("reload.planned", since=mark)[0]
    assert "http.keepalive_timeout_s" in planned["rolling"]
