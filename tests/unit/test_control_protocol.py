"""The control protocol's messages: parsing, the reply builders, bounds, encoding, decoding."""

from __future__ import annotations

import json

import pytest

from appliance.control import (
    MAX_LINE,
    MAX_REPLY_LINE,
    MAX_TEXT,
    BadRequest,
    Request,
    bound_text,
    decode_reply,
    encode_line,
    encode_request,
    error_reply,
    is_final,
    ok_reply,
    parse_request,
    progress_reply,
    reload_ok_reply,
    reload_progress,
    scale_reply,
    status_reply,
)

# --- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"cmd":"status"}\n', Request("status", {})),
        (b'{"cmd": "reload"}', Request("reload", {})),
        (b'{"cmd":"scale","workers":4}', Request("scale", {"workers": 4})),
    ],
)
def test_parse_request_valid(line: bytes, expected: Request) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1,2]", "expected a JSON object, got list"),
        (b'{"workers":2}', 'missing "cmd"'),
        (b'{"cmd":"explode"}', "unknown cmd 'explode' (known: drain, reload, scale, status, undrain)"),
        (b'{"cmd":"scale"}', 'scale: "workers" must be an integer >= 1 (got None)'),
        (b'{"cmd":"scale","workers":true}', "(got True)"),
        (b'{"cmd":"scale","workers":0}', "(got 0)"),
        (b'{"cmd":"scale","workers":2,"x":1}', "unexpected arguments ['x']"),
        (b'{"cmd":"status","verbose":1}', "status: takes no arguments"),
        (b'{"cmd":"drain","maint":1}', 'drain: "maint" must be true or false (got 1)'),
        (b'{"cmd":"drain","x":1}', "drain: unexpected arguments ['x']"),
        (b'{"cmd":"undrain","maint":true}', "undrain: takes no arguments"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[" * (MAX_LINE - 1), "malformed JSON: maximum recursion depth exceeded"),
    ],
)
def test_parse_request_invalid(line: bytes, needle: str) -> None:
    result = parse_request(line)
    assert isinstance(result, BadRequest)
    assert needle in result.error


def test_encode_request_is_what_parse_request_reads() -> None:
    line = encode_request("scale", workers=3)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert parse_request(line) == Request("scale", {"workers": 3})


# --- replies: the documented wire format -----------------------------------------------------


def test_reply_builders_keep_the_documented_format() -> None:
    assert status_reply({"phase": "running"}) == {"ok": True, "status": {"phase": "running"}}
    assert reload_ok_reply(3, "2 worker(s) replaced") == {
        "ok": True,
        "reload": {"generation": 3, "message": "2 worker(s) replaced"},
    }
    assert reload_progress(3, 1, 2, "1/2") == {
        "progress": {"generation": 3, "replaced": 1, "total": 2, "message": "1/2"}
    }
    assert scale_reply(4) == {"ok": True, "workers": 4}
    assert error_reply("nope") == {"ok": False, "error": "nope"}
    assert ok_reply(workers=4) == scale_reply(4)
    assert progress_reply(replaced=1) == {"progress": {"replaced": 1}}
    assert is_final(scale_reply(4))
    assert is_final(error_reply("x"))
    assert not is_final(reload_progress(3, 1, 2, "1/2"))


def test_encode_line_is_compact_json_on_one_line() -> None:
    line = encode_line(error_reply("two\nlines"))
    assert line == b'{"ok":false,"error":"two\\nlines"}\n'
    assert decode_reply(line) == {"ok": False, "error": "two\nlines"}


def test_encode_line_sends_other_values_as_text() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd"

    assert decode_reply(encode_line(ok_reply(thing=Odd()))) == {"ok": True, "thing": "odd"}


# --- bounds ----------------------------------------------------------------------------------


def test_bound_text_cuts_and_counts() -> None:
    assert bound_text("short") == "short"
    text = "é" * 100
    cut = bound_text(text, 60)
    assert len(cut) <= 60
    assert cut == "é" * 20 + "... (160 more bytes)"  # 80 characters of 2 bytes each
    assert bound_text(cut, 60) == cut  # bounding twice changes nothing


def test_a_2mib_error_is_one_bounded_line_that_parses() -> None:
    error = "worker 1 failed to boot: " + "x" * (2 << 20)
    line = encode_line(error_reply(error))
    assert len(line) < MAX_REPLY_LINE
    assert line.count(b"\n") == 1
    reply = decode_reply(line)
    assert reply["ok"] is False
    assert reply["error"].startswith("worker 1 failed to boot: xxx")
    assert reply["error"].endswith(f"... ({len(error) - MAX_TEXT + 40} more bytes)")
    assert len(reply["error"]) <= MAX_TEXT


def test_every_string_is_bounded_even_in_hand_built_replies() -> None:
    """The status document carries the last reload error: it must not outgrow the line."""
    last = {"ok": False, "error": "\u2603" * (3 << 20)}  # 3 Mi snowmen: 18 MiB as \\u2603
    line = encode_line(status_reply({"reload": {"last": last}}))
    assert len(line) < MAX_REPLY_LINE
    error = json.loads(line)["status"]["reload"]["last"]["error"]
    assert len(error) <= MAX_TEXT
    assert error.endswith("more bytes)")


def test_reload_messages_are_bounded_by_their_builders() -> None:
    huge = "m" * (MAX_TEXT * 3)
    assert len(reload_ok_reply(2, huge)["reload"]["message"]) <= MAX_TEXT
    assert len(reload_progress(2, 1, 2, huge)["progress"]["message"]) <= MAX_TEXT
    assert len(error_reply(huge)["error"]) <= MAX_TEXT


# --- decoding on the client's side -----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"\xff\n", r"not UTF-8: b'\xff'"),
        (b"nope\n", "not JSON: b'nope'"),
        (b'"text"\n', "expected a JSON object, got str: b'\"text\"'"),
        (b"[" * 10_000 + b"\n", f"not JSON: b'{'[' * 80}'... (10000 bytes)"),
    ],
)
def test_decode_reply_rejects_with_a_short_reason(line: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_reply(line)
    assert str(info.value) == message
