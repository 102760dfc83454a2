"""The worker -> master pipe: one module writes and reads it, and no line can hurt the reader."""

from __future__ import annotations

import pytest

from appliance.worker import protocol
from appliance.worker.protocol import Beat, BootError, Draining, Invalid, Ready


@pytest.mark.parametrize(
    "msg", [Ready(), Beat(10, 2, 3, 41.5), Draining(), BootError("ImportError: no module x")]
)
def test_every_message_round_trips(msg: protocol.Message) -> None:
    line = protocol.encode(msg)
    assert line.endswith(b"\n") and len(line) <= protocol.MAX_LINE
    assert protocol.MessageReader().feed(line) == [msg]


def test_a_huge_boot_error_still_fits_one_atomic_line() -> None:
    line = protocol.encode(BootError("x" * 100_000))
    assert len(line) <= protocol.MAX_LINE
    (msg,) = protocol.MessageReader().feed(line)
    assert isinstance(msg, BootError) and msg.error.endswith("...")


def test_lines_split_across_reads_are_reassembled() -> None:
    reader = protocol.MessageReader()
    data = protocol.encode(Ready()) + protocol.encode(Beat(1, 0))
    assert reader.feed(data[:5]) == []
    assert reader.feed(data[5:]) == [Ready(), Beat(1, 0)]


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"t": "hb", "req": "many"}',
        b'{"t": "hb", "req": -1}',
        b'{"t": "hb", "req": true}',
        b'{"t": "hb", "rss": NaN}',
        b'{"t": "who"}',
        b"\xff\xfe",
        b"[" * 10_000,
    ],
)
def test_garbage_decodes_to_invalid_never_raises(line: bytes) -> None:
    (msg,) = protocol.MessageReader().feed(line + b"\n")
    assert isinstance(msg, Invalid) and len(msg.excerpt) <= 200


def test_an_endless_line_is_dropped_as_one_invalid() -> None:
    reader = protocol.MessageReader()
    out = reader.feed(b"x" * (protocol.MAX_LINE + 10))
    assert len(out) == 1 and isinstance(out[0], Invalid)
    assert reader.feed(protocol.encode(Ready())) == [Ready()]
