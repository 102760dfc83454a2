"""A WSGI app for the WSGI process tests: chunked bodies, endless streams, exc_info, files.

``/seen`` reports what earlier requests on this worker recorded (which streams were closed).
"""

import json
import os
import sys
import threading
import time

_CLOSED = []
_LOCK = threading.Lock()
_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wsgiecho.py")


def _json(start_response, doc, status="200 OK"):
    body = json.dumps(doc).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class _Stream:
    """``while True: yield``, recording its close()."""

    def __init__(self, name, pause):
        self.name = name
        self.pause = pause

    def __iter__(self):
        while True:
            if self.pause:
                time.sleep(self.pause)
            yield b"data: tick\n\n"

    def close(self):
        with _LOCK:
            _CLOSED.append(self.name)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/seen":
        with _LOCK:
            return _json(start_response, {"pid": os.getpid(), "closed": list(_CLOSED)})
    if path == "/body":
        data = environ["wsgi.input"].read()
        return _json(
            start_response,
            {
                "terminated": environ.get("wsgi.input_terminated"),
                "content_length": environ.get("CONTENT_LENGTH"),
                "body": data.decode(),
            },
        )
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return _Stream(environ["QUERY_STRING"], pause=0.0)
    if path == "/error":
        try:
            raise ValueError("handled by the app")
        except ValueError:
            start_response("200 OK", [("Content-Type", "text/plain")])
            body = b"error page\n"
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
                sys.exc_info(),
            )
            return [body]
    if path == "/file":
        return_file = open(_FILE, "rb")  # noqa: SIM115 - the file wrapper closes it
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](return_file, 1024)
    if path == "/block":
        time.sleep(float(environ["QUERY_STRING"] or "60"))
    return _json(start_response, {"pid": os.getpid(), "path": path})
