"""Living under systemd: the real master under the real ``systemd-socket-activate``.

systemd-socket-activate listens, then execs the master (same pid) on the first connection with
LISTEN_FDS/LISTEN_FDNAMES set; the test binds the NOTIFY_SOCKET and reads every datagram.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from harness import APPS, Deadline, Master, NotifySocket, base_config, clean_env, http_get, write_config

SSA = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(SSA is None, reason="systemd-socket-activate not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def activate(
    workdir: Path,
    notify: NotifySocket | None,
    cfg: dict,
    *,
    fdname: str = "http",
    extra_env: dict[str, str] | None = None,
) -> tuple[Master, int]:
    """Start the master under systemd-socket-activate; retry if the chosen port was taken."""
    cfg = dict(cfg)
    path = write_config(workdir, cfg)
    for _ in range(5):
        port = _free_port()
        prefix = [SSA, f"--fdname={fdname}", "-l", f"127.0.0.1:{port}"]
        if notify is not None:
            prefix += ["-E", f"NOTIFY_SOCKET={notify.path}"]
        for key, value in (extra_env or {}).items():
            prefix += ["-E", f"{key}={value}"]
        m = Master(path, prefix=prefix)
        try:
            _wait_line(m, "Listening on", 10)
            return m, port
        except Deadline:
            m.kill_group()
    raise AssertionError("could not start systemd-socket-activate")


def _wait_line(m: Master, text: str, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while text not in m.logs.text():
        if m.proc.poll() is not None or time.monotonic() > deadline:
            raise Deadline(f"no line with {text!r}: {m.logs.text()}")
        with m.logs._cond:  # noqa: SLF001 - wait for the next line, with a deadline
            m.logs._cond.wait(0.2)  # noqa: SLF001


@pytest.fixture
def activated(workdir, notify):
    started: list[Master] = []

    def start(cfg=None, **kw):
        m, port = activate(workdir, notify, cfg or _cfg(workdir), **kw)
        started.append(m)
        return m, port

    yield start
    for m in started:
        m.kill_group()


def _cfg(workdir: Path, **sections) -> dict:
    cfg = base_config(workdir, **sections)
    cfg["listen"] = [{"name": "http", "address": "127.0.0.1:8000"}]  # documentation only
    return cfg


def test_ready_after_all_workers_status_and_stopping(activated, notify):
    m, port = activated()
    assert not m.logs.find("master.started"), "nothing runs before the first connection"
    assert http_get(port, "/")[0] == 200  # this connection starts the master
    notify.wait_for(lambda t: t == "READY=1")
    texts = notify.texts()
    ready_at = texts.index("READY=1")
    statuses = [t for t in texts[:ready_at] if t.startswith("STATUS=")]
    assert statuses[-1] == "STATUS=2/2 workers ready, generation 1"
    assert len(m.logs.find("worker.ready")) == 2
    assert f"MAINPID={m.pid}" in texts
    started = m.logs.find("master.started")[0]
    assert started["listeners"] == [
        {"name": "http", "address": f"127.0.0.1:{port}", "from": "systemd"}
    ]
    mark = notify.mark()
    m.signal(signal.SIGTERM)
    notify.wait_for(lambda t: t == "STOPPING=1", since=mark)
    assert m.wait() == 0


def test_workers_do_not_inherit_systemd_variables(activated, notify, workdir):
    cfg = _cfg(workdir, app={"target": "testapp:app", "directory": str(APPS)})
    m, port = activated(cfg, extra_env={"WATCHDOG_USEC": "5000000"})
    http_get(port, "/")
    m.ready()
    for _ in range(4):
        names = set(http_get(port, "/env")[1]["env"])
        assert "PATH" in names
        assert not names & {
            "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC"
        }


def test_watchdog_pings_while_healthy_and_stops_when_all_workers_hang(activated, notify, workdir):
    cfg = _cfg(
        workdir,
        app={"target": "testapp:app", "directory": str(APPS)},
        workers={"count": 1, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.5},
    )
    m, port = activated(cfg, extra_env={"WATCHDOG_USEC": "1000000"})
    http_get(port, "/")
    notify.wait_for(lambda t: t == "READY=1")
    mark = notify.mark()
    for i in range(4):
        _wait_nth(notify, "WATCHDOG=1", i + 1, since=mark)
    pings = [ts for ts, t in notify.messages[mark:] if t == "WATCHDOG=1"]
    # The protocol: systemd kills the service if a ping is later than WATCHDOG_USEC (1 s).
    assert all(b - a < 1.0 for a, b in zip(pings, pings[1:])), pings
    # Wedge the only worker's event loop: heartbeats stop, then the watchdog must go quiet.
    threading.Thread(target=lambda: _quiet(port, "/block?s=20"), daemon=True).start()
    hung = m.logs.wait_for("worker.hung", timeout=30)
    after_hang = notify.mark()
    m.logs.wait_for("worker.ready", count=2)  # killed and replaced
    assert "WATCHDOG=1" not in notify.texts()[after_hang:] or _pinged_only_after_recovery(
        notify, after_hang
    )
    del hung


def _pinged_only_after_recovery(notify: NotifySocket, since: int) -> bool:
    # A replacement that became ready resumes the pings; before it, none.
    texts = notify.texts()[since:]
    first_ping = texts.index("WATCHDOG=1")
    return any(t.startswith("STATUS=1/1") for t in texts[:first_ping])


def test_watchdog_silent_when_pool_is_dead(activated, notify, workdir):
    appdir = workdir / "app"
    appdir.mkdir()
    (appdir / "flaky.py").write_text(
        "import os, sys\n"
        f"if os.path.exists({str(workdir / 'broken')!r}):\n"
        "    raise RuntimeError('dead on purpose')\n"
        f"sys.path.insert(0, {str(APPS)!r})\n"
        "from testapp import app\n"
    )
    cfg = _cfg(
        workdir,
        app={"target": "flaky:app", "directory": str(appdir)},
        workers={"count": 1, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.5,
                 "backoff_initial_s": 0.5, "backoff_max_s": 2.0},
    )
    m, port = activated(cfg, extra_env={"WATCHDOG_USEC": "1000000"})
    assert http_get(port, "/")[0] == 200
    notify.wait_for(lambda t: t == "READY=1")
    _wait_nth(notify, "WATCHDOG=1", 1, since=0)
    (workdir / "broken").write_text("")
    mark_log = m.logs.mark()
    for pid in m.worker_pids():
        os.kill(pid, signal.SIGKILL)
    # The first replacement fails at import; from then on nothing in the pool is healthy.
    m.logs.wait_for("worker.exited", since=mark_log, count=2, timeout=30)
    quiet_from = notify.mark()
    m.logs.wait_for("worker.exited", since=mark_log, count=4, timeout=30)
    assert "WATCHDOG=1" not in notify.texts()[quiet_from:]
    assert any("dead on purpose" in e.get("reason", "") for e in m.logs.find("worker.exited"))


def _try_get(port: int) -> bool:
    try:
        return http_get(port, "/")[0] == 200
    except OSError:
        return False


def _wait_nth(notify: NotifySocket, text: str, n: int, since: int) -> None:
    notify.wait_for(lambda _t: notify.texts()[since:].count(text) >= n, since=since, timeout=10)


def _quiet(port: int, path: str) -> None:
    try:
        http_get(port, path, timeout=60)
    except Exception:  # noqa: BLE001 - the worker is killed under this request on purpose
        pass


def test_name_mismatch_is_a_clear_startup_error(workdir, notify):
    cfg = _cfg(workdir)
    cfg["listen"] = [{"name": "api", "address": "127.0.0.1:8000"}]
    m, port = activate(workdir, notify, cfg, fdname="http")
    try:
        with pytest.raises(OSError):
            http_get(port, "/", timeout=5)
        assert m.wait(30) == 1
        err = m.logs.text()
        assert 'config [[listen]] name "api" was not passed by systemd (LISTEN_FDNAMES=http)' in err
        assert 'fd 3 named "http" is not claimed by any [[listen]] entry' in err
        assert "Traceback" not in err
    finally:
        m.kill_group()


def test_control_socket_status_reload_permissions_and_bad_requests(start_master, workdir):
    m = start_master()
    m.ready()
    path = workdir / "control.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def ask(raw: bytes, answers: int) -> list[dict]:
        """Send raw request bytes and read ``answers`` final replies (plus progress lines)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(path))
            s.sendall(raw)
            replies: list[dict] = []
            buf = b""
            while sum(1 for r in replies if "ok" in r) < answers:
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {replies}"
                buf += chunk
                *done, buf = buf.split(b"\n")
                replies += [json.loads(line) for line in done]
        return replies

    bad = ask(b"this is not json\n{\"cmd\": \"explode\"}\n{\"cmd\": \"status\"}\n", 3)
    assert bad[0]["ok"] is False and bad[1]["ok"] is False and "explode" in bad[1]["error"]
    assert bad[2]["ok"] is True and bad[2]["status"]["phase"] == "running"
    status = bad[2]["status"]
    assert status["pid"] == m.pid and status["target"] == 2
    assert {w["state"] for w in status["workers"]} == {"ready"}
    assert all(w["rss_mb"] > 0 for w in status["workers"])
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--config", str(workdir / "appliance.toml")],
        env=clean_env(), capture_output=True, text=True, check=True,
    )
    assert "running" in out.stdout and str(m.worker_pids()[0]) in out.stdout
    lines = ask(b'{"cmd": "reload"}\n', 1)
    assert [list(x) for x in lines[:-1]] == [["progress"]] * (len(lines) - 1)
    assert lines[-1]["ok"] is True and lines[-1]["reload"]["generation"] == 2
    assert m.get("/")[1]["generation"] == 2
