"""Logging for the master and the workers: events to journald, JSON lines or a console.

Every log call names a stable dotted event and passes facts as fields::

    log = get_logger()
    log.info("worker.exited", worker_id=2, pid=123, generation=1, exit_code=3, reason="boot failed")

Three outputs, picked by :func:`configure_logging` (``fmt="auto"`` chooses for you):

* ``journal``: one native journald entry per event, every field queryable
  (``journalctl -u appliance EVENT=worker.exited WORKER_ID=2``);
* ``json``: one JSON object per line (``ts``, ``level``, ``event``, then the fields);
* ``console``: an aligned, human line (:func:`_console_line`); colours only on a terminal.

How the pieces fit, and why:

* Standard library only. A worker hosts the application, soon from the application's own
  virtualenv, so nothing appliance uses for itself may occupy a name in the application's
  module namespace: an application that pins its own structlog must get its own, configured
  its own way. Importing this module pulls in neither sdnotify nor pydantic either
  (``tests/unit/test_log.py`` checks all three in a fresh interpreter). The one global this
  module touches is its own handler on the stdlib root logger (the bridge below).
* What a logger does is looked up at call time in one module-level :class:`_Active` value
  that :func:`configure_logging` swaps. So a logger created before a live log-level reload
  obeys the new level, and a worker that reconfigures after ``fork()`` replaces all inherited
  state in one assignment.
* Level filtering is an integer comparison in each method against that live threshold, made
  before any event dict is built, so a filtered ``debug`` call costs almost nothing.
* An event's fields, by precedence: the call's own keywords, then the logger's
  :meth:`BoundLogger.bind` fields, then the process-wide context. Per-request context only
  fills in names none of those set, so request-scoped code cannot relabel a worker's
  ``worker_id`` or ``generation``. The order of the fields is process-wide context first,
  then the logger's, then the call's, then the per-request ones: the JSON and journal views
  both keep it.
* Process-wide context (a worker binds ``worker_id``, ``pid``, ``generation`` once after fork)
  lives in a plain dict rather than a contextvar: an asyncio task copies the context when it
  is created, so a contextvar bound later would be missing from tasks that already exist.
  That copying is exactly what per-request context wants, so :func:`bound_contextvars` and
  friends keep theirs in one :class:`contextvars.ContextVar` holding a mapping that is
  replaced on every change, never mutated: a task keeps the values it started with, and a
  bind in one task never shows up in another.
* The stdlib root logger (uvicorn logs through ``logging``) is bridged by a small
  ``logging.Handler`` that feeds each record into the same path, as event ``record.name``
  (``uvicorn.error``, ``uvicorn.access``) with the formatted text in ``message``. A
  ``logging.Formatter`` was the other option; it produces a string, and the journal output
  needs the fields, not a string.
* :func:`capture_logs` diverts events into lists for tests, after the level check and with
  every context merged, so a test sees exactly the fields an output would have written.
* Logging never raises into the caller: a failed journal send becomes a JSON line on the
  stream, a failed write is dropped, an unrenderable value is rendered with ``repr``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, TextIO

from appliance.journal import JournalSender, field_name, stderr_is_journal

__all__ = [
    "FORMATS",
    "LEVELS",
    "SYSLOG_IDENTIFIER",
    "BoundLogger",
    "bind_context",
    "bind_contextvars",
    "bound_contextvars",
    "capture_logs",
    "clear_context",
    "clear_contextvars",
    "configure_logging",
    "format_ts",
    "get_logger",
    "journal_fields",
    "reset_logging",
    "stdlib_event",
    "syslog_identifier",
    "unbind_context",
    "unbind_contextvars",
]

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "console", "json", "journal")
SYSLOG_IDENTIFIER = "appliance"

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
# Fields the journal output sets itself; an event field with the same name gets an F_ prefix.
_RESERVED_JOURNAL_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT"})

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def format_ts(unix_ns: int) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    secs, rem = divmod(unix_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rem // 1_000_000:03d}Z"


def _level_name(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


def _exc_info(value: object) -> _ExcInfo | None:
    """Normalise an ``exc_info`` field (True, an exception, or a sys.exc_info() tuple)."""
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and value[0] is not None:
        return value
    if value is True:
        info = sys.exc_info()
        return info if info[0] is not None else None
    return None


def _format_exception(info: _ExcInfo) -> str:
    return "".join(traceback.format_exception(*info)).rstrip("\n")


def _safe_str(value: object) -> str:
    """``str()``, else ``repr()``: a value whose ``__str__`` raises must not cost the event."""
    try:
        return str(value)
    except Exception:  # noqa: BLE001  # the value's bug, not the caller's
        try:
            return repr(value)
        except Exception:  # noqa: BLE001
            return f"<unprintable {type(value).__qualname__}>"


def _json_default(value: object) -> object:
    return _safe_str(value)


# --- outputs ---------------------------------------------------------------------------------


def _write_line(stream: TextIO | None, line: str) -> None:
    """Write and flush one line, never raising. Flushed per line: workers leave through
    ``os._exit()``, which would drop anything still sitting in a buffer."""
    out = sys.stderr if stream is None else stream
    try:
        out.write(line + "\n")
        out.flush()
    except (OSError, ValueError):  # closed or broken stream: nowhere left to complain
        pass


def _json_line(level: str, event_dict: Mapping[str, Any]) -> str:
    record: dict[str, Any] = {
        "ts": format_ts(time.time_ns()),
        "level": level,
        "event": event_dict.get("event", ""),
    }
    for key, value in event_dict.items():
        if key == "exc_info":
            info = _exc_info(value)
            if info is not None:
                record["exception"] = _format_exception(info)
        elif key not in record:
            record[key] = value
    try:
        return json.dumps(record, default=_json_default, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # e.g. a circular structure
        fallback = {key: repr(value) for key, value in record.items()}
        fallback["render_error"] = repr(exc)
        return json.dumps(fallback, ensure_ascii=False, separators=(",", ":"))


def _logfmt_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = value if isinstance(value, str) else _safe_str(value)
    if not text or any(c in text for c in ' "=\n\t\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def _head(event_dict: Mapping[str, Any]) -> str:
    """The event name, or ``event: message`` for an event with a text ``message`` (stdlib
    records carry one), so a uvicorn line reads like the text uvicorn wrote."""
    head = str(event_dict.get("event", ""))
    message = event_dict.get("message")
    if isinstance(message, str):
        head = f"{head}: {message}"
    return head


def _tail(event_dict: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``key=value`` pairs that follow :func:`_head`, in the event's order."""
    return [
        (key, _logfmt_value(value))
        for key, value in event_dict.items()
        if key not in ("event", "exc_info") and not (key == "message" and isinstance(value, str))
    ]


