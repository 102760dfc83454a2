"""Real WSGI frameworks for the process tests: a Flask app and a Django app.

* ``flask_app``: ``/`` hello; ``/path/<rest>`` what Flask made of the path, the remote
  address and every environ key starting with ``HTTP_``; ``/upload`` the length of
  ``request.get_data()``; ``/stream`` a streamed response (``stream_with_context``) whose
  second part waits until the file named by the query's ``gate`` exists, so a test can prove
  the first part reached it before the app produced the second.
* ``django_app``: Django configured in this module, ``/hello`` and ``/echo?x=...``.
"""

from __future__ import annotations

import os
import time

import django
from django.conf import settings
from flask import Flask, Response, request, stream_with_context

flask_app = Flask(__name__)


@flask_app.get("/")
def hello() -> str:
    return "hello from flask"


@flask_app.get("/path/<path:rest>")
def path(rest: str) -> dict[str, object]:
    headers = {k: v for k, v in request.environ.items() if k.startswith("HTTP_")}
    return {"path": request.path, "rest": rest, "remote": request.remote_addr, "headers": headers}


@flask_app.post("/upload")
def upload() -> dict[str, int]:
    return {"length": len(request.get_data())}


@flask_app.get("/stream")
def stream() -> Response:
    gate = request.args["gate"]

    def parts():
        yield "first\n"
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield "second\n"

    return Response(stream_with_context(parts()), mimetype="text/plain")


settings.configure(
    DEBUG=False,
    SECRET_KEY="test-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
)
django.setup()

from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse, JsonResponse
from django.urls import path as route


def _hello(request):
    return HttpResponse("hello from django")


def _echo(request):
    return JsonResponse({"x": request.GET.get("x"), "path": request.path})


urlpatterns = [route("hello", _hello), route("echo", _echo)]
django_app = get_wsgi_application()
