"""An ASGI app for the HTTP and WebSocket process tests: it reports what it saw.

* ``/ws`` (WebSocket): echoes every text and bytes message; on ``websocket.disconnect`` it
  records the code it was given (``/seen`` reports it).
* ``/echo`` (HTTP): reads the whole body, then answers with the method, target, version, the
  headers as the app saw them *after* the body (trailers must not show up there), and the
  body's length.
* ``/seen``: what earlier requests on this worker recorded (WebSocket disconnect codes,
  bodies that ended in a disconnect).
* Every HTTP answer and, on a WebSocket, the first message when the path is ``/ws-client``
  include ``client``, ``server`` and ``scheme`` from the scope (PROXY protocol tests).
* ``wsgi_app``: a WSGI app answering ``REMOTE_ADDR``, ``REMOTE_PORT``, ``SERVER_NAME``,
  ``SERVER_PORT`` and ``wsgi.url_scheme`` as JSON.
"""

from __future__ import annotations

import json
import os

_SEEN: dict[str, list[object]] = {"ws_disconnect": [], "http_disconnect": []}


async def _json(send, status: int, doc: object) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _websocket(scope, receive, send) -> None:
    message = await receive()
    assert message["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    if scope["path"] == "/ws-client":
        await send({"type": "websocket.send", "text": json.dumps(_addresses(scope))})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            _SEEN["ws_disconnect"].append(message.get("code"))
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


def _addresses(scope) -> dict[str, object]:
    return {"client": scope.get("client"), "server": scope.get("server"), "scheme": scope["scheme"]}


def wsgi_app(environ, start_response):
    body = json.dumps(
        {
            "pid": os.getpid(),
            **{
                key: environ.get(key)
                for key in ("REMOTE_ADDR", "REMOTE_PORT", "SERVER_NAME", "SERVER_PORT")
            },
            "scheme": environ["wsgi.url_scheme"],
        }
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await _websocket(scope, receive, send)
        return
    path = scope["path"]
    if path == "/seen":
        await _json(send, 200, {"pid": os.getpid(), **_SEEN, **_addresses(scope)})
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            _SEEN["http_disconnect"].append(path)
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await _json(
        send,
        200,
        {
            "pid": os.getpid(),
            "method": scope["method"],
            "path": path,
            "http_version": scope["http_version"],
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_bytes": size,
            **_addresses(scope),
        },
    )
