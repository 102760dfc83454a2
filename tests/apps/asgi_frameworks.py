"""Real ASGI frameworks for the process tests: a Starlette app and a FastAPI app.

A test that must know what the app did, or make it wait, does so through two kinds of named
rendezvous kept in the worker (so these tests run one worker: every request reaches the
process of the one before it):

* a *gate*, an ``asyncio.Event`` a request waits on and ``GET /release/{name}`` sets;
* a *note*, what the app saw (an exception's name, a close code), which ``GET /seen/{name}``
  answers once it is there (it waits for it, at most ``SEEN_WAIT_S``).

The app also logs what it notices through ``logging`` (logger ``asgi_frameworks``): the
worker forwards those records to the master's log stream, where a test can wait for them.

``starlette_app`` (behind a ``BaseHTTPMiddleware`` that stamps ``x-stamp: starlette`` on
every HTTP response):

* ``/state``: the pid that ran the lifespan startup (from ``request.state``), this
  process's pid and every startup this process ran;
* ``/stream/{name}``: a ``StreamingResponse`` whose second part waits for gate ``name``;
  ``/stream-forever/{name}``: one part, then a wait nobody ends: what ends it is note
  ``name`` and a log line;
* ``POST /body``, ``/stream-body``, ``/form``: length and SHA-256 of what ``request.body()``,
  ``request.stream()`` and ``request.form()`` (python-multipart) made of the upload;
* ``/background/{name}``: answers at once; its ``BackgroundTask`` waits for gate ``name``,
  then notes ``ran``;
* ``/file``: a ``FileResponse`` of the file named by ``$ASGI_FRAMEWORKS_FILE``;
* ``/boom``: raises (Starlette's ``ServerErrorMiddleware`` answers 500);
* ``/ws/{name}`` (WebSocket): echoes text and bytes; the text ``close`` makes the server close
  with 4001; the code of the client's close is note ``name``.

``fastapi_app``: ``POST /items`` (a pydantic model, echoed), ``/users/{name}``,
``/search?q=&limit=&tag=``, ``/me`` (a dependency on the ``x-user`` header), ``/conn`` (the
client's port, to tell connections apart), ``/hold/{name}`` (no answer until
``request.is_disconnected()`` says so; it logs both) and ``/ws/{room}`` (WebSocket). The
``/hold`` route is FastAPI's because behind a ``BaseHTTPMiddleware`` Starlette's
``is_disconnected()`` never sees a disconnect (the middleware's receive wrapper loses the
message in the cancelled scope ``is_disconnected()`` calls it in; under uvicorn too,
Starlette discussion #2094).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, WebSocket
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket as StarletteWebSocket
from starlette.websockets import WebSocketDisconnect

#: Longest wait of an app-side rendezvous: a test that forgets to release a gate fails (it
#: gets the answer without the part it waited for) instead of hanging the worker.
GATE_WAIT_S = 30.0
SEEN_WAIT_S = 10.0

_log = logging.getLogger("asgi_frameworks")
_gates: dict[str, asyncio.Event] = {}
_notes: dict[str, Any] = {}
_noted: dict[str, asyncio.Event] = {}
#: The pid of every lifespan startup this process ran: one per worker, or a bug.
_startups: list[int] = []


def _gate(name: str) -> asyncio.Event:
    return _gates.setdefault(name, asyncio.Event())


def _note(name: str, value: Any) -> None:
    _notes[name] = value
    _noted.setdefault(name, asyncio.Event()).set()


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


# --- Starlette -------------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    _startups.append(os.getpid())
    _log.info("lifespan startup pid=%d", os.getpid())
    yield {"startup_pid": os.getpid()}


class _Stamp(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-stamp"] = "starlette"
        return response


async def _state(request: Request) -> Response:
    return JSONResponse(
        {"startup_pid": request.state.startup_pid, "pid": os.getpid(), "startups": _startups}
    )


async def _release(request: Request) -> Response:
    _gate(request.path_params["name"]).set()
    return PlainTextResponse("released")


async def _seen(request: Request) -> Response:
    name = request.path_params["name"]
    await _wait(_noted.setdefault(name, asyncio.Event()), SEEN_WAIT_S)
    return JSONResponse({"seen": _notes.get(name)})


async def _stream(request: Request) -> Response:
    gate = _gate(request.path_params["name"])

    async def parts() -> AsyncIterator[str]:
        yield "first\n"
        if await _wait(gate, GATE_WAIT_S):
            yield "second\n"

    return StreamingResponse(parts(), media_type="text/plain")


async def _stream_forever(request: Request) -> Response:
    name = request.path_params["name"]

    async def parts() -> AsyncIterator[str]:
        yield "first\n"
        try:
            await asyncio.Event().wait()
        except BaseException as exc:  # what ends the stream is what the test asks about
            _note(name, type(exc).__name__)
            _log.info("stream %s ended by %s", name, type(exc).__name__)
            raise
        yield "never\n"

    return StreamingResponse(parts(), media_type="text/plain")


def _digest(data: bytes) -> dict[str, Any]:
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def _body(request: Request) -> Response:
    return JSONResponse(_digest(await request.body()))


async def _stream_body(request: Request) -> Response:
    sha, length, chunks = hashlib.sha256(), 0, 0
    async for chunk in request.stream():
        sha.update(chunk)
        length += len(chunk)
        chunks += 1
    return JSONResponse({"length": length, "sha256": sha.hexdigest(), "chunks": chunks})


async def _form(request: Request) -> Response:
    async with request.form() as form:
        upload = form["file"]
        assert isinstance(upload, UploadFile)
        data = await upload.read()
        return JSONResponse(
            {
                "file": {
                    "filename": upload.filename,
                    "content_type": upload.content_type,
                    **_digest(data),
                },
                "note": form["note"],
            }
        )


async def _background(request: Request) -> Response:
    name = request.path_params["name"]

    async def later() -> None:
        if await _wait(_gate(name), GATE_WAIT_S):
            _note(name, "ran")

    return PlainTextResponse("scheduled", background=BackgroundTask(later))


async def _file(request: Request) -> Response:
    return FileResponse(os.environ["ASGI_FRAMEWORKS_FILE"], media_type="application/octet-stream")


async def _boom(request: Request) -> Response:
    raise RuntimeError("boom from a Starlette route")


async def _ws(websocket: StarletteWebSocket) -> None:
    name = websocket.path_params["name"]
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            text = message.get("text")
            if text == "close":
                await websocket.close(code=4001, reason="asked to")
                return
            if text is not None:
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect as exc:
        _note(name, exc.code)


starlette_app = Starlette(
    routes=[
        Route("/state", _state),
        Route("/release/{name}", _release),
        Route("/seen/{name}", _seen),
        Route("/stream/{name}", _stream),
        Route("/stream-forever/{name}", _stream_forever),
        Route("/body", _body, methods=["POST"]),
        Route("/stream-body", _stream_body, methods=["POST"]),
        Route("/form", _form, methods=["POST"]),
        Route("/background/{name}", _background),
        Route("/file", _file),
        Route("/boom", _boom),
        WebSocketRoute("/ws/{name}", _ws),
    ],
    middleware=[Middleware(_Stamp)],
    lifespan=_lifespan,
)


# --- FastAPI ---------------------------------------------------------------------------------


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


fastapi_app = FastAPI()


@fastapi_app.post("/items")
async def create_item(item: Item) -> Item:
    return item


@fastapi_app.get("/users/{name}")
async def user(name: str, request: Request) -> dict[str, str]:
    return {"name": name, "raw_path": request.scope["raw_path"].decode("ascii")}


@fastapi_app.get("/search")
async def search(
    q: str, limit: int = 10, tag: Annotated[list[str] | None, Query()] = None
) -> dict[str, Any]:
    return {"q": q, "limit": limit, "tag": tag or []}


def _current_user(x_user: Annotated[str | None, Header()] = None) -> str:
    if x_user is None:
        raise HTTPException(status_code=401, detail="who are you?")
    return x_user


@fastapi_app.get("/me")
async def me(who: Annotated[str, Depends(_current_user)]) -> dict[str, str]:
    return {"user": who}


@fastapi_app.get("/conn")
async def conn(request: Request) -> dict[str, Any]:
    assert request.client is not None
    return {"client_port": request.client.port}


@fastapi_app.get("/hold/{name}")
async def hold(name: str, request: Request) -> str:
    _log.info("hold %s waiting", name)
    deadline = asyncio.get_running_loop().time() + GATE_WAIT_S
    # is_disconnected() never blocks: an app asks it between its own steps, as here.
    while not await request.is_disconnected():
        if asyncio.get_running_loop().time() > deadline:
            _log.info("hold %s still connected", name)
            return "still connected"
        await asyncio.sleep(0.01)
    _log.info("hold %s disconnected", name)
    return "nobody reads this"


@fastapi_app.websocket("/ws/{room}")
async def room(websocket: WebSocket, room: str) -> None:
    await websocket.accept()
    await websocket.send_text(f"joined {room}")
    text = await websocket.receive_text()
    await websocket.send_text(f"{room}: {text}")
    await websocket.close()