def _human_line(event_dict: Mapping[str, Any]) -> str:
    """``worker.exited worker_id=2 pid=123 exit_code=3 reason="boot failed"``."""
    parts = [_head(event_dict)]
    parts.extend(f"{key}={value}" for key, value in _tail(event_dict))
    return " ".join(parts)


def syslog_identifier(env: Mapping[str, str]) -> str:
    """``appliance``, or ``appliance@NAME`` for an instance (``APPLIANCE_INSTANCE=NAME``, which
    ``appliance --instance NAME`` sets for itself and every process it starts)."""
    instance = env.get("APPLIANCE_INSTANCE", "")
    return f"{SYSLOG_IDENTIFIER}@{instance}" if instance else SYSLOG_IDENTIFIER


def journal_fields(
    level: str, event_dict: Mapping[str, Any], identifier: str = SYSLOG_IDENTIFIER
) -> dict[str, object]:
    """The journal entry for one event (exposed for tests and the docs' examples)."""
    message = _human_line(event_dict)
    info = _exc_info(event_dict.get("exc_info"))
    if info is not None:
        message += "\n" + _format_exception(info)
    fields: dict[str, object] = {
        "MESSAGE": message,
        "PRIORITY": _PRIORITY[level],
        "SYSLOG_IDENTIFIER": identifier,
        "EVENT": event_dict.get("event", ""),
    }
    has_worker = "worker_id" in event_dict
    for key, value in event_dict.items():
        if key in ("event", "exc_info") or (key == "message" and isinstance(value, str)):
            continue
        if key == "pid" and has_worker:
            name = "WORKER_PID"
        else:
            name = field_name(key)
            if name in _RESERVED_JOURNAL_FIELDS:
                name = "F_" + name
        if value is None or isinstance(value, (str, bytes, int, float)):
            fields[name] = value  # encode_entry renders these (bool as true/false)
        elif isinstance(value, (dict, list, tuple)):
            fields[name] = json.dumps(value, default=_json_default, ensure_ascii=False)
        else:
            fields[name] = _safe_str(value)
    return fields


