"""An ASGI app for the HTTP conformance test (appliance and uvicorn on the same bytes).

It routes on the path; every answer is fixed by the request alone, so two servers that
behave alike send the same bytes (apart from ``date``):

* ``/echo`` (and every path that begins so): reads the whole body, answers JSON with the
  scope fields and the body;
  ``server`` is ``host:port`` with a five-digit port so the test can blank it without
  changing the length.
* ``/fixed``: a constant body with a content-length, whatever the method (HEAD's model).
* ``/chunked``: one body without a content-length; ``/stream``: three ``more_body`` parts;
  ``/empty``: no content-length and an empty body.
* ``/status/N``: status N with an empty body (204, 304, or one without a reason phrase).
* ``/close``: the app itself sends ``connection: close``; ``/many-headers``: 50 fields;
  ``/mixed-case``: field names with capitals.
* ``/raise-before``, ``/raise-after``, ``/return-before``, ``/return-incomplete``,
  ``/too-long``, ``/too-short``, ``/bad-header``: the app breaks the protocol.
* ``/no-read``: answers without reading the request body.
"""

from __future__ import annotations

import json

FIXED = b"fixed body\n"


async def _start(send, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None):
    await send({"type": "http.response.start", "status": status, "headers": headers or []})


async def _answer(send, body: bytes, status: int = 200, headers=None) -> None:
    length = [(b"content-length", str(len(body)).encode())]
    await _start(send, status, [*(headers or []), *length])
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


def _scope_doc(scope, body: bytes) -> dict[str, object]:
    client = scope.get("client")
    server = scope.get("server")
    return {
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": scope["raw_path"].decode("latin-1"),
        "query_string": scope["query_string"].decode("latin-1"),
        "http_version": scope["http_version"],
        "scheme": scope["scheme"],
        "root_path": scope["root_path"],
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "client": client[0] if client else None,
        "server": f"{server[0]}:{server[1]:05d}" if server else None,
        "asgi": scope["asgi"],
        "keys": sorted(scope),
        "body": body.decode("latin-1"),
    }


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    path = scope["path"]
    if path.startswith("/echo"):
        body = await _read_body(receive)
        if body is not None:
            doc = json.dumps(_scope_doc(scope, body)).encode()
            await _answer(send, doc, headers=[(b"content-type", b"application/json")])
    elif path == "/fixed":
        await _answer(send, FIXED)
    elif path == "/no-read":
        await _answer(send, b"not read\n")
    elif path == "/chunked":
        await _start(send)
        await send({"type": "http.response.body", "body": b"one part\n"})
    elif path == "/stream":
        await _start(send)
        for part in (b"first\n", b"", b"second part\n"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"last\n"})
    elif path == "/empty":
        await _start(send)
        await send({"type": "http.response.body", "body": b""})
    elif path.startswith("/status/"):
        await _start(send, int(path.removeprefix("/status/")))
        await send({"type": "http.response.body", "body": b""})
    elif path == "/close":
        await _answer(send, b"closing\n", headers=[(b"connection", b"close")])
    elif path == "/many-headers":
        await _answer(send, b"many\n", headers=[(b"x-h-%d" % i, b"v%d" % i) for i in range(50)])
    elif path == "/mixed-case":
        await _answer(send, b"mixed\n", headers=[(b"X-Mixed-Case", b"Value"), (b"ETag", b'"1"')])
    elif path == "/raise-before":
        raise RuntimeError("raised before http.response.start")
    elif path == "/raise-after":
        await _start(send)
        await send({"type": "http.response.body", "body": b"partial\n", "more_body": True})
        raise RuntimeError("raised after http.response.start")
    elif path == "/return-before":
        return
    elif path == "/return-incomplete":
        await _start(send)
        await send({"type": "http.response.body", "body": b"partial\n", "more_body": True})
    elif path == "/too-long":
        await _start(send, headers=[(b"content-length", b"5")])
        await send({"type": "http.response.body", "body": b"0123456789"})
    elif path == "/too-short":
        await _start(send, headers=[(b"content-length", b"10")])
        await send({"type": "http.response.body", "body": b"01234"})
    elif path == "/bad-header":
        await _answer(send, b"bad\n", headers=[(b"x-bad", b"a\r\nx-injected: 1")])
    elif path == "/bad-header-name":
        await _answer(send, b"bad\n", headers=[(b"x-injected: 1\r\nx-bad", b"a")])
    else:
        await _answer(send, b"no such route\n", status=404)
