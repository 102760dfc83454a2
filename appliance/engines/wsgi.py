"""WSGI apps on the engine: PEP 3333 on a thread pool, one hand-off per ordinary request.

The HTTP protocol parses on the event loop; the app runs in one of ``[wsgi] threads`` threads
(:class:`WsgiApp`, an ASGI app to the protocol). What crosses between the loop and a thread is
what costs, so an ordinary request crosses twice and no more:

* the loop hands the request over with its body when the body is already complete (a GET, a
  small POST: ``wsgi.input`` is then a plain in-memory file); a larger body is read from the
  loop as the app asks for it;
* the thread runs the app and collects its response; once the iteration ends, status, headers
  and the whole body go back to the loop in one piece (with a ``Content-Length`` the loop
  adds when the app gave none). Only a response that grows past ``STREAM_AFTER`` bytes is
  streamed, chunk by chunk, each waiting for the loop (so a slow client slows the app's
  iteration instead of filling memory).

And what a production server owes a WSGI app:

* ``wsgi.input_terminated``: the body ends where the request ends, so a chunked body (no
  Content-Length) is readable, e.g. with Flask's ``get_data()``;
* ``wsgi.file_wrapper``;
* the iteration stops as soon as the client is gone (the HTTP protocol puts
  ``appliance.disconnected`` into the scope's extensions), and ``close()`` is always called;
  without this an endless stream (``while True: yield``) to a vanished client spins in its
  thread forever, and a few of them take every thread of the worker;
* ``start_response`` may be called again with ``exc_info`` until the first body bytes exist
  (PEP 3333): the app handling its own error is not logged at ERROR; after that it re-raises;
* ``PATH_INFO`` is the percent-decoded path as bytes in Latin-1 (PEP 3333's "bytes as
  str"), and request header fields whose names contain ``_`` are dropped, as gunicorn does:
  ``X_Forwarded_For`` would otherwise arrive as ``HTTP_X_FORWARDED_FOR``, indistinguishable
  from the header a proxy sets;
* the engine can tell when every thread has been stuck in the app for longer than the
  heartbeat timeout (:meth:`WsgiApp.stuck_for`), and then stops heartbeating so the master
  replaces the worker, as it does for an ASGI worker whose loop is blocked.
"""

from __future__ import annotations

import asyncio
import io
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = ["STREAM_AFTER", "FileWrapper", "WsgiApp", "build_environ"]

#: A response whose body grows past this many bytes is streamed to the loop chunk by chunk;
#: below it, it is sent in one piece once the app's iteration ends.
STREAM_AFTER = 64 * 1024

_NO_BODY_STATUS = frozenset({204, 304})
_Message = dict[str, Any]
_Headers = list[tuple[bytes, bytes]]


class FileWrapper:
    """``wsgi.file_wrapper``: iterate a file-like object in blocks, close it at the end."""

    def __init__(self, filelike: Any, block_size: int = 65536) -> None:
        self.filelike = filelike
        self.block_size = block_size
        close = getattr(filelike, "close", None)
        if close is not None:
            self.close = close

    def __iter__(self) -> Iterator[bytes]:
        while True:
            block = self.filelike.read(self.block_size)
            if not block:
                return
            yield block