# The console line: timestamp, [level], the event padded to a column, then key=value fields.
_LEVEL_WIDTH = max(len(name) for name in _PRIORITY)  # "critical"
_EVENT_WIDTH = 30  # most event names fit, so the fields of consecutive lines line up
_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_KEY_STYLE = "\x1b[36m"  # cyan
_VALUE_STYLE = "\x1b[35m"  # magenta
_LEVEL_STYLE = {
    "debug": "\x1b[34m",  # blue
    "info": "\x1b[32m",  # green
    "warning": "\x1b[33m",  # yellow
    "error": "\x1b[31m",  # red
    "critical": "\x1b[1;31m",  # bold red
}


def _console_line(ts: str, level: str, event_dict: Mapping[str, Any], *, colors: bool) -> str:
    """``2025-01-31T12:00:00.123Z [warning ] worker.hung    worker_id=2 last_heartbeat_s=12.5``.

    Padding is measured on the plain text, so the columns line up with or without colours.
    A traceback follows on the next lines, uncoloured, as Python prints it: it is the part
    most likely to be pasted into a bug report.
    """

    def paint(text: str, style: str) -> str:
        return f"{style}{text}{_RESET}" if colors else text

    head = _head(event_dict)
    tail = _tail(event_dict)
    parts = [paint(ts, _DIM), "[" + paint(level.ljust(_LEVEL_WIDTH), _LEVEL_STYLE[level]) + "]"]
    if tail:  # no trailing blanks on a line without fields
        parts.append(paint(head, _BOLD) + " " * (_EVENT_WIDTH - len(head)))
        parts.extend(
            paint(key, _KEY_STYLE) + "=" + paint(value, _VALUE_STYLE) for key, value in tail
        )
    else:
        parts.append(paint(head, _BOLD))
    line = " ".join(parts)
    info = _exc_info(event_dict.get("exc_info"))
    if info is not None:
        line += "\n" + _format_exception(info)
    return line


@dataclass(frozen=True, slots=True)
class _JsonOutput:
    stream: TextIO | None  # None: whatever sys.stderr is at write time

    def emit(self, level: str, event_dict: Mapping[str, Any]) -> None:
        _write_line(self.stream, _json_line(level, event_dict))


@dataclass(frozen=True, slots=True)
class _ConsoleOutput:
    stream: TextIO
    colors: bool

    def emit(self, level: str, event_dict: Mapping[str, Any]) -> None:
        try:
            line = _console_line(format_ts(time.time_ns()), level, event_dict, colors=self.colors)
        except Exception:  # noqa: BLE001  # a value whose str() raises must not lose the line
            line = _json_line(level, event_dict)
        _write_line(self.stream, line)


