"""The pure HTTP rules: limits, RFC 9112 checks, drain actions, WebSocket close codes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from appliance.http.rules import (
    CLOSE_GOING_AWAY,
    CLOSE_SERVICE_RESTART,
    Drain,
    HeadLimits,
    Reject,
    check_field,
    check_framing_bytes,
    check_head,
    check_head_bytes,
    check_request_line,
    drain_action,
    websocket_close_code,
)

LIMITS = HeadLimits()


def test_defaults_are_gunicorns():
    assert (LIMITS.max_request_line_bytes, LIMITS.max_header_fields) == (4094, 100)
    assert LIMITS.max_header_field_bytes == 8190


def test_a_target_that_always_fits_fits_with_any_method():
    fits = LIMITS.target_always_fits
    for method in (b"GET", b"UNSUBSCRIBE", b"M" * 24):
        assert check_request_line(method, fits, LIMITS) is None


def test_request_line_counts_method_spaces_target_and_version():
    target = 4094 - len("GET  HTTP/1.1")
    assert check_request_line(b"GET", target, LIMITS) is None
    assert check_request_line(b"GET", target + 1, LIMITS) == Reject(
        414, "request line longer than 4094 bytes"
    )
    assert check_request_line(b"DELETE", target, LIMITS) is not None


def test_field_count_and_size():
    assert check_field(100, b"a", b"b", LIMITS) is None
    assert check_field(101, b"a", b"b", LIMITS) == Reject(431, "more than 100 header fields")
    name = b"X-Big"
    fits = b"v" * (8190 - len(name) - 2)
    assert check_field(1, name, fits, LIMITS) is None
    assert check_field(1, name, fits + b"v", LIMITS).status == 431  # type: ignore[union-attr]


@given(st.integers(64, 10_000), st.integers(1, 500), st.integers(64, 20_000), st.integers(0, 10**9))
def test_head_budget_admits_every_head_within_the_limits(line, fields, field, received):
    limits = HeadLimits(line, fields, field)
    biggest_legal = line + 2 + fields * (field + 2) + 2
    assert (check_head_bytes(received, limits) is None) == (received <= biggest_legal)


def test_framing_run_has_the_heads_budget():
    assert check_framing_bytes(LIMITS.head_budget, LIMITS) is None
    reject = check_framing_bytes(LIMITS.head_budget + 1, LIMITS)
    assert reject == Reject(431, "chunk framing or trailer section larger than 823298 bytes")


def test_head_rules():
    assert check_head("1.1", b"GET", b"/", 1, False) is None
    assert check_head("1.0", b"GET", b"/", 0, False) is None  # HTTP/1.0 needs no Host
    assert check_head("2.0", b"GET", b"/", 1, False) == Reject(
        505, "HTTP/2.0 is not supported; use HTTP/1.1"
    )
    assert check_head("1.1", b"GET", b"/", 2, False).status == 400  # type: ignore[union-attr]
    assert check_head("1.1", b"GET", b"/", 0, False).status == 400  # type: ignore[union-attr]
    assert check_head("1.1", b"GET", b"*", 1, False).status == 400  # type: ignore[union-attr]
    assert check_head("1.1", b"OPTIONS", b"*", 1, False) is None
    assert check_head("1.0", b"POST", b"/", 0, True).status == 400  # type: ignore[union-attr]
    assert check_head("1.1", b"POST", b"/", 1, True) is None


def test_drain_actions():
    assert drain_action(head_in_progress=False, request_in_progress=True) is Drain.FINISH
    assert drain_action(head_in_progress=True, request_in_progress=True) is Drain.FINISH
    assert drain_action(head_in_progress=True, request_in_progress=False) is Drain.CLOSE
    assert drain_action(head_in_progress=False, request_in_progress=False) is Drain.WAIT


def test_close_codes():
    assert websocket_close_code(stopping=True) == CLOSE_GOING_AWAY == 1001
    assert websocket_close_code(stopping=False) == CLOSE_SERVICE_RESTART == 1012
