"""Reload faults: SIGHUP storms, concurrent reloads, SIGHUP at start-up, SIGTERM mid-storm,
and an app that can never boot.

A reload under load loses no request, so every test here asserts ``load.failures == []``.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from faults import (
    APPS,
    SCALE,
    Control,
    Deadline,
    Master,
    Subject,
    cli,
    fault_config,
    poll_until,
    session_members,
    under_load,
    write_config,
)

_SIGHUP_BIT = 1 << (signal.SIGHUP - 1)


def _generations_in_order(seen: list[dict]) -> None:
    """Each generation that served answered first after the one before it did. (An older
    generation may still answer after that: its workers are replaced one at a time, and a
    draining worker answers a request on its idle keep-alive connection; a leaked worker is
    caught by the last answers all coming from the final generation, and by Subject.settled.)"""
    generations = [body["generation"] for body in seen]
    last_first: dict[int, int] = {}
    for i, g in enumerate(generations):
        last_first.setdefault(g, i)
    firsts = [last_first[g] for g in sorted(last_first)]
    assert firsts == sorted(firsts), "generations answered out of order"


def _reloads_done(s: Subject) -> int:
    return len(s.logs.find("reload.finished"))


def _final_reload(s: Subject) -> dict:
    """One more reload through the control socket, after everything before it was handled:
    when it answers, the master has worked through the storm."""
    reply = s.control.request("reload", timeout=60)
    assert reply["ok"] is True, reply
    return reply


def test_sighup_storm_under_load_leaks_nothing_and_ends_on_one_generation(subject, figures):
    """Known bug 1: 200 SIGHUPs within 1 s left 189 children and 193 pipe fds."""
    s = subject()
    storm = SCALE.storm
    with under_load(s, keepalive=2, fresh=2) as load:
        load.wait_requests(100)
        for _ in range(storm):
            s.master.signal(signal.SIGHUP)
        s.assert_alive()
        _final_reload(s)
        load.wait_requests(100)
    figures.reloads = _reloads_done(s)
    status = s.settled()
    assert load.failures == [], (load.failures, s.killed())
    assert {b["generation"] for b in load.seen[-50:]} == {status["generation"]}
    _generations_in_order(load.seen)
    s.stop_within()


def test_back_to_back_reload_pairs_control_sighup_and_cli(subject, workdir, figures):
    """Known bug 1: two reloads at the same moment leaked a live worker serving old code, and
    SIGTERM no longer stopped the master. Pairs through the control socket (both requests on
    the wire before either is read), SIGHUP pairs, and two concurrent `appliance reload`."""
    s = subject()
    pairs = SCALE.pairs
    with under_load(s, keepalive=2, fresh=2) as load:
        load.wait_requests(100)
        for n in range(pairs):
            if n % 2:
                s.master.signal(signal.SIGHUP)
                s.master.signal(signal.SIGHUP)
                _final_reload(s)
            else:
                a, b = s.control.connect(30), s.control.connect(30)
                with a, b:
                    a.sendall(b'{"cmd":"reload"}\n')
                    b.sendall(b'{"cmd":"reload"}\n')
                    replies = [Control.final(a, 60), Control.final(b, 60)]
                assert all(r.get("ok") is True for r in replies), replies
            s.assert_alive()
        results: list = [None, None]

        def run(i: int) -> None:
            results[i] = cli("reload", "--config", str(s.config_path))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        load.wait_requests(100)
    figures.reloads = _reloads_done(s)
    status = s.settled()
    assert load.failures == [], (load.failures, s.killed())
    assert {b["generation"] for b in load.seen[-50:]} == {status["generation"]}
    _generations_in_order(load.seen)
    s.stop_within()


def test_sigterm_in_the_middle_of_a_reload_storm_stops_within_graceful_plus_margin(
    subject, figures
):
    s = subject()
    with under_load(s, counted=False) as load:  # requests after the SIGTERM are refused
        load.wait_requests(100)
        mark = s.logs.mark()
        for _ in range(max(SCALE.storm // 5, 10)):
            s.master.signal(signal.SIGHUP)
        s.logs.wait_for("reload.started", since=mark)
        s.stop_within()
    figures.reloads = _reloads_done(s)


def test_sighup_during_start_up_neither_kills_nor_wedges_the_master(workdir, figures):
    """Known bug 6: a SIGHUP in the first ~0.2 s after exec killed the master silently (the
    default action of SIGHUP, before the master's handler existed). The master must take over
    SIGHUP (handle, block or ignore it) before its slow start-up work (imports, config,
    sockets), so only the interpreter's own start is left exposed; from then on, SIGHUPs at
    any moment of start-up must not kill it."""
    cfg = fault_config(workdir)
    m = Master(write_config(workdir, cfg))
    s = Subject(m, workdir, cfg, figures)
    try:
        taken_over = poll_until(
            "the master handles, blocks or ignores SIGHUP",
            lambda: _sighup_taken_over(m.pid) and time.time(),
            20,
            lambda: f"master state {m.proc.poll()}; last lines:\n{s.tail()}",
        )
        # Hammer it through the rest of start-up: configuration, binding, forking, booting.
        sent = 0
        until = time.monotonic() + 1.0
        while time.monotonic() < until and not m.logs.find("master.ready") and s.alive():
            m.signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.01)  # spacing between signals (they do not queue), not a wait
        s.assert_alive()
        started = m.started(timeout=15)
        assert _ts(started["ts"]) > taken_over, (
            "SIGHUP was still fatal when the master announced master.started"
        )
        try:
            m.ready(timeout=15)
        except Deadline as exc:
            raise AssertionError(
                f"after {sent} SIGHUPs during start-up the master never became ready "
                f"(no master.ready, so no READY=1): {exc}"
            ) from None
        s.baseline()
        assert m.get("/")[0] == 200
        figures.notes["sighups_during_start"] = sent
        s.stop_within()
    finally:
        m.kill_group()


def test_an_app_that_cannot_boot_ends_the_master_with_status_3(subject, workdir, figures):
    """Known bug 7: the master retried forever. Now: after workers.start_attempts (default 3)
    failed boots in every slot, exit 3 with one line naming the cause; nothing left running."""
    cfg = fault_config(workdir, app={"target": "broken:app", "directory": str(APPS)})
    s = subject(cfg, ready=False)
    try:
        code = s.master.wait(timeout=15)
    except Exception as exc:  # noqa: BLE001 - subprocess.TimeoutExpired, reported below
        raise AssertionError(
            f"the master did not give up on an app that cannot import: {exc}; last lines:\n"
            + s.tail()
        ) from None
    assert code == 3, f"exit status {code}; last lines:\n{s.tail()}"
    assert not s.logs.find("master.ready")
    # One line names the cause: a master event (workers' own reports carry worker_id), or a
    # plain line on stderr.
    naming = [
        line
        for line in s.logs.lines
        if "this app is broken on purpose" in line and '"worker_id"' not in line
    ]
    assert len(naming) == 1, naming or s.tail()
    assert session_members(s.pid) == []


def _sighup_taken_over(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    masks = {
        k: int(v, 16)
        for k, v in (line.split(":\t") for line in text.splitlines() if ":\t" in line)
        if k in ("SigBlk", "SigIgn", "SigCgt")
    }
    return any(mask & _SIGHUP_BIT for mask in masks.values())


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()