class _Input(io.RawIOBase):
    """``wsgi.input`` for a body still arriving: read from the loop as the app asks.

    A disconnect reads as the end of the body (the app then sees a short body, as with any
    server; its response goes nowhere).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, receive: Any, first: bytes) -> None:
        super().__init__()
        self._loop = loop
        self._receive = receive
        self._buffer = bytearray(first)
        self._more = True

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """One more piece of the body into the buffer; False at its end."""
        if not self._more:
            return False
        message = asyncio.run_coroutine_threadsafe(self._receive(), self._loop).result()
        if message["type"] != "http.request":
            self._more = False
            return False
        self._more = bool(message.get("more_body", False))
        self._buffer += message.get("body", b"")
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer and self._fill():
            pass
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        del self._buffer[:n]
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        while len(self._buffer) < size and self._fill():
            pass
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = None if size is None or size < 0 else size
        while True:
            end = self._buffer.find(b"\n", 0, limit)
            if end >= 0:
                return self.read(end + 1)
            if (limit is not None and len(self._buffer) >= limit) or not self._fill():
                return self.read(limit if limit is not None else len(self._buffer))


def build_environ(scope: Any, body: Any) -> dict[str, Any]:
    """The PEP 3333 environ of an ASGI HTTP ``scope`` (pure but for ``wsgi.errors``)."""
    root = scope.get("root_path", "")
    raw = scope.get("raw_path")
    path = (
        unquote_to_bytes(raw).decode("latin-1")
        if raw
        else scope["path"].encode("utf-8").decode("latin-1")
    )
    script_name = root.encode("utf-8").decode("latin-1")
    if script_name and path.startswith(script_name):
        path = path[len(script_name) :]
    server = scope.get("server") or ("localhost", 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path,
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] or 0),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
    }
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"] = str(client[0])
        environ["REMOTE_PORT"] = str(client[1])
    for raw_name, raw_value in scope["headers"]:
        if b"_" in raw_name:
            continue
        if raw_name == b"content-length":
            key = "CONTENT_LENGTH"
        elif raw_name == b"content-type":
            key = "CONTENT_TYPE"
        else:
            key = "HTTP_" + raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if key in environ:
            value = environ[key] + "," + value
        environ[key] = value
    return environ


class _Outbox:
    """Response messages from a request's thread to the loop, in order, without waiting.

    The thread posts and goes on (one wake-up of the loop, shared with the others it causes
    at the same moment); it waits only while more than ``STREAM_AFTER`` body bytes are not yet
    written, so a slow client slows the app's iteration instead of filling memory. What the
    loop's ``send`` raises is raised in the thread at its next post.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Any) -> None:
        self._loop = loop
        self._send = send
        self._cond = threading.Condition()
        self._queue: list[tuple[_Message, int]] = []
        self._pending = 0
        self._task: asyncio.Task[None] | None = None
        self._scheduled = False
        self._error: BaseException | None = None

    # thread side
    def post(self, message: _Message, size: int = 0) -> None:
        with self._cond:
            if self._error is not None:
                raise self._error
            self._queue.append((message, size))
            self._pending += size
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._loop.call_soon_threadsafe(self._start)
        if self._pending > STREAM_AFTER:
            with self._cond:
                while self._pending > STREAM_AFTER and self._error is None:
                    self._cond.wait()

    # loop side
    def _start(self) -> None:
        self._task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._scheduled = False
                    return
                batch, self._queue = self._queue, []
            try:
                for message, _ in batch:
                    await self._send(message)
            except BaseException as exc:
                with self._cond:
                    self._error = exc
                    self._scheduled = False
                    self._cond.notify_all()
                raise
            with self._cond:
                self._pending -= sum(size for _, size in batch)
                self._cond.notify_all()

    async def flushed(self) -> None:
        """Wait until everything posted so far is sent (re-raising what ``send`` raised)."""
        while True:
            task = self._task
            if task is not None:
                await task
            with self._cond:
                if not self._scheduled:
                    break
            await asyncio.sleep(0)  # posted, the loop has not started the drain yet


