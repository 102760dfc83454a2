"""Logging for the master and the workers: structlog events to journald, JSON lines or a console.

Every log call names a stable dotted event and passes facts as fields::

    log = get_logger()
    log.info("worker.exited", worker_id=2, pid=123, generation=1, exit_code=3, reason="boot failed")

Three outputs, picked by :func:`configure_logging` (``fmt="auto"`` chooses for you):

* ``journal``: one native journald entry per event, every field queryable
  (``journalctl -u appliance EVENT=worker.exited WORKER_ID=2``);
* ``json``: one JSON object per line (``ts``, ``level``, ``event``, then the fields);
* ``console``: structlog's aligned, human line; colours only on a terminal.

How the pieces fit, and why:

* The processor chain handed to structlog never changes; what it does is looked up at call
  time in one module-level :class:`_Active` value that :func:`configure_logging` swaps. So a
  logger created (or cached by structlog's ``cache_logger_on_first_use``) before a live
  log-level reload obeys the new level, and a worker that reconfigures after ``fork()``
  replaces all inherited state in one assignment.
* Level filtering is a method-level integer comparison (like
  ``make_filtering_bound_logger``, whose level is fixed at class creation and so cannot
  follow a live reload).
* Process-wide context (a worker binds ``worker_id``, ``pid``, ``generation`` once after fork)
  lives in a plain dict rather than a contextvar: an asyncio task copies the context when it
  is created, so a contextvar bound later would be missing from tasks that already exist.
  ``structlog.contextvars`` still works for per-request context.
* The stdlib root logger (uvicorn logs through ``logging``) is bridged by a small
  ``logging.Handler`` that feeds each record into the same chain, as event ``record.name``
  (``uvicorn.error``, ``uvicorn.access``) with the formatted text in ``message``. structlog's
  ``ProcessorFormatter`` was the other option; it produces a string, and the journal output
  needs the fields, not a string.
* Logging never raises into the caller: a failed journal send becomes a JSON line on the
  stream, a failed write is dropped, an unrenderable value is rendered with ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

import structlog
from structlog.contextvars import merge_contextvars
from structlog.dev import ConsoleRenderer, plain_traceback
from structlog.typing import EventDict, WrappedLogger

from appliance.journal import JournalSender, field_name, stderr_is_journal

__all__ = [
    "FORMATS",
    "LEVELS",
    "SYSLOG_IDENTIFIER",
    "bind_context",
    "clear_context",
    "configure_logging",
    "format_ts",
    "get_logger",
    "journal_fields",
    "reset_logging",
    "unbind_context",
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


def _json_default(value: object) -> object:
    return str(value)


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
    text = value if isinstance(value, str) else str(value)
    if not text or any(c in text for c in ' "=\n\t\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def _human_line(event_dict: Mapping[str, Any]) -> str:
    """``worker.exited worker_id=2 pid=123 exit_code=3 reason="boot failed"``.

    A ``message`` field (stdlib records carry one) is shown as ``event: message``, so
    ``journalctl``'s default view reads like the text uvicorn wrote.
    """
    head = str(event_dict.get("event", ""))
    message = event_dict.get("message")
    if isinstance(message, str):
        head = f"{head}: {message}"
    parts = [head]
    parts.extend(
        f"{key}={_logfmt_value(value)}"
        for key, value in event_dict.items()
        if key not in ("event", "exc_info") and not (key == "message" and isinstance(value, str))
    )
    return " ".join(parts)


def journal_fields(level: str, event_dict: Mapping[str, Any]) -> dict[str, object]:
    """The journal entry for one event (exposed for tests and the docs' examples)."""
    message = _human_line(event_dict)
    info = _exc_info(event_dict.get("exc_info"))
    if info is not None:
        message += "\n" + _format_exception(info)
    fields: dict[str, object] = {
        "MESSAGE": message,
        "PRIORITY": _PRIORITY[level],
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
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
            fields[name] = str(value)
    return fields


@dataclass(frozen=True, slots=True)
class _JsonOutput:
    stream: TextIO | None  # None: whatever sys.stderr is at write time

    def emit(self, level: str, event_dict: EventDict) -> None:
        _write_line(self.stream, _json_line(level, event_dict))


@dataclass(frozen=True, slots=True)
class _ConsoleOutput:
    stream: TextIO
    renderer: ConsoleRenderer

    def emit(self, level: str, event_dict: EventDict) -> None:
        record: dict[str, Any] = {"ts": format_ts(time.time_ns()), "level": level}
        record.update(event_dict)
        try:
            line = self.renderer(None, level, record)
        except Exception:  # noqa: BLE001  # never lose a line over a renderer quirk
            line = _json_line(level, event_dict)
        _write_line(self.stream, str(line))


@dataclass(frozen=True, slots=True)
class _JournalOutput:
    sender: JournalSender
    fallback: TextIO

    def emit(self, level: str, event_dict: EventDict) -> None:
        try:
            sent = self.sender.send(journal_fields(level, event_dict))
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


# --- the structlog side ----------------------------------------------------------------------


def _merge_process_context(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    if not _process_context:
        return event_dict
    merged = dict(_process_context)
    merged.update(event_dict)
    return merged


def _finalize(_logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
    """Last processor: hand the event to the sink together with the output active *now*."""
    level = method_name if method_name in _PRIORITY else "info"
    return (_active.output, level, event_dict), {}


class _Sink:
    """The wrapped logger structlog calls; every level method just emits."""

    __slots__ = ()

    @staticmethod
    def _emit(output: _Output, level: str, event_dict: EventDict) -> None:
        output.emit(level, event_dict)

    debug = info = warning = error = critical = msg = _emit


_SINK = _Sink()
_PROCESSORS: list[Any] = [_merge_process_context, merge_contextvars, _finalize]
"""The one chain every appliance logger holds. Its list identity never changes, which is what
structlog.testing.capture_logs() relies on when it swaps the contents for a capture."""


class _Logger(structlog.BoundLoggerBase):
    """A bound logger whose level check reads the live threshold on every call."""

    def debug(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.DEBUG:
            self._proxy_to_logger("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.INFO:
            self._proxy_to_logger("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.WARNING:
            self._proxy_to_logger("warning", event, **kw)

    warn = warning

    def error(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.ERROR:
            self._proxy_to_logger("error", event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        """Log at error level with the exception being handled."""
        kw.setdefault("exc_info", True)
        if _active.threshold <= logging.ERROR:
            self._proxy_to_logger("error", event, **kw)

    def critical(self, event: str, **kw: Any) -> None:
        if _active.threshold <= logging.CRITICAL:
            self._proxy_to_logger("critical", event, **kw)

    fatal = critical

    def log(self, level: int, event: str, **kw: Any) -> None:
        """Log at a stdlib numeric level (``logging.INFO``...)."""
        if level >= _active.threshold:
            self._proxy_to_logger(_level_name(level), event, **kw)


def get_logger(**initial_binds: Any) -> _Logger:
    """A bound logger on appliance's chain, e.g. ``get_logger(component="control")``.

    Independent of structlog's global configuration, so an application that configures
    structlog for itself inside a worker does not reroute appliance's own events.
    """
    return _Logger(_SINK, processors=_PROCESSORS, context=dict(initial_binds))


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


# --- stdlib bridge ---------------------------------------------------------------------------


class _StdlibBridge(logging.Handler):
    """Feeds stdlib records (uvicorn, asyncio, warnings) into the structlog chain."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self._log = get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"message": record.getMessage()}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info
            self._log.log(record.levelno, record.name, **fields)
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


def _install_structlog() -> None:
    """Point structlog's global configuration at our chain too, so ``structlog.get_logger()``
    elsewhere in the process (and ``structlog.testing.capture_logs``) shares it."""
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=_Logger,
        logger_factory=lambda *_args: _SINK,
        context_class=dict,
        cache_logger_on_first_use=True,
    )


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
        output = _JournalOutput(sender=sender, fallback=out)
    elif chosen == "console":
        renderer = ConsoleRenderer(
            colors=_isatty(out),
            exception_formatter=plain_traceback,
            timestamp_key="ts",
            sort_keys=False,
        )
        output = _ConsoleOutput(stream=out, renderer=renderer)
    else:
        output = _JsonOutput(stream=out)

    previous = _active
    _active = _Active(threshold=LEVELS[key], output=output, fmt=chosen, owned_journal=owned)
    if previous.owned_journal is not None:
        previous.owned_journal.close()
    _install_stdlib_bridge(LEVELS[key])
    logging.captureWarnings(True)
    _install_structlog()
    return chosen


def reset_logging() -> None:
    """Back to the import-time defaults (JSON on stderr at info, no stdlib bridge, no bound
    context). For tests, and for code that hands the process's logging to someone else."""
    global _active
    previous, _active = _active, _DEFAULT
    if previous.owned_journal is not None:
        previous.owned_journal.close()
    _install_stdlib_bridge(None)
    logging.captureWarnings(False)
    _process_context.clear()


_install_structlog()
