"""A WSGI app for the process tests."""

import json
import os


def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "wsgi": True, "path": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
