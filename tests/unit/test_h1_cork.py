"""The corked transport of a response: one write per loop iteration, in order, bounded."""

from __future__ import annotations

from typing import Any

from appliance.engines.h1 import CORK_LIMIT, _Corked


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

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


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
    return _Corked(transport, loop), transport, loop  # type: ignore[arg-type]


def test_head_and_body_of_one_iteration_are_one_write():
    cork, transport, loop = _corked()
    cork.write(b"HTTP/1.1 200 OK\r\n\r\n")
    cork.write(b"hello")
    assert transport.writes == []
    loop.end_of_iteration()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nhello"]
    loop.end_of_iteration()  # nothing more, nothing twice
    assert len(transport.writes) == 1


def test_a_large_body_is_written_at_once_after_what_was_held():
    cork, transport, loop = _corked()
    body = b"x" * (CORK_LIMIT + 1)
    cork.write(b"head")
    cork.write(body)
    assert transport.writes == [b"head", body]
    loop.end_of_iteration()
    assert transport.writes == [b"head", body]


def test_many_small_writes_are_bounded_by_the_limit():
    cork, transport, _ = _corked()
    for _ in range(CORK_LIMIT // 1000 + 2):
        cork.write(b"y" * 1000)
    assert transport.writes and all(len(w) <= CORK_LIMIT + 1000 for w in transport.writes)


def test_close_writes_what_is_held_first_and_a_late_flush_does_nothing():
    cork, transport, loop = _corked()
    cork.write(b"last words")
    cork.close()
    assert transport.writes == [b"last words"] and transport.closed
    loop.end_of_iteration()
    assert transport.writes == [b"last words"]


def test_everything_else_is_the_transports():
    cork, transport, _ = _corked()
    assert cork.get_extra_info("peername") == ("127.0.0.1", 1)
    assert cork.is_closing() is False
    transport.closed = True
    cork.write(b"after the peer left")
    cork.flush()
    assert transport.writes == []
