"""WSGI variants: ``hello`` (short body naming the pid) and ``cpu`` (fixed ~2 ms of work)."""

import os

from bench.apps.work import cpu_work


def _respond(start_response, body: bytes) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def hello(environ, start_response) -> list[bytes]:
    return _respond(start_response, b"hello from pid=%d\n" % os.getpid())


def cpu(environ, start_response) -> list[bytes]:
    x = cpu_work()
    return _respond(start_response, b"cpu %d from pid=%d\n" % (x, os.getpid()))
