"""The control protocol: every message ``appliance status|reload|scale|drain|undrain`` and the
master exchange.

Frame format
------------
A unix stream socket carrying newline-delimited JSON: each message is one JSON object encoded
as UTF-8 on one line, ended by ``\\n``. The limits, and who enforces them:

* a request line is at most :data:`MAX_LINE` (64 KiB); the server answers a longer one with an
  error and keeps the connection;
* a reply line is at most :data:`MAX_REPLY_LINE` (1 MiB, the server's out-buffer limit), which
  holds because every string in a reply is cut to :data:`MAX_TEXT` characters
  (:func:`bound_text`) when it is encoded;
* the client reads at most :data:`MAX_CLIENT_LINE` (4 MiB) per line and gives up on a longer
  one, so a confused peer cannot make it buffer without end.

Messages (stable: clients in the field depend on them)
------------------------------------------------------
* A request is one object with a ``"cmd"`` string and its arguments beside it::

      {"cmd": "status"}
      {"cmd": "reload"}
      {"cmd": "scale", "workers": 4}
      {"cmd": "drain"}                  {"cmd": "drain", "maint": true}
      {"cmd": "undrain"}

* Every request gets exactly one *final* reply, an object with a boolean ``"ok"``::

      {"ok": true, "status": {...}}                                 (status_reply)
      {"ok": true, "reload": {"generation": 3, "message": "..."}}   (reload_ok_reply)
      {"ok": true, "workers": 4}                                    (scale_reply)
      {"ok": true, "drain": {"agent": "drain", "message": "..."}}   (drain_reply)
      {"ok": false, "error": "reason"}                              (error_reply)

* Before its final reply a command may send any number of ``{"progress": {...}}`` lines;
  reload sends ``{"progress": {"generation", "replaced", "total", "message"}}`` as each worker
  is replaced (:func:`reload_progress`). A line without ``"ok"`` is never final.
* An unknown command, malformed JSON or a line over the limit gets
  ``{"ok": false, "error": "..."}`` and the connection stays usable.
* ``drain`` and ``undrain`` are answered after the master's state changed, so the reply's
  ``agent`` line is what the next agent-check (and readiness request) gets.
* Requests on one connection are answered in order; a client may send the next request after
  the final reply of the previous one.

This module is pure (no sockets): :mod:`.server` and :mod:`.client` move the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMMANDS",
    "MAX_CLIENT_LINE",
    "MAX_LINE",
    "MAX_REPLY_LINE",
    "MAX_TEXT",
    "BadRequest",
    "ControlError",
    "Request",
    "bound_text",
    "decode_reply",
    "drain_reply",
    "encode_line",
    "encode_request",
    "error_reply",
    "is_final",
    "ok_reply",
    "parse_request",
    "progress_reply",
    "reload_ok_reply",
    "reload_progress",
    "scale_reply",
    "status_reply",
]

MAX_LINE = 64 * 1024
"""Longest request line accepted; requests are tiny, so anything longer is a confused client."""
MAX_REPLY_LINE = 1 << 20
"""The server's out-buffer limit, hence the longest reply line it can ever queue."""
MAX_TEXT = 64 * 1024
"""Longest string (in characters) a reply carries. JSON escapes a character in at most 12
bytes (a surrogate pair as two ``\\uXXXX``), so one such string stays under 1 MiB on the wire;
a reload error of several MiB (every problem of a broken config) is cut, not fatal."""
MAX_CLIENT_LINE = 4 << 20
"""Longest reply line the client reads: 4 times what a sane server sends, then it gives up."""
COMMANDS = frozenset({"status", "reload", "scale", "drain", "undrain"})


class ControlError(Exception):
    """The control socket could not be set up, or a conversation on it failed (one line)."""


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request: the command and its arguments (everything but ``cmd``)."""

    cmd: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A line that is not a valid request; answer it with ``error_reply(bad.error)``."""

    error: str


