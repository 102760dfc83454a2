"""The HAProxy agent-check reply and the readiness word, from master states (no processes)."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from appliance.agent import AgentServer, encode_reply
from appliance.config.schema import AgentSettings, Settings, TcpAddress
from appliance.engines.balance import LoadBoard, Readiness
from appliance.master import policy, views
from appliance.master.events import (
    DrainOutcome,
    DrainRequested,
    Exit,
    Kill,
    Log,
    ReloadOutcome,
    ReloadRequested,
    ScaleOutcome,
    ScaleRequested,
    Spawn,
    StopRequested,
    Tick,
    WorkerReady,
)
from appliance.master.state import Phase
from appliance.sockets import ListenError

from test_policy import Sim, gen, kills  # type: ignore[import-not-found]


def test_starting_pool_reports_its_ready_share_and_is_not_ready_for_http() -> None:
    sim = Sim(gen(target=4))
    assert views.agent_reply(sim.state) == "ready 0%"
    assert views.readiness(sim.state) is Readiness.STARTING
    first, second, *_ = sim.workers()
    sim.step(WorkerReady(first.key))
    sim.step(WorkerReady(second.key))
    assert views.agent_reply(sim.state) == "ready 50%"
    assert views.readiness(sim.state) is Readiness.STARTING


def test_full_pool_is_ready_100_and_a_lost_worker_lowers_the_weight() -> None:
    sim = Sim(gen(target=3))
    sim.ready_all()
    assert views.agent_reply(sim.state) == "ready 100%"
    assert views.readiness(sim.state) is Readiness.READY
    victim = sim.workers()[0]
    sim.exit_of(victim.key, None, "SIGKILL")  # its replacement is booting
    assert views.agent_reply(sim.state) == "ready 66%"


def test_surge_during_a_reload_is_capped_at_100() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    extra = replace(sim.workers()[0], key=99, slot=0)
    state = replace(sim.state, workers=(*sim.state.workers, extra))
    assert views.serving_percent(state) == 100


def test_one_ready_worker_of_a_large_pool_still_counts() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    assert views.serving_percent(replace(sim.state, target=1000)) == 1


def test_operator_drain_and_maint_and_stopping() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    drained = replace(sim.state, drained=True)
    assert views.agent_reply(drained) == "drain"
    assert views.readiness(drained) is Readiness.DRAINED
    maint = replace(sim.state, drained=True, maint=True)
    assert views.agent_reply(maint) == "maint"
    assert views.readiness(maint) is Readiness.MAINT
    sim.step(StopRequested("SIGTERM"))
    assert views.agent_reply(sim.state) == "drain"
    assert views.readiness(sim.state) is Readiness.STOPPING
    # maintenance outranks stopping: HAProxy keeps the host out entirely
    assert views.agent_reply(replace(sim.state, maint=True)) == "maint"


def test_status_document_shows_what_balancers_are_told() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    doc = views.snapshot(replace(sim.state, drained=True), sim.now)
    assert doc["balancer"] == {"agent": "drain", "readiness": "drained", "drained": "drain"}


def test_encode_reply_is_one_ascii_line() -> None:
    assert encode_reply("ready 100%") == b"ready 100%\n"


# --- the board's readiness word -----------------------------------------------------------------


def test_board_readiness_word_is_shared_and_separate_from_the_lanes() -> None:
    board = LoadBoard(capacity=2)
    assert board.readiness() is Readiness.STARTING
    lane = board.claim()
    assert lane is not None
    board.publish(lane, 7)
    board.set_readiness(Readiness.DRAINED)
    assert board.readiness() is Readiness.DRAINED
    assert board.value(lane) == 7
    assert board.lowest_other(lane) > 7  # the readiness word is not a lane


# --- settings and the socket --------------------------------------------------------------------


def test_agent_is_off_by_default_and_tcp_only() -> None:
    assert Settings().agent.address is None
    assert AgentSettings(address="127.0.0.1:8099").parsed() == TcpAddress(
        "127.0.0.1", 8099, socket.AF_INET
    )
    with pytest.raises(ValueError, match="TCP"):
        AgentSettings(address="unix:/run/agent.sock")


def test_agent_answers_each_connection_with_one_line_and_closes() -> None:
    server = AgentServer.bind(TcpAddress("127.0.0.1", 0, socket.AF_INET), "127.0.0.1:0")
    try:
        port = int(server.address().rsplit(":", 1)[1])
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        clients[0].sendall(b"backend/server\n")  # HAProxy's agent-send
        assert server.answer("ready 50%") == 3  # handshakes done: all in the backlog
        assert server.answer("ready 50%") == 0
        for c in clients:
            data = b""
            while chunk := c.recv(100):
                data += chunk
            assert data == b"ready 50%\n"
            c.close()
    finally:
        server.close()


def test_agent_address_in_use_is_one_line() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ListenError) as info:
            AgentServer.bind(TcpAddress("127.0.0.1", port, socket.AF_INET), f"127.0.0.1:{port}")
        assert str(info.value) == f"[agent] address 127.0.0.1:{port}: address already in use"
    finally:
        holder.close()


# --- appliance drain / undrain in the policy ------------------------------------------------------


def drain_outcomes(actions: list[object]) -> list[DrainOutcome]:
    return [a for a in actions if isinstance(a, DrainOutcome)]


def test_drain_changes_only_what_balancers_are_told() -> None:
    sim = Sim(gen(target=2))
    sim.ready_all()
    before = sim.state.workers
    out = sim.step(DrainRequested(7, drain=True))
    (answer,) = drain_outcomes(out)
    assert answer.ok and answer.request_id == 7 and answer.agent == "drain"
    assert "pool.drained" in [a.event for a in out if isinstance(a, Log)]
    assert sim.state.drained and views.readiness(sim.state) is Readiness.DRAINED
    assert not any(isinstance(a, (Kill, Spawn)) for a in out)
    assert sim.state.workers == before
    assert "drained (balancers told drain)" in sim.state.status_text
    (again,) = drain_outcomes(sim.step(DrainRequested(8, drain=True)))
    assert again.ok and again.message.startswith("already drained")
    (maint,) = drain_outcomes(sim.step(DrainRequested(9, drain=True, maint=True)))
    assert maint.agent == "maint" and views.agent_reply(sim.state) == "maint"
    (undrain,) = drain_outcomes(sim.step(DrainRequested(10, drain=False)))
    assert undrain.ok and undrain.agent == "ready 100%"
    assert not sim.state.drained and not sim.state.maint
    assert views.readiness(sim.state) is Readiness.READY
    (noop,) = drain_outcomes(sim.step(DrainRequested(11, drain=False)))
    assert noop.ok and noop.message.startswith("already not drained")


def test_drain_survives_a_reload() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    sim.step(DrainRequested(1, drain=True))
    sim.step(ReloadRequested(2, gen(target=1)))
    sim.ready_all()
    assert sim.state.drained and views.agent_reply(sim.state) == "drain"


def test_drain_while_stopping_is_refused_with_a_reason() -> None:
    sim = Sim(gen(target=1))
    sim.ready_all()
    sim.step(StopRequested("SIGTERM"))
    for request in (DrainRequested(3, drain=True), DrainRequested(4, drain=False)):
        (answer,) = drain_outcomes(sim.step(request))
        assert not answer.ok and "stopping" in answer.message
    assert not sim.state.drained


# --- the drain delay on SIGTERM -------------------------------------------------------------------


def test_sigterm_with_a_drain_delay_reports_drain_and_keeps_serving_until_the_deadline() -> None:
    sim = Sim(gen(target=2, drain_delay_s=5.0))
    sim.ready_all()
    mark = len(sim.actions)
    out = sim.step(StopRequested("SIGTERM"))
    assert kills(out) == []
    assert sim.notes(mark) == ["STOPPING=1", sim.notes(mark)[-1]]
    assert sim.notes(mark)[-1].startswith("STATUS=stopping after the drain delay (SIGTERM)")
    assert "master.drain_delay" in sim.events(mark)
    assert sim.state.phase is Phase.RUNNING and sim.state.leaving
    assert views.agent_reply(sim.state) == "drain"
    assert views.readiness(sim.state) is Readiness.STOPPING
    assert policy.next_deadline(sim.state) == pytest.approx(sim.now + 5.0)
    # still a pool: a crashed worker is replaced during the delay
    victim = sim.workers()[0]
    assert any(isinstance(a, Spawn) for a in sim.exit_of(victim.key, None, "SIGKILL"))
    sim.ready_all()
    # reloads, scaling and drains are refused meanwhile
    refused = sim.step(ReloadRequested(1, gen(target=2)))
    assert [a.ok for a in refused if isinstance(a, ReloadOutcome)] == [False]
    assert [a.ok for a in sim.step(ScaleRequested(2, absolute=3)) if isinstance(a, ScaleOutcome)] == [False]
    sim.at(sim.now + 4.9)
    assert kills(sim.step(Tick())) == []
    sim.at(sim.now + 0.1)
    mark = len(sim.actions)
    out = sim.step(Tick())
    assert sorted(sig for _, sig in kills(out)) == ["SIGTERM", "SIGTERM"]
    stopping = [a for a in out if isinstance(a, Log) and a.event == "master.stopping"]
    assert dict(stopping[0].fields)["drain_delay"] == "served"
    assert "STOPPING=1" not in sim.notes(mark)  # said once, at the SIGTERM
    assert "READY=1" not in sim.notes()[-3:]
    for w in sim.workers():
        out = sim.exit_of(w.key)
    assert any(isinstance(a, Exit) and a.code == 0 for a in out)


def test_a_second_sigterm_or_sigint_skips_the_drain_delay() -> None:
    for second in ("SIGTERM", "SIGINT"):
        sim = Sim(gen(target=1, drain_delay_s=30.0))
        sim.ready_all()
        sim.step(StopRequested("SIGTERM"))
        sim.at(sim.now + 1)
        out = sim.step(StopRequested(second))
        assert kills(out) == [(sim.workers()[0].key, "SIGTERM")]
        stopping = [a for a in out if isinstance(a, Log) and a.event == "master.stopping"]
        assert dict(stopping[0].fields) == {"signal": second, "workers": 1, "drain_delay": "skipped"}


def test_no_drain_delay_before_anything_was_ready_or_when_forced() -> None:
    sim = Sim(gen(target=1, drain_delay_s=30.0))
    sim.step(StopRequested("SIGTERM"))
    assert sim.state.phase is Phase.STOPPING and sim.state.stop_at is None
    sim = Sim(gen(target=1, drain_delay_s=30.0))
    sim.ready_all()
    out = sim.step(StopRequested("SIGQUIT", force=True))
    assert kills(out)[-1][1] == "SIGKILL"


def test_a_reload_in_flight_at_sigterm_finishes_without_ready_1() -> None:
    sim = Sim(gen(target=1, drain_delay_s=10.0))
    sim.ready_all()
    sim.step(ReloadRequested(1, gen(target=1, drain_delay_s=10.0)))
    mark = len(sim.actions)
    sim.step(StopRequested("SIGTERM"))
    sim.ready_all()  # the new generation's worker
    assert "READY=1" not in sim.notes(mark)
    assert [a.ok for a in sim.actions[mark:] if isinstance(a, ReloadOutcome)] == [True]
    assert views.agent_reply(sim.state) == "drain"


# --- the readiness path in the worker -------------------------------------------------------------


def _call(app: object, scope: dict) -> list[dict]:
    import asyncio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    return sent


def test_readiness_app_answers_its_path_and_passes_the_rest() -> None:
    from appliance.engines.readiness import ReadinessApp

    seen: list[str] = []

    async def inner(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope.get("path", scope["type"]))

    word = [Readiness.READY]
    app = ReadinessApp(inner, "/-/ready", lambda: word[0])
    start, body = _call(app, {"type": "http", "path": "/-/ready", "method": "GET"})
    assert (start["status"], body["body"]) == (200, b"ready\n")
    word[0] = Readiness.DRAINED
    start, body = _call(app, {"type": "http", "path": "/-/ready", "method": "GET"})
    assert (start["status"], body["body"]) == (503, b"drained\n")
    start, body = _call(app, {"type": "http", "path": "/-/ready", "method": "HEAD"})
    assert (start["status"], body["body"]) == (503, b"")
    assert _call(app, {"type": "http", "path": "/other", "method": "GET"}) == []
    assert _call(app, {"type": "lifespan"}) == []
    assert seen == ["/other", "lifespan"]


def test_readiness_path_form() -> None:
    from appliance.config.schema import HttpSettings

    assert HttpSettings(readiness_path="/-/ready").readiness_path == "/-/ready"
    for bad in ("ready", "/a b", "/a?b", "/" + "a" * 300):
        with pytest.raises(ValueError, match="must start with /"):
            HttpSettings(readiness_path=bad)


# --- the drain mark: an operator's drain kept across a restart ---------------------------------


def test_drain_mark_words() -> None:
    from appliance.master import drainmark

    for mark in drainmark.Mark:
        assert drainmark.parse(drainmark.render(mark)) is mark
    for junk in ("", "\n", "drained", "DRAIN", "\x00maint", "maint maint"):
        assert drainmark.parse(junk) is None
    assert drainmark.path_for("/run/appliance/control.sock") == (
        "/run/appliance/control.sock.drained"
    )


def test_a_master_started_with_the_mark_is_drained_and_stops_without_the_delay() -> None:
    g = gen(target=1, drain_delay_s=30.0)
    state = policy.initial_state(g, watchdog_interval_s=None, now=0.0, maint=True)
    assert state.drained and state.maint
    sim = Sim(g)
    sim.state = replace(sim.state, drained=True)
    sim.ready_all()
    out = sim.step(StopRequested("SIGTERM"))
    assert not [a for a in out if getattr(a, "event", "") == "master.drain_delay"]
    assert sim.state.phase is Phase.STOPPING
