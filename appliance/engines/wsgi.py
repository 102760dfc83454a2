"""WSGI apps on the engine: a2wsgi's thread pool, with the PEP 3333 parts it leaves out.

a2wsgi runs the app in a thread pool and carries the body and the response between the
threads and the loop. :class:`WsgiApp` wraps the app it calls so that:

* ``wsgi.input_terminated`` is set: the body ends where the ASGI body ends, so a chunked
  request body (no Content-Length) is readable, e.g. with Flask's ``get_data()``;
* ``wsgi.file_wrapper`` exists;
* the response iteration stops as soon as the client is gone (the HTTP protocol puts
  ``appliance.disconnected`` into the scope's extensions), and ``close()`` is called then;
  without this an endless stream (``while True: yield``) to a vanished client spins in its
  thread forever, and a few of them take every thread of the worker;
* the status and headers are sent with the first body bytes, not at ``start_response``, so
  an app that fails before its body can still replace them by calling ``start_response``
  again with ``exc_info`` (PEP 3333). That path is the app handling its error: nothing is
  logged at ERROR. ``exc_info`` after the headers were sent re-raises, as PEP 3333 says;
* the engine can tell when every thread has been stuck in the app for longer than the
  heartbeat timeout (:meth:`WsgiApp.stuck_for`), and then stops heartbeating so the master
  replaces the worker, as it does for an ASGI worker whose loop is blocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from a2wsgi import WSGIMiddleware

__all__ = ["FileWrapper", "WsgiApp"]

_Start = Callable[..., Callable[[bytes], object]]


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


class _Response:
    """The iterable a2wsgi sees: the app's, with deferred headers and a disconnect check."""

    def __init__(self, owner: WsgiApp, environ: dict[str, Any], start: _Start) -> None:
        self._owner = owner
        self._start = start
        self._pending: tuple[str, list[tuple[str, str]]] | None = None
        self._write: Callable[[bytes], object] | None = None
        self._closed = False
        scope = environ.get("asgi.scope") or {}
        probe = (scope.get("extensions") or {}).get("appliance.disconnected")
        self._gone: Callable[[], bool] = probe if callable(probe) else (lambda: False)
        self._iterable: Iterable[bytes] = owner.app(environ, self.start_response)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None:
            try:
                if self._write is not None:  # headers already sent: PEP 3333 says re-raise
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        self._pending = (status, list(headers))
        return self._write_body

    def _flush(self) -> Callable[[bytes], object]:
        if self._write is None:
            if self._pending is None:
                msg = "the WSGI app sent a body before calling start_response"
                raise RuntimeError(msg)
            status, headers = self._pending
            self._write = self._start(status, headers)
        return self._write

    def _write_body(self, data: bytes) -> None:
        if data:
            self._flush()(data)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._iterable:
            if self._gone():
                break  # the client is gone: stop now; a2wsgi calls close() next
            if chunk:
                self._flush()
                yield chunk
        if not self._gone():
            self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._owner._done()


class WsgiApp:
    """An ASGI app serving ``app`` (WSGI) on ``threads`` threads."""

    def __init__(self, app: Callable[..., Iterable[bytes]], threads: int) -> None:
        self.app = app
        self.threads = threads
        self._lock = threading.Lock()
        self._busy: dict[int, float] = {}
        # a2wsgi types the app with its own Environ/StartResponse protocols; ours is the same
        # callable shape with plain dicts.
        self._asgi = WSGIMiddleware(self._call, workers=threads)  # type: ignore[arg-type]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._asgi(scope, receive, send)

    def _call(self, environ: dict[str, Any], start_response: _Start) -> _Response:
        environ["wsgi.input_terminated"] = True
        environ["wsgi.file_wrapper"] = FileWrapper
        with self._lock:
            self._busy[threading.get_ident()] = time.monotonic()
        try:
            return _Response(self, environ, start_response)
        except BaseException:
            self._done()
            raise

    def _done(self) -> None:
        with self._lock:
            self._busy.pop(threading.get_ident(), None)

    def stuck_for(self, now: float) -> float:
        """Seconds every thread has been inside the app (0 while one is free)."""
        with self._lock:
            if len(self._busy) < self.threads:
                return 0.0
            return now - min(self._busy.values())