def parse_request(line: bytes) -> Request | BadRequest:
    """Validate one request line (without or with its trailing newline).

    Never raises: a line nested too deeply for the JSON decoder (``[[[[...``, well within
    :data:`MAX_LINE`) is malformed like any other, not an exception in the master's loop.
    """
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return BadRequest(f"malformed JSON: {exc}")
    if not isinstance(obj, dict):
        return BadRequest(f"expected a JSON object, got {type(obj).__name__}")
    cmd = obj.pop("cmd", None)
    if not isinstance(cmd, str):
        return BadRequest('missing "cmd" (a string: one of ' + ", ".join(sorted(COMMANDS)) + ")")
    if cmd not in COMMANDS:
        return BadRequest(f"unknown cmd {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    if cmd == "scale":
        workers = obj.get("workers")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            return BadRequest(f'scale: "workers" must be an integer >= 1 (got {workers!r})')
        if set(obj) != {"workers"}:
            return BadRequest(f"scale: unexpected arguments {sorted(set(obj) - {'workers'})}")
    elif cmd == "drain":
        if not isinstance(obj.get("maint", False), bool):
            return BadRequest(f'drain: "maint" must be true or false (got {obj["maint"]!r})')
        if set(obj) - {"maint"}:
            return BadRequest(f"drain: unexpected arguments {sorted(set(obj) - {'maint'})}")
    elif obj:
        return BadRequest(f"{cmd}: takes no arguments (got {sorted(obj)})")
    return Request(cmd=cmd, args=obj)


def encode_request(cmd: str, **args: Any) -> bytes:
    """The request line for *cmd* (the client's side of :func:`parse_request`)."""
    return json.dumps({"cmd": cmd, **args}, separators=(",", ":")).encode() + b"\n"


# --- replies ---------------------------------------------------------------------------------


def bound_text(text: str, limit: int = MAX_TEXT) -> str:
    """*text* cut to at most *limit* characters (at least 40), saying how much was cut.

    A cut text ends in ``... (N more bytes)``, N counted in UTF-8, and is itself at most
    *limit* characters long, so bounding twice changes nothing.
    """
    if len(text) <= limit:
        return text
    head = text[: max(0, limit - _SUFFIX_ROOM)]
    more = len(text[len(head) :].encode("utf-8", "surrogatepass"))
    return f"{head}... ({more} more bytes)"


_SUFFIX_ROOM = 40
"""Room for ``... (N more bytes)`` with N up to 20 digits."""


def _bounded(obj: object) -> object:
    """A copy of *obj* with every string cut by :func:`bound_text` (the encoder's safety net)."""
    if isinstance(obj, str):
        return bound_text(obj)
    if isinstance(obj, Mapping):
        return {(bound_text(k) if isinstance(k, str) else k): _bounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_bounded(v) for v in obj]
    return obj


def _default(obj: object) -> str:
    return bound_text(str(obj))


def encode_line(obj: Mapping[str, Any]) -> bytes:
    """One reply as its wire line: compact JSON, every string bounded, ``\\n`` at the end.

    Non-JSON values (a ``Path``, an enum) are sent as their ``str()``. A reply built by the
    functions below always fits :data:`MAX_REPLY_LINE`; a hand-built one with thousands of
    long strings might not, and the server then reports the connection broken.
    """
    return json.dumps(_bounded(obj), separators=(",", ":"), default=_default).encode() + b"\n"


def ok_reply(**fields: Any) -> dict[str, Any]:
    """Final success reply, e.g. ``ok_reply(workers=4)``; prefer the typed builders below."""
    return {"ok": True, **fields}


def error_reply(error: str) -> dict[str, Any]:
    """Final failure reply; an over-long *error* is cut (see :func:`bound_text`)."""
    return {"ok": False, "error": bound_text(str(error))}


def progress_reply(**fields: Any) -> dict[str, Any]:
    """A non-final progress line, e.g. ``progress_reply(replaced=1, total=4, generation=3)``."""
    return {"progress": fields}


def status_reply(status: Mapping[str, Any]) -> dict[str, Any]:
    """Final reply to ``status``: the master's status document (see ``policy.snapshot``)."""
    return {"ok": True, "status": dict(status)}


def reload_ok_reply(generation: int, message: str) -> dict[str, Any]:
    """Final reply to a ``reload`` that finished: the generation now serving and what changed."""
    return {"ok": True, "reload": {"generation": generation, "message": bound_text(message)}}


def reload_progress(generation: int, replaced: int, total: int, message: str) -> dict[str, Any]:
    """Progress of a rolling reload: *replaced* of *total* workers run *generation* now."""
    return {
        "progress": {
            "generation": generation,
            "replaced": replaced,
            "total": total,
            "message": bound_text(message),
        }
    }


def scale_reply(workers: int) -> dict[str, Any]:
    """Final reply to ``scale``: the new target pool size."""
    return {"ok": True, "workers": workers}


def drain_reply(agent: str, message: str) -> dict[str, Any]:
    """Final reply to ``drain`` / ``undrain``: the agent-check line now, and what changed."""
    return {"ok": True, "drain": {"agent": bound_text(agent), "message": bound_text(message)}}


# --- the client's side -----------------------------------------------------------------------


def decode_reply(line: bytes) -> dict[str, Any]:
    """One reply line as an object; :class:`ValueError` with a short reason when it is not one.

    The reason never quotes more than 80 bytes of the line, so a confused peer cannot flood
    the operator's terminal.
    """
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"not UTF-8: {_preview(line)}") from None
    except (ValueError, RecursionError):
        raise ValueError(f"not JSON: {_preview(line)}") from None
    if not isinstance(obj, dict):
        # One exception type for every undecodable line: the caller reports them all alike.
        raise ValueError(  # noqa: TRY004
            f"expected a JSON object, got {type(obj).__name__}: {_preview(line)}"
        )
    return obj


def is_final(reply: Mapping[str, Any]) -> bool:
    """True for the reply that ends a request (it has ``"ok"``); progress lines are not."""
    return "ok" in reply


def _preview(line: bytes) -> str:
    data = line.rstrip(b"\n")
    shown = repr(data[:80])
    return shown if len(data) <= 80 else f"{shown}... ({len(data)} bytes)"
