"""What balancers are told: the agent-check responder, drain/undrain, the drain delay."""

from __future__ import annotations

import signal
import socket
import time

from harness import Deadline, Load, base_config, cli


def agent_port(m) -> int:
    address = m.started()["agent"]
    return int(address.rsplit(":", 1)[1])


def agent_line(port: int, send: bytes = b"") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if send:
            s.sendall(send)
        data = b""
        while chunk := s.recv(100):
            data += chunk
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    return data.decode().rstrip("\n")


def wait_agent(port: int, want: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = agent_line(port)
        if line == want:
            return
        time.sleep(0.02)
    raise Deadline(f"agent said {line!r}, not {want!r}, within {timeout}s")


def test_agent_check_reports_capacity_and_survives_clients_that_never_read(
    start_master, workdir
):
    m = start_master(base_config(workdir, agent={"address": "127.0.0.1:0"}))
    m.ready()
    port = agent_port(m)
    assert agent_line(port, send=b"be_web/srv1\n") == "ready 100%"
    # Clients that connect and never read nor close hold nothing of the master.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    try:
        assert agent_line(port) == "ready 100%"
        assert m.get("/")[0] == 200
    finally:
        for s in idle:
            s.close()
    m.signal(signal.SIGTERM)
    assert m.wait(30) == 0


def test_agent_address_in_use_is_one_startup_line(start_master, workdir):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        m = start_master(base_config(workdir, agent={"address": f"127.0.0.1:{port}"}))
        assert m.wait(30) == 1
        lines = [line for line in m.logs.text().splitlines() if not line.startswith("{")]
        assert lines == [f"appliance: [agent] address 127.0.0.1:{port}: address already in use"]
    finally:
        holder.close()


def test_drain_and_undrain_change_only_what_balancers_see(start_master, workdir):
    m = start_master(base_config(workdir, agent={"address": "127.0.0.1:0"}))
    m.ready()
    port = agent_port(m)
    cfg = str(workdir / "appliance.toml")
    with Load(m.port, keepalive=2, fresh=2) as load:
        load.wait_requests(50)
        out = cli("drain", "--config", cfg)
        assert out.returncode == 0, out.stderr
        assert "(agent-check: drain)" in out.stdout
        assert agent_line(port) == "drain"  # visible when the command returns: no waiting
        load.wait_requests(100)  # the workers keep serving
        out = cli("drain", "--maint", "--config", cfg)
        assert out.returncode == 0 and "(agent-check: maint)" in out.stdout, out
        assert agent_line(port) == "maint"
        out = cli("undrain", "--config", cfg)
        assert out.returncode == 0 and "(agent-check: ready 100%)" in out.stdout, out
        assert agent_line(port) == "ready 100%"
        load.wait_requests(50)
    assert load.failures == []
    assert [e["mode"] for e in m.logs.find("pool.drained")] == ["drain", "maint"]
    assert m.logs.find("pool.undrained")


def test_sigterm_with_a_drain_delay_reports_drain_while_serving(start_master, workdir):
    cfg = base_config(
        workdir, agent={"address": "127.0.0.1:0"}, workers={"drain_delay_s": 30.0}
    )
    m = start_master(cfg)
    m.ready()
    port = agent_port(m)
    with Load(m.port, keepalive=2, fresh=2) as load:
        load.wait_requests(50)
        mark = m.logs.mark()
        m.signal(signal.SIGTERM)
        m.logs.wait_for("master.drain_delay", since=mark, delay_s=30.0)
        assert agent_line(port) == "drain"
        load.wait_requests(100)  # balancers are told; the pool still serves
        out = cli("drain", "--config", str(workdir / "appliance.toml"))
        assert out.returncode == 1 and "the master is stopping" in out.stderr, out
    assert load.failures == []
    assert not m.logs.find("master.stopping")
    m.signal(signal.SIGTERM)  # a second SIGTERM skips the rest of the delay
    stopping = m.logs.wait_for("master.stopping", since=mark)
    assert stopping["drain_delay"] == "skipped"
    assert m.wait(30) == 0


def test_drain_delay_served_then_the_master_stops(start_master, workdir):
    m = start_master(base_config(workdir, workers={"drain_delay_s": 1.0}))
    m.ready()
    mark = m.logs.mark()
    m.signal(signal.SIGTERM)
    delay = m.logs.wait_for("master.drain_delay", since=mark)
    assert m.get("/")[0] == 200  # still serving during the delay
    stopping = m.logs.wait_for("master.stopping", since=mark)
    assert stopping["drain_delay"] == "served"
    assert m.wait(30) == 0
    assert 0.9 <= _ts(stopping) - _ts(delay) < 5


def _ts(event) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def test_readiness_path_answers_the_pools_state_in_every_worker(start_master, workdir):
    cfg = base_config(
        workdir,
        http={"readiness_path": "/-/ready"},
        workers={"count": 3, "drain_delay_s": 30.0},
    )
    m = start_master(cfg)
    m.ready()
    conf = str(workdir / "appliance.toml")

    def answers(n: int = 12) -> set[tuple[int, object]]:
        return {m.get("/-/ready") for _ in range(n)}  # a new connection each: several workers

    assert answers() == {(200, "ready\n")}
    assert m.get("/-/ready?probe=1") == (200, "ready\n")
    assert m.get("/")[0] == 200  # other paths reach the app
    assert cli("drain", "--config", conf).returncode == 0
    assert answers() == {(503, "drained\n")}  # in every worker, once the command returned
    assert m.get("/")[0] == 200
    assert cli("drain", "--maint", "--config", conf).returncode == 0
    assert answers(3) == {(503, "maintenance\n")}
    assert cli("undrain", "--config", conf).returncode == 0
    assert answers() == {(200, "ready\n")}
    mark = m.logs.mark()
    m.signal(signal.SIGTERM)
    m.logs.wait_for("master.drain_delay", since=mark)
    assert answers() == {(503, "stopping\n")}
    m.signal(signal.SIGTERM)
    assert m.wait(30) == 0


def test_readiness_path_in_front_of_a_wsgi_app(start_master, workdir):
    from harness import APPS

    cfg = base_config(
        workdir,
        app={"target": "wsgiapp:application", "interface": "wsgi", "directory": str(APPS)},
        http={"readiness_path": "/healthz"},
    )
    m = start_master(cfg)
    m.ready()
    assert m.get("/healthz") == (200, "ready\n")
    assert m.get("/")[0] == 200


def test_an_operators_drain_survives_a_restart_until_undrain(start_master, workdir):
    # drain, upgrade (a restart), undrain: the restarted master must still say drain.
    cfg = base_config(
        workdir, agent={"address": "127.0.0.1:0"}, workers={"drain_delay_s": 30.0}
    )
    path = str(workdir / "appliance.toml")
    mark_file = workdir / "control.sock.drained"
    m = start_master(cfg)
    m.ready()
    assert cli("drain", "--maint", "--config", path).returncode == 0
    assert mark_file.read_text() == "maint\n"
    m.signal(signal.SIGTERM)
    stopping = m.logs.wait_for("master.stopping")
    assert "drain_delay" not in stopping  # balancers were told already: no delay
    assert not m.logs.find("master.drain_delay")
    assert m.wait(30) == 0
    again = start_master(cfg)
    kept = again.logs.wait_for("master.drain_kept")
    assert kept["mode"] == "maint"
    again.ready()
    assert agent_line(agent_port(again)) == "maint"
    assert again.get("/")[0] == 200  # drained, not stopped: the pool serves
    out = cli("undrain", "--config", path)
    assert out.returncode == 0 and "ready 100%" in out.stdout, out
    assert not mark_file.exists()