class _Call:
    """One request in its thread: run the app, hand its response to the loop."""

    def __init__(self, outbox: _Outbox, gone: Callable[[], bool], head_request: bool) -> None:
        self._outbox = outbox
        self._gone = gone
        self._head_request = head_request
        self._status: int | None = None
        self._headers: _Headers = []
        self._collect = False  # a finite sequence (len() works): send it in one piece
        self._chunks: list[bytes] = []
        self._size = 0
        self._body_begun = False  # body bytes exist: the headers count as sent
        self._started = False  # the headers are posted

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self._body_begun:  # PEP 3333: too late to change the headers, re-raise
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._status is not None:
            msg = "start_response called a second time without exc_info"
            raise RuntimeError(msg)
        code = status.split(" ", 1)[0]
        if len(code) != 3 or not code.isdigit():
            msg = f"invalid WSGI status {status!r}"
            raise ValueError(msg)
        self._status = int(code)
        self._headers = [
            (name.strip().lower().encode("latin-1"), value.strip().encode("latin-1"))
            for name, value in headers
        ]
        return self._write

    def _write(self, data: bytes) -> None:
        if data:
            self._emit(data)

    def _emit(self, chunk: bytes) -> None:
        if self._status is None:
            msg = "the WSGI app sent a body before calling start_response"
            raise RuntimeError(msg)
        self._body_begun = True
        if self._collect and self._size + len(chunk) <= STREAM_AFTER:
            self._chunks.append(chunk)
            self._size += len(chunk)
            return
        if not self._started:
            self._started = True
            self._outbox.post(self._start_message(None))
            if self._chunks:
                self._post_body(b"".join(self._chunks))
                self._chunks.clear()
        self._post_body(chunk)

    def _post_body(self, body: bytes) -> None:
        self._outbox.post(
            {"type": "http.response.body", "body": body, "more_body": True}, len(body)
        )

    def _start_message(self, length: int | None) -> _Message:
        headers = self._headers
        status = self._status or 500
        if (
            length is not None
            and not self._head_request
            and status >= 200
            and status not in _NO_BODY_STATUS
            and not any(name in (b"content-length", b"transfer-encoding") for name, _ in headers)
        ):
            headers = [*headers, (b"content-length", b"%d" % length)]
        return {"type": "http.response.start", "status": status, "headers": headers}

    def run(self, app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> list[_Message]:
        """Call the app; the messages that end its response (none if the client is gone)."""
        iterable = app(environ, self.start_response)
        try:
            try:
                len(iterable)  # type: ignore[arg-type]
            except TypeError:
                pass
            else:
                self._collect = True  # PEP 3333: a len() must be right, so it is finite
            for chunk in iterable:
                if self._gone():
                    return []  # the client is gone: stop iterating (close() follows)
                if chunk:
                    self._emit(chunk)
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        if self._gone():
            return []
        if self._status is None:
            msg = "the WSGI app returned without calling start_response"
            raise RuntimeError(msg)
        end = {"type": "http.response.body", "body": b"", "more_body": False}
        if self._started:
            return [end]
        end["body"] = b"".join(self._chunks)
        return [self._start_message(self._size), end]


def _never() -> bool:
    return False


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _Threads:
    """Up to ``size`` threads that run calls for the event loop, started as they are needed.

    What ``run_in_executor`` with a ``ThreadPoolExecutor`` does, with less on both sides of
    each hand-over: the executor adds a work item, a concurrent future with its condition
    variable, an idle semaphore and an asyncio future chained to the concurrent one, and its
    thread settles all of that (holding the GIL) after the loop was already woken. Here a
    call is one queue entry, and the thread wakes the loop as the last thing before it waits
    for the next call, so the loop finds the GIL free.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0  # threads waiting for a call that no call has claimed yet

    def run(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        """``fn(*args)`` in one of the threads; a future of its result on ``loop``."""
        future = loop.create_future()
        self._calls.put((loop, future, fn, args))
        with self._lock:
            if self._idle:
                self._idle -= 1
                return future
            if self._started >= self.size:
                return future  # queued until a thread is free
            self._started += 1
            number = self._started
        threading.Thread(target=self._serve, name=f"{self._name}_{number}", daemon=True).start()
        return future

    def _serve(self) -> None:
        calls, lock = self._calls, self._lock
        while True:
            loop, future, fn, args = calls.get()
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - the caller gets it, as from an executor
                result, error = None, exc
            with lock:
                self._idle += 1
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: the worker is going away
                return
            del loop, future, fn, args, result, error  # an idle thread holds no request


class WsgiApp:
    """An ASGI app serving ``app`` (WSGI) on ``threads`` threads."""

    def __init__(self, app: Callable[..., Iterable[bytes]], threads: int) -> None:
        self.app = app
        self.threads = threads
        self._pool = _Threads(threads, "wsgi")
        self._lock = threading.Lock()
        self._busy: dict[int, float] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":  # a WSGI app has no lifespan: say it started and stopped
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:  # websocket: WSGI cannot take it
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Any, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        first = await receive()
        if first["type"] != "http.request":
            return  # gone before we began
        data = first.get("body", b"")
        body = _Input(loop, receive, data) if first.get("more_body") else io.BytesIO(data)
        probe = (scope.get("extensions") or {}).get("appliance.disconnected")
        gone: Callable[[], bool] = probe if callable(probe) else _never
        outbox = _Outbox(loop, send)
        call = _Call(outbox, gone, scope["method"] == "HEAD")
        environ = build_environ(scope, body)
        try:
            messages = await self._pool.run(loop, self._run, call, environ)
        finally:
            await outbox.flushed()
        for message in messages:
            await send(message)

    def _run(self, call: _Call, environ: dict[str, Any]) -> list[_Message]:
        ident = threading.get_ident()
        with self._lock:
            self._busy[ident] = time.monotonic()
        try:
            return call.run(self.app, environ)
        finally:
            with self._lock:
                self._busy.pop(ident, None)

    def stuck_for(self, now: float) -> float:
        """Seconds every thread has been inside the app (0 while one is free)."""
        with self._lock:
            if len(self._busy) < self.threads:
                return 0.0
            return now - min(self._busy.values())
