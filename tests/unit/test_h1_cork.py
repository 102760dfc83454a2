"""The corked transport of a response (one write per loop iteration, in order, bounded), and
the known response field names."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.engines import h1
from appliance.engines.h1 import CORK_LIMIT, _Corked, _Flusher


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Loop:
    def __init__(self) -> None:
        self.soon: list[Any] = []

    def call_soon(self, callback: Any) -> None:
        self.soon.append(callback)

    def end_of_iteration(self) -> None:
        callbacks, self.soon = self.soon, []
        for callback in callbacks:
            callback()


def _corked() -> tuple[_Corked, Transport, Loop]:
    transport, loop = Transport(), Loop()
    return _Corked(transport, _Flusher(loop)), transport, loop  # type: ignore[arg-type]


def test_a_head_and_its_body_are_one_write_at_once():
    cork, transport, loop = _corked()
    cork.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == []  # held for the body
    cork.write(b"hello")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nhello"]  # no waiting for the loop
    loop.end_of_iteration()  # nothing more, nothing twice
    assert len(transport.writes) == 1


def test_a_head_alone_goes_out_at_the_end_of_the_iteration():
    cork, transport, loop = _corked()
    cork.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    loop.end_of_iteration()  # the app awaits something before its first chunk
    assert len(transport.writes) == 1
    cork.write(b"5\r\nfirst\r\n")
    loop.end_of_iteration()
    assert transport.writes[1] == b"5\r\nfirst\r\n"


def test_a_large_body_is_written_at_once_after_what_was_held():
    cork, transport, loop = _corked()
    body = b"x" * (CORK_LIMIT + 1)
    cork.write(b"head")
    cork.write(body)
    assert transport.writes == [b"head", body]
    loop.end_of_iteration()
    assert transport.writes == [b"head", body]


def test_writes_keep_their_order():
    cork, transport, loop = _corked()
    parts = [b"%d" % i for i in range(7)]
    for part in parts:
        cork.write(part)
    loop.end_of_iteration()
    assert b"".join(transport.writes) == b"".join(parts)
    assert len(transport.writes) == 4  # pairs, and the last one at the end of the iteration


def test_close_writes_what_is_held_first_and_a_late_flush_does_nothing():
    cork, transport, loop = _corked()
    cork.write(b"last words")
    cork.close()
    assert transport.writes == [b"last words"] and transport.closed
    loop.end_of_iteration()
    assert transport.writes == [b"last words"]


def test_nothing_is_written_once_the_transport_closes():
    cork, transport, _ = _corked()
    transport.closed = True
    cork.write(b"after the peer left")
    cork.flush()
    assert transport.writes == []


def test_the_worker_flushes_every_held_head_with_one_callback_per_iteration():
    loop = Loop()
    flusher = _Flusher(loop)  # type: ignore[arg-type]
    pairs = [(_Corked(t, flusher), t) for t in (Transport(), Transport(), Transport())]  # type: ignore[arg-type]
    for i, (cork, _) in enumerate(pairs):
        cork.write(b"head %d" % i)
    pairs[1][0].write(b" and body")  # joined at once; nothing left for the flush
    assert len(loop.soon) == 1
    loop.end_of_iteration()
    assert [t.writes for _, t in pairs] == [[b"head 0"], [b"head 1 and body"], [b"head 2"]]
    pairs[0][0].write(b"next")  # a later iteration schedules again
    assert len(loop.soon) == 1


def test_a_response_field_name_is_checked_once_then_known_lower_cased(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    known: dict[bytes, bytes] = {}
    monkeypatch.setattr(h1, "_FIELD_NAMES", known)
    monkeypatch.setattr(h1, "_FIELD_NAMES_MAX", 2)
    assert h1._field_name(b"Content-Type") == b"content-type"
    assert known == {b"Content-Type": b"content-type"}
    for bad in (b"X Bad", b"X:Bad", b"X\r\nSet-Cookie", b"X\x00"):
        with pytest.raises(RuntimeError, match="Invalid HTTP header name"):
            h1._field_name(bad)
    assert list(known) == [b"Content-Type"]  # only valid names are known
    assert h1._field_name(bytearray(b"X-A")) == b"x-a"  # checked, not kept (unhashable)
    h1._field_name(b"X-B")
    h1._field_name(b"X-C")  # past the bound: checked every time
    assert list(known) == [b"Content-Type", b"X-B"]
