"""Reports the versions of packages the app sees (for the app-environment tests)."""

from __future__ import annotations

import json
import os
import sys

import pydantic  # the app's own (a fake in the test venv), never appliance's

VERSION = "v1"
IMPORT_PID = os.getpid()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    doc = {
        "pydantic": getattr(pydantic, "VERSION", None),
        "pydantic_file": getattr(pydantic, "__file__", None),
        "structlog_loaded": "structlog" in sys.modules,
        "sdnotify_loaded": "sdnotify" in sys.modules,
        "appliance_config_loaded": "appliance.config.schema" in sys.modules,
        "env": os.environ.get("MYAPP_SETTING"),
        "virtual_env": os.environ.get("VIRTUAL_ENV"),
        "version": VERSION,
        "pid": os.getpid(),
        "import_pid": IMPORT_PID,
    }
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def wsgi(environ, start_response):  # type: ignore[no-untyped-def]
    body = json.dumps({"pydantic": getattr(pydantic, "VERSION", None), "wsgi": True}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
