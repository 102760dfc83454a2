"""The WSGI bridge's pure parts: the environ, and what a request's thread hands the loop."""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest

from appliance.engines.wsgi import STREAM_AFTER, _Call, _Threads, build_environ

SCOPE: dict[str, Any] = {
    "type": "http",
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/café/a b",
    "raw_path": b"/caf%C3%A9/a%20b",
    "root_path": "",
    "query_string": b"x=%C3%A9&y=1",
    "headers": [
        (b"host", b"example.com"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"3"),
        (b"accept", b"a"),
        (b"accept", b"b"),
        (b"x_forwarded_for", b"6.6.6.6"),
    ],
    "client": ("10.0.0.1", 5555),
    "server": ("127.0.0.1", 8000),
}


def test_environ_follows_pep3333():
    body = io.BytesIO(b"abc")
    env = build_environ(SCOPE, body)
    assert env["PATH_INFO"] == "/cafÃ©/a b"  # the decoded bytes, as Latin-1
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café/a b"
    assert env["QUERY_STRING"] == "x=%C3%A9&y=1"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", "8000")
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("10.0.0.1", "5555")
    assert (env["CONTENT_TYPE"], env["CONTENT_LENGTH"]) == ("text/plain", "3")
    assert env["HTTP_HOST"] == "example.com"
    assert env["HTTP_ACCEPT"] == "a,b"
    assert "HTTP_X_FORWARDED_FOR" not in env  # names with "_" are dropped, as gunicorn does
    assert env["wsgi.input"] is body and env["wsgi.input_terminated"] is True
    assert env["wsgi.errors"] is sys.stderr
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_root_path_becomes_script_name():
    env = build_environ({**SCOPE, "root_path": "/app", "raw_path": b"/app/x"}, io.BytesIO())
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "/x")


class Outbox:
    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []

    def post(self, message: dict[str, Any], size: int = 0) -> None:
        self.posted.append(message)


def _run(app, method="GET", gone=lambda: False):
    outbox = Outbox()
    call = _Call(outbox, gone, method == "HEAD")  # type: ignore[arg-type]
    return outbox.posted, call.run(app, {})


def _app(body, headers=(), status="200 OK"):
    def app(environ, start_response):
        start_response(status, list(headers))
        return body

    return app


def test_a_list_body_goes_in_one_piece_with_a_content_length():
    posted, end = _run(_app([b"hello ", b"world"]))
    assert posted == []
    assert end[0] == {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-length", b"11")],
    }
    assert end[1] == {"type": "http.response.body", "body": b"hello world", "more_body": False}


def test_no_content_length_added_for_head_204_or_a_given_one():
    for app, method in [
        (_app([b""], status="204 No Content"), "GET"),
        (_app([]), "HEAD"),
        (_app([b"x"], headers=[("Content-Length", "1")]), "GET"),
    ]:
        _, end = _run(app, method)
        names = [name for name, _ in end[0]["headers"]]
        assert names.count(b"content-length") == (
            1 if method == "GET" and end[0]["status"] == 200 else 0
        )


def test_a_generator_is_streamed_as_it_comes():
    def parts():
        yield b"a"
        yield b"b"

    posted, end = _run(_app(parts()))
    assert [m["type"] for m in posted] == [
        "http.response.start",
        "http.response.body",
        "http.response.body",
    ]
    assert [m.get("body") for m in posted[1:]] == [b"a", b"b"]
    assert end == [{"type": "http.response.body", "body": b"", "more_body": False}]


def test_a_large_list_streams_past_the_threshold():
    big = [b"x" * STREAM_AFTER, b"y"]
    posted, end = _run(_app(big))
    assert posted[0]["type"] == "http.response.start"
    assert b"".join(m["body"] for m in posted[1:]) == b"x" * STREAM_AFTER + b"y"
    assert end[-1]["more_body"] is False


def test_a_gone_client_stops_the_iteration_and_close_is_called():
    closed = []

    class Stream:
        def __iter__(self):
            while True:
                yield b"tick"

        def close(self):
            closed.append(True)

    seen = iter([False, False, True])
    _, end = _run(_app(Stream()), gone=lambda: next(seen, True))
    assert end == [] and closed == [True]


def test_exc_info_replaces_headers_until_the_body_begins():
    def app(environ, start_response):
        start_response("200 OK", [("X-A", "1")])
        try:
            raise ValueError("boom")
        except ValueError:
            start_response("500 Oops", [("X-B", "2")], sys.exc_info())
        return [b"sorry"]

    _, end = _run(app)
    assert end[0]["status"] == 500
    assert (b"x-b", b"2") in end[0]["headers"]

    def late(environ, start_response):
        write = start_response("200 OK", [])
        write(b"begun")
        try:
            raise ValueError("late")
        except ValueError:
            start_response("500 Oops", [], sys.exc_info())
        return []

    with pytest.raises(ValueError, match="late"):
        _run(late)


@pytest.mark.parametrize(
    "app",
    [
        lambda env, sr: [b"no start_response"],
        lambda env, sr: (sr("200 OK", []), sr("200 OK", []), [b""])[-1],
        lambda env, sr: (sr("OK", []), [b""])[-1],
    ],
    ids=["body-first", "twice", "bad-status"],
)
def test_app_errors_raise(app):
    with pytest.raises((RuntimeError, ValueError)):
        _run(app)


def test_threads_run_calls_for_the_loop_reuse_idle_threads_and_queue_past_their_size() -> None:
    """The bridge's thread pool: results and exceptions come back to the loop; a thread that
    is free takes the next call (no new thread); no more than ``size`` threads ever start,
    and calls beyond them wait their turn; a cancelled call's result is dropped."""
    import asyncio
    import threading

    threads = _Threads(2, "wsgi-test")

    def boom() -> None:
        raise ValueError("from the app")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for i in range(5):  # one at a time: the first thread serves them all
            assert await threads.run(loop, lambda x: x * 2, i) == 2 * i
        assert threads._started == 1
        with pytest.raises(ValueError, match="from the app"):
            await threads.run(loop, boom)

        # Three calls that block until released: two threads start, the third call waits.
        release, inside = threading.Event(), threading.Semaphore(0)

        def held(n: int) -> tuple[int, str]:
            inside.release()
            assert release.wait(30)
            return n, threading.current_thread().name

        calls = [threads.run(loop, held, n) for n in range(3)]
        for _ in range(2):
            assert await loop.run_in_executor(None, inside.acquire, True, 30)
        assert threads._started == 2
        assert not any(call.done() for call in calls)
        calls[2].cancel()  # its result, when it comes, is dropped
        release.set()
        results = [await calls[0], await calls[1]]
        assert [n for n, _ in results] == [0, 1]
        assert {name for _, name in results} == {"wsgi-test_1", "wsgi-test_2"}
        assert await threads.run(loop, lambda: "still serving") == "still serving"
        assert threads._started == 2

    asyncio.run(asyncio.wait_for(scenario(), 60))
