"""Fair accepting: the pure decision and the shared board (engines/balance.py)."""

from __future__ import annotations

import os

from appliance.engines.balance import MAX_DEFER_S, LoadBoard, may_accept


def test_least_loaded_accepts_and_ties_accept() -> None:
    assert may_accept(0, 0, None, 10.0) == (True, None)
    assert may_accept(1, 3, None, 10.0) == (True, None)


def test_busier_worker_defers_then_accepts_after_max_defer() -> None:
    ok, since = may_accept(3, 1, None, 10.0)
    assert (ok, since) == (False, 10.0)
    assert may_accept(3, 1, since, 10.0 + MAX_DEFER_S / 2) == (False, 10.0)
    assert may_accept(3, 1, since, 10.0 + 2 * MAX_DEFER_S) == (True, None)


def test_board_lanes_claim_release_and_dead_lanes_never_win() -> None:
    board = LoadBoard(capacity=4)
    a, b, c = board.claim(), board.claim(), board.claim()
    assert (a, b, c) == (0, 1, 2)
    board.publish(a, 5)
    # b and c have not started accepting: dead, so a sees nobody less loaded
    assert board.lowest_other(a) > 1_000_000
    board.publish(b, 2)
    assert board.lowest_other(a) == 2
    board.mark_dead(b)
    assert board.lowest_other(a) > 1_000_000
    board.release(b)
    assert board.claim() == b, "the lowest free lane is reused"


def test_board_is_shared_across_fork() -> None:
    board = LoadBoard(capacity=2)
    lane = board.claim()
    other = board.claim()
    board.publish(other, 7)
    pid = os.fork()
    if pid == 0:
        board.publish(lane, 3)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.value(lane) == 3
    assert board.lowest_other(other) == 3