@dataclass(frozen=True, slots=True)
class _JournalOutput:
    sender: JournalSender
    fallback: TextIO
    identifier: str = SYSLOG_IDENTIFIER

    def emit(self, level: str, event_dict: Mapping[str, Any]) -> None:
        try:
            sent = self.sender.send(journal_fields(level, event_dict, self.identifier))
        except Exception:  # noqa: BLE001  # a bad value must not lose the event
            sent = False
        if not sent:
            _write_line(self.fallback, _json_line(level, event_dict))


_Output = _JsonOutput | _ConsoleOutput | _JournalOutput


@dataclass(frozen=True, slots=True)
class _Active:
    """Everything :func:`configure_logging` decides, swapped in as one value."""

    threshold: int
    output: _Output
    fmt: str
    owned_journal: JournalSender | None = None


_DEFAULT = _Active(threshold=logging.INFO, output=_JsonOutput(stream=None), fmt="json")
_active: _Active = _DEFAULT
_process_context: dict[str, Any] = {}
_NO_REQUEST_CONTEXT: Mapping[str, Any] = MappingProxyType({})
_request_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "appliance.log.request_context", default=_NO_REQUEST_CONTEXT
)
_captures: list[list[dict[str, Any]]] = []
"""Open :func:`capture_logs` blocks, innermost last; while one is open it gets every event."""


# --- loggers ---------------------------------------------------------------------------------


def _emit(level: str, binds: Mapping[str, Any], event: str, kw: Mapping[str, Any]) -> None:
    """Build the event dict (precedence and order as in the module docstring) and hand it to
    the output active *now*, or to the innermost capture."""
    event_dict = dict(_process_context)
    event_dict.update(binds)
    event_dict.update(kw)
    event_dict["event"] = event
    for key, value in _request_context.get().items():
        event_dict.setdefault(key, value)
    if _captures:
        event_dict["log_level"] = level
        _captures[-1].append(event_dict)
    else:
        _active.output.emit(level, event_dict)


class BoundLogger:
    """A logger carrying fields of its own; each level method reads the live threshold.

    Immutable: :meth:`bind` and :meth:`unbind` return a new logger, so a logger handed to
    other code cannot grow fields behind its owner's back.
    """

    __slots__ = ("_binds",)

    def __init__(self, binds: Mapping[str, Any]) -> None:
        self._binds: Mapping[str, Any] = MappingProxyType(dict(binds))

    def __repr__(self) -> str:
        return f"<BoundLogger {dict(self._binds)!r}>"

    def bind(self, **kv: Any) -> BoundLogger:
        """A logger with these fields added to (or replacing) this one's."""
        return BoundLogger({**self._binds, **kv})

    def unbind(self, *keys: str) -> BoundLogger:
        """A logger without these fields (missing keys are ignored)."""
        return BoundLogger({key: value for key, value in self._binds.items() if key not in keys})

    def debug(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.DEBUG:
            _emit("debug", self._binds, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.INFO:
            _emit("info", self._binds, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.WARNING:
            _emit("warning", self._binds, event, kw)

    warn = warning

    def error(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.ERROR:
            _emit("error", self._binds, event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """Log at error level with the exception being handled."""
        kw.setdefault("exc_info", True)
        if _active.threshold <= logging.ERROR:
            _emit("error", self._binds, event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.CRITICAL:
            _emit("critical", self._binds, event, kw)

    fatal = critical

    def log(self, level: int, event: str, **kw: Any) -> None:
        """Log at a stdlib numeric level (``logging.INFO``...)."""
        if level >= _active.threshold:
            _emit(_level_name(level), self._binds, event, kw)


def get_logger(**initial_binds: Any) -> BoundLogger:
    """A logger for appliance's own events, e.g. ``get_logger(component="control")``.

    Cheap (no registry, nothing cached), so ``get_logger().info(...)`` at the call site is fine.
    """
    return BoundLogger(initial_binds)


# --- context ---------------------------------------------------------------------------------


def bind_context(**kv: Any) -> None:
    """Add fields to every event this process logs from now on (all loggers, all tasks)."""
    _process_context.update(kv)


def unbind_context(*keys: str) -> None:
    """Remove process-wide fields (missing keys are ignored)."""
    for key in keys:
        _process_context.pop(key, None)


def clear_context() -> None:
    """Drop all process-wide fields; a worker calls it right after fork, before binding its own."""
    _process_context.clear()


def bind_contextvars(**kv: Any) -> None:
    """Add per-request fields to the current context (this task or thread, and whatever it
    starts from now on)."""
    _request_context.set({**_request_context.get(), **kv})


def unbind_contextvars(*keys: str) -> None:
    """Remove per-request fields from the current context (missing keys are ignored)."""
    current = _request_context.get()
    if any(key in current for key in keys):
        _request_context.set({key: value for key, value in current.items() if key not in keys})


def clear_contextvars() -> None:
    """Drop all per-request fields of the current context."""
    _request_context.set(_NO_REQUEST_CONTEXT)


@contextmanager
def bound_contextvars(**kv: Any) -> Iterator[None]:
    """Per-request fields for the duration of a ``with`` block::

        with log.bound_contextvars(request_id=rid):
            ...

    On exit these keys get back the values they had before (or go away); other keys bound
    inside the block stay. That is a key-by-key restore rather than ``ContextVar.reset``,
    which would also undo those other binds, and which raises when the block's end runs in a
    different context than its start (a generator resumed elsewhere).
    """
    before = _request_context.get()
    saved = {key: before[key] for key in kv if key in before}
    bind_contextvars(**kv)
    try:
        yield
    finally:
        restored = {key: value for key, value in _request_context.get().items() if key not in kv}
        restored.update(saved)
        _request_context.set(restored)


@contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """Collect this process's events instead of writing them, for tests::

        with capture_logs() as captured:
            acceptor._on_readable()
        assert captured[0]["event"] == "worker.accept_failed"

    Each event is a dict: the event's fields with all context merged, ``event``, and
    ``log_level`` (``debug`` ... ``critical``; ``exception()`` gives ``error``). ``exc_info``
    stays as it was passed (``True`` from ``exception()``). Events below the configured level
    are not captured, as they would not have been written. Captures nest; the innermost one
    gets the events. Process-wide, like the outputs, so events from other threads (and the
    stdlib bridge) land in it too.
    """
    captured: list[dict[str, Any]] = []
    _captures.append(captured)
    try:
        yield captured
    finally:
        for index in range(len(_captures) - 1, -1, -1):
            if _captures[index] is captured:  # by identity: two empty lists compare equal
                del _captures[index]
                break


# --- stdlib bridge ---------------------------------------------------------------------------


# uvicorn calls its server logger "uvicorn.error" although it logs its whole life cycle there at
# info. Its known lines get event names of their own, by message template (``record.msg``,
# stable across uvicorn versions); the life-cycle lines repeat what appliance's own
# worker.* events say, so they are debug. docs/events.md, "From the serving engine".
_UVICORN_LINES: Mapping[str, tuple[str, int]] = MappingProxyType(
    {
        "Started server process [%d]": ("uvicorn.started", logging.DEBUG),
        "Finished server process [%d]": ("uvicorn.finished", logging.DEBUG),
        "Shutting down": ("uvicorn.shutting_down", logging.DEBUG),
        "Waiting for application startup.": ("app.startup_begin", logging.DEBUG),
        "Application startup complete.": ("app.startup_complete", logging.DEBUG),
        "Waiting for application shutdown.": ("app.shutdown_begin", logging.DEBUG),
        "Application shutdown complete.": ("app.shutdown_complete", logging.DEBUG),
        "ASGI 'lifespan' protocol appears unsupported.": ("app.lifespan_unsupported", logging.INFO),
        "Exception in ASGI application\n": ("app.exception", logging.ERROR),
        "Exception in ASGI application": ("app.exception", logging.ERROR),
    }
)
_STDLIB_EVENTS: Mapping[str, str] = MappingProxyType(
    {
        "uvicorn.error": "uvicorn.server",  # any other line of uvicorn's server logger
        "uvicorn.access": "uvicorn.access",
    }
)


def stdlib_event(record: logging.LogRecord) -> tuple[str, int]:
    """The event name and level of a stdlib record: a known uvicorn line by its template, any
    other record of uvicorn's server logger as ``uvicorn.server``, and every other logger
    (uvicorn.access, asyncio, the application's) under its own name, at its own level."""
    if record.name == "uvicorn.error" and isinstance(record.msg, str):
        known = _UVICORN_LINES.get(record.msg)
        if known is not None:
            return known
    return _STDLIB_EVENTS.get(record.name, record.name), record.levelno


class _StdlibBridge(logging.Handler):
    """Feeds stdlib records (uvicorn, asyncio, warnings) into appliance's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self._log = get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"message": record.getMessage()}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info
            event, level = stdlib_event(record)
            self._log.log(level, event, **fields)
        except Exception:  # noqa: BLE001  # the stdlib convention for handlers
            self.handleError(record)


def _install_stdlib_bridge(threshold: int | None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    if threshold is not None:
        root.addHandler(_StdlibBridge())
        root.setLevel(threshold)


# --- configuration ---------------------------------------------------------------------------


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # StringIO raises io.UnsupportedOperation
        return None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def resolve_stream(setting: str, pid: int) -> str:
    """``log.stream`` for this master: ``auto`` is stdout as PID 1 (a container), else stderr
    (pure)."""
    if setting == "auto":
        return "stdout" if pid == 1 else "stderr"
    return setting


def named_stream(name: str) -> TextIO:
    """The stream ``resolve_stream`` named, looked up now (tests replace sys.stdout/stderr)."""
    return sys.stdout if name == "stdout" else sys.stderr


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    journal: JournalSender | None = None,
) -> str:
    """Set level and output for this process; returns the format in effect.

    ``fmt="auto"``: journal when *stream* (default stderr) is the journal stream systemd set up
    (JOURNAL_STREAM), else console when it is a terminal, else JSON lines. Safe to call again at
    any time: the master does on a live log-level reload, a worker does right after fork.
    *journal* injects the sender (tests); otherwise one is created and owned here, and closed
    by the next call.
    """
    global _active  # the one swap point, see the module docstring
    key = level.lower()
    if key not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = sys.stderr if stream is None else stream
    chosen = fmt
    if fmt == "auto":
        fd = _fileno(out)
        env_map = os.environ if env is None else env
        if fd is not None and stderr_is_journal(env_map, fd):
            chosen = "journal"
        elif _isatty(out):
            chosen = "console"
        else:
            chosen = "json"

    owned: JournalSender | None = None
    output: _Output
    if chosen == "journal":
        sender = journal
        if sender is None:
            sender = owned = JournalSender()
        identifier = syslog_identifier(os.environ if env is None else env)
        output = _JournalOutput(sender=sender, fallback=out, identifier=identifier)
    elif chosen == "console":
        output = _ConsoleOutput(stream=out, colors=_isatty(out))
    else:
        output = _JsonOutput(stream=out)

    previous = _active
    _active = _Active(threshold=LEVELS[key], output=output, fmt=chosen, owned_journal=owned)
    if previous.owned_journal is not None:
        previous.owned_journal.close()
    _install_stdlib_bridge(LEVELS[key])
    logging.captureWarnings(True)
    return chosen


def reset_logging() -> None:
    """Back to the import-time defaults (JSON on stderr at info, no stdlib bridge, no bound
    context: process-wide, and per-request in the calling context). For tests, and for code
    that hands the process's logging to someone else."""
    global _active
    previous, _active = _active, _DEFAULT
    if previous.owned_journal is not None:
        previous.owned_journal.close()
    _install_stdlib_bridge(None)
    logging.captureWarnings(False)
    _process_context.clear()
    _request_context.set(_NO_REQUEST_CONTEXT)
