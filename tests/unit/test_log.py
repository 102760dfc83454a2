"""Logging outputs (JSON, console, journal), level changes at run time, the stdlib bridge."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import log as applog
from appliance.journal import JournalSender
from appliance.log import (
    bind_context,
    bind_contextvars,
    bound_contextvars,
    capture_logs,
    clear_context,
    clear_contextvars,
    configure_logging,
    format_ts,
    get_logger,
    unbind_context,
    unbind_contextvars,
)

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    applog.reset_logging()
    yield
    applog.reset_logging()


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def _boom() -> None:
    raise RuntimeError("worker failed to import app")


# --- JSON ------------------------------------------------------------------------------------


def test_json_line_shape() -> None:
    buf = io.StringIO()
    assert configure_logging("info", "json", stream=buf) == "json"
    get_logger().info(
        "worker.exited", worker_id=2, pid=123, generation=1, exit_code=3, reason="boot failed"
    )
    (line,) = buf.getvalue().splitlines()
    record = json.loads(line)
    assert list(record)[:3] == ["ts", "level", "event"]
    assert TS_RE.match(record["ts"])
    assert record == {
        "ts": record["ts"],
        "level": "info",
        "event": "worker.exited",
        "worker_id": 2,
        "pid": 123,
        "generation": 1,
        "exit_code": 3,
        "reason": "boot failed",
    }


def test_json_exception_is_a_string_field() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    try:
        _boom()
    except RuntimeError:
        get_logger().exception("worker.boot_failed", worker_id=1)
    (record,) = _lines(buf)
    assert record["level"] == "error"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert record["exception"].endswith("RuntimeError: worker failed to import app")
    assert "exc_info" not in record


def test_json_unserializable_values_are_stringified() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    get_logger().info("config.loaded", path=Path("/etc/appliance/appliance.toml"), names={"a"})
    (record,) = _lines(buf)
    assert record["path"] == "/etc/appliance/appliance.toml"
    assert record["names"] == "{'a'}"


def test_format_ts() -> None:
    assert format_ts(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123Z"
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"


# --- choosing the format ---------------------------------------------------------------------


def test_auto_picks_json_for_a_pipe_or_buffer() -> None:
    assert configure_logging(stream=io.StringIO(), env={}) == "json"


def test_auto_picks_console_for_a_tty() -> None:
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert configure_logging(stream=tty, env={}) == "console"
    finally:
        os.close(leader)
        os.close(follower)


def test_auto_picks_journal_when_stream_is_the_journal(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        sender = JournalSender(str(tmp_path / "no-journal.sock"))
        assert configure_logging(stream=stream, env=env, journal=sender) == "journal"
        env_other = {"JOURNAL_STREAM": "1:1"}
        assert configure_logging(stream=stream, env=env_other, journal=sender) == "json"


def test_invalid_level_and_format() -> None:
    with pytest.raises(ValueError, match="log level 'loud' is not one of debug, info"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="log format 'xml' is not one of auto"):
        configure_logging("info", "xml")


# --- console ---------------------------------------------------------------------------------


def test_console_line_without_colors_off_tty() -> None:
    buf = io.StringIO()
    assert configure_logging("info", "console", stream=buf) == "console"
    get_logger().warning("worker.hung", worker_id=2, last_heartbeat_s=12.5)
    line = buf.getvalue()
    assert "\x1b[" not in line
    assert "[warning" in line
    assert "worker.hung" in line
    assert "worker_id=2" in line
    assert "last_heartbeat_s=12.5" in line
    assert TS_RE.match(line.split(" ", 1)[0])


def test_console_renders_traceback() -> None:
    buf = io.StringIO()
    configure_logging("info", "console", stream=buf)
    try:
        _boom()
    except RuntimeError:
        get_logger().exception("worker.boot_failed")
    assert "RuntimeError: worker failed to import app" in buf.getvalue()
    first, *rest = buf.getvalue().splitlines()
    assert first.endswith("[error   ] worker.boot_failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: worker failed to import app"


def test_console_layout() -> None:
    buf = io.StringIO()
    configure_logging("debug", "console", stream=buf)
    get_logger().warning("worker.hung", worker_id=2, reason="no heartbeat", ok=False, gone=None)
    get_logger().critical("master.stopping")
    get_logger().debug("a.very.long.event.name.that.passes.the.column", n=1)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    lines = buf.getvalue().splitlines()
    tails = [line.split(" ", 1)[1] for line in lines]
    assert all(TS_RE.match(line.split(" ", 1)[0]) for line in lines)
    column = " " * (30 - len("worker.hung"))
    assert tails == [
        f'[warning ] worker.hung{column} worker_id=2 reason="no heartbeat" ok=false gone=null',
        "[critical] master.stopping",  # no trailing blanks without fields
        "[debug   ] a.very.long.event.name.that.passes.the.column n=1",
        "[debug   ] uvicorn.started: Started server process [42]",
    ]


def test_console_colors_on_a_tty() -> None:
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            configure_logging("info", "console", stream=tty)
            get_logger().error("worker.exited", exit_code=3)
        line = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "\x1b[31merror   \x1b[0m" in line
    assert "\x1b[36mexit_code\x1b[0m=\x1b[35m3\x1b[0m" in line
    plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
    assert plain.split(" ", 1)[1].rstrip() == "[error   ] worker.exited" + " " * 17 + " exit_code=3"


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("str")

    def __repr__(self) -> str:
        return "<Unprintable>"


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_value_whose_str_raises_is_shown_with_repr(fmt: str) -> None:
    buf = io.StringIO()
    configure_logging("info", fmt, stream=buf)
    get_logger().info("odd.value", value=_Unprintable())
    assert "<Unprintable>" in buf.getvalue()


# --- journal ---------------------------------------------------------------------------------


def _decode(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = newline + 1
        else:
            (size,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
            key, value = line, data[newline + 9 : newline + 9 + size]
            pos = newline + 9 + size + 1
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def fake_journal(tmp_path: Path) -> Iterator[tuple[JournalSender, socket.socket]]:
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    sender = JournalSender(path)
    yield sender, server
    sender.close()
    server.close()


def test_journal_fields(fake_journal: tuple[JournalSender, socket.socket]) -> None:
    sender, server = fake_journal
    buf = io.StringIO()
    assert configure_logging("info", "journal", stream=buf, journal=sender) == "journal"
    bind_context(worker_id=2, pid=123, generation=1)
    get_logger().warning("worker.exited", exit_code=3, reason="boot failed", ok=False)
    entry = _decode(server.recv(65536))
    assert entry["EVENT"] == "worker.exited"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "appliance"
    assert entry["WORKER_ID"] == "2"
    assert entry["WORKER_PID"] == "123"
    assert entry["GENERATION"] == "1"
    assert entry["EXIT_CODE"] == "3"
    assert entry["REASON"] == "boot failed"
    assert entry["OK"] == "false"
    assert "PID" not in entry
    assert entry["MESSAGE"] == (
        'worker.exited worker_id=2 pid=123 generation=1 exit_code=3 reason="boot failed" ok=false'
    )
    assert buf.getvalue() == ""


def test_journal_traceback_is_multiline_message(
    fake_journal: tuple[JournalSender, socket.socket],
) -> None:
    sender, server = fake_journal
    configure_logging("info", "journal", stream=io.StringIO(), journal=sender)
    try:
        _boom()
    except RuntimeError:
        get_logger().exception("worker.boot_failed", worker_id=0)
    entry = _decode(server.recv(65536))
    assert entry["PRIORITY"] == "3"
    first, *rest = entry["MESSAGE"].splitlines()
    assert first == "worker.boot_failed worker_id=0"
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: worker failed to import app"


def test_journal_master_pid_and_reserved_names(
    fake_journal: tuple[JournalSender, socket.socket],
) -> None:
    sender, server = fake_journal
    configure_logging("debug", "journal", stream=io.StringIO(), journal=sender)
    get_logger().debug("master.started", pid=99, priority="high", workers=[0, 1])
    entry = _decode(server.recv(65536))
    assert entry["PRIORITY"] == "7"
    assert entry["PID"] == "99"
    assert entry["F_PRIORITY"] == "high"
    assert entry["WORKERS"] == "[0, 1]"


def test_journal_failure_falls_back_to_json(tmp_path: Path) -> None:
    buf = io.StringIO()
    sender = JournalSender(str(tmp_path / "absent.sock"))
    configure_logging("info", "journal", stream=buf, journal=sender)
    get_logger().error("master.crashed", reason="x")
    (record,) = _lines(buf)
    assert record["event"] == "master.crashed"
    assert record["level"] == "error"


# --- levels and live reconfiguration ---------------------------------------------------------


def test_level_filtering_and_live_change() -> None:
    buf = io.StringIO()
    early = get_logger(component="policy")  # created before any configuration
    derived = early.bind(slot=1)  # and one derived from it, also before
    configure_logging("info", "json", stream=buf)
    early.debug("policy.tick")
    derived.debug("policy.tick")
    early.info("policy.step")
    derived.info("policy.step")
    configure_logging("debug", "json", stream=buf)
    early.debug("policy.tick", n=1)
    derived.debug("policy.tick", n=2)
    configure_logging("error", "json", stream=buf)
    early.warning("dropped")
    early.error("kept")
    events = [(r["level"], r["event"], r.get("n")) for r in _lines(buf)]
    assert events == [
        ("info", "policy.step", None),
        ("info", "policy.step", None),
        ("debug", "policy.tick", 1),
        ("debug", "policy.tick", 2),
        ("error", "kept", None),
    ]
    assert _lines(buf)[0]["component"] == "policy"
    assert _lines(buf)[1]["slot"] == 1


def test_every_level_method_and_numeric_levels() -> None:
    configure_logging("debug", "json", stream=io.StringIO())
    log = get_logger()
    with capture_logs() as captured:
        log.debug("a")
        log.info("b")
        log.warning("c")
        log.warn("c2")  # noqa: G010  # the alias is part of the logger's API
        log.error("d")
        log.critical("e")
        log.fatal("e2")
        log.log(logging.WARNING + 5, "f")  # between levels: the lower name
        log.log(5, "g")  # below DEBUG: below every threshold, so never written
    assert [(e["log_level"], e["event"]) for e in captured] == [
        ("debug", "a"),
        ("info", "b"),
        ("warning", "c"),
        ("warning", "c2"),
        ("error", "d"),
        ("critical", "e"),
        ("critical", "e2"),
        ("warning", "f"),
    ]
    configure_logging("info", "json", stream=io.StringIO())
    with capture_logs() as captured:
        log.log(logging.DEBUG, "g")
        log.log(logging.INFO, "h")
    assert [e["event"] for e in captured] == ["h"]


def test_bind_and_unbind_return_new_loggers() -> None:
    base = get_logger(component="control")
    child = base.bind(client="cli", component="control.server")
    bare = child.unbind("client", "absent")
    with capture_logs() as captured:
        base.info("a")
        child.info("b", client="override")
        bare.info("c")
    assert captured == [
        {"component": "control", "event": "a", "log_level": "info"},
        {"component": "control.server", "client": "override", "event": "b", "log_level": "info"},
        {"component": "control.server", "event": "c", "log_level": "info"},
    ]
    assert "control" in repr(base)


def test_reconfigure_switches_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = get_logger()
    configure_logging("info", "json", stream=first)
    log.info("a")
    configure_logging("info", "json", stream=second)
    log.info("b")
    assert [r["event"] for r in _lines(first)] == ["a"]
    assert [r["event"] for r in _lines(second)] == ["b"]


# --- context ---------------------------------------------------------------------------------


def test_process_context_and_contextvars() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    log = get_logger()
    bind_context(worker_id=3, generation=2)
    with bound_contextvars(request_id="r1"):
        log.info("request.slow", generation=5)
    unbind_context("generation")
    log.info("after.unbind")
    clear_context()
    log.info("after.clear")
    first, second, third = _lines(buf)
    assert first["worker_id"] == 3
    assert first["generation"] == 5  # call-site fields win over bound context
    assert first["request_id"] == "r1"
    assert second["worker_id"] == 3 and "generation" not in second
    assert "worker_id" not in third


def test_context_reaches_asyncio_tasks_created_earlier() -> None:
    import asyncio

    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)

    async def main() -> None:
        started = asyncio.Event()
        go = asyncio.Event()

        async def serve() -> None:
            started.set()
            await go.wait()
            get_logger().info("engine.serving")

        task = asyncio.create_task(serve())
        await started.wait()
        bind_context(worker_id=7)  # bound after the task was created
        go.set()
        await task

    asyncio.run(main())
    (record,) = _lines(buf)
    assert record["worker_id"] == 7


def test_field_precedence_and_order() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    bind_context(worker_id=1, pid=10, generation=2)
    log = get_logger(component="engine", pid=11)
    with bound_contextvars(request_id="r1", worker_id=99, component="request"):
        log.info("request.done", generation=3, status=200)
    (record,) = _lines(buf)
    # The call beats the logger's binds, which beat process context; per-request context
    # only fills in names nobody else set.
    assert list(record.items()) == [
        ("ts", record["ts"]),
        ("level", "info"),
        ("event", "request.done"),
        ("worker_id", 1),
        ("pid", 11),
        ("generation", 3),
        ("component", "engine"),
        ("status", 200),
        ("request_id", "r1"),
    ]


def test_contextvars_bind_unbind_clear() -> None:
    log = get_logger()
    with capture_logs() as captured:
        bind_contextvars(request_id="r1", peer="10.0.0.1")
        log.info("a")
        unbind_contextvars("peer", "absent")
        log.info("b")
        clear_contextvars()
        log.info("c")
    assert captured == [
        {"event": "a", "request_id": "r1", "peer": "10.0.0.1", "log_level": "info"},
        {"event": "b", "request_id": "r1", "log_level": "info"},
        {"event": "c", "log_level": "info"},
    ]


def test_bound_contextvars_restores_only_its_own_keys() -> None:
    log = get_logger()
    bind_contextvars(request_id="outer")
    with capture_logs() as captured:
        with bound_contextvars(request_id="inner", route="/a"):
            bind_contextvars(user="u1")  # bound inside the block, kept after it
            log.info("inside")
        log.info("after")
    assert captured == [
        {
            "event": "inside",
            "request_id": "inner",
            "route": "/a",
            "user": "u1",
            "log_level": "info",
        },
        {"event": "after", "request_id": "outer", "user": "u1", "log_level": "info"},
    ]


def test_bound_contextvars_restores_on_error() -> None:
    with pytest.raises(RuntimeError), bound_contextvars(request_id="r1"):
        _boom()
    with capture_logs() as captured:
        get_logger().info("after")
    assert captured == [{"event": "after", "log_level": "info"}]


def test_contextvars_stay_in_their_task_and_thread() -> None:
    import asyncio

    log = get_logger()

    async def handle(request_id: str, started: asyncio.Event, go: asyncio.Event) -> None:
        with bound_contextvars(request_id=request_id):
            started.set()
            await go.wait()
            log.info("request.done")

    async def main() -> None:
        go = asyncio.Event()
        started = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(handle(f"r{i}", started[i], go)) for i in range(2)]
        for event in started:
            await event.wait()  # both bound before either logs
        go.set()
        await asyncio.gather(*tasks)
        log.info("main.done")

    def in_thread() -> None:
        bind_contextvars(request_id="t1")  # a thread starts from an empty context
        log.info("thread.done")

    with capture_logs() as captured:
        asyncio.run(main())
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        log.info("test.done")
    assert sorted((e["event"], e.get("request_id")) for e in captured) == [
        ("main.done", None),
        ("request.done", "r0"),
        ("request.done", "r1"),
        ("test.done", None),
        ("thread.done", "t1"),
    ]


def test_reset_logging_clears_both_contexts() -> None:
    bind_context(worker_id=1)
    bind_contextvars(request_id="r1")
    applog.reset_logging()
    with capture_logs() as captured:
        get_logger().info("fresh")
    assert captured == [{"event": "fresh", "log_level": "info"}]


# --- capture_logs ----------------------------------------------------------------------------


def test_capture_logs_sees_appliance_events() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    with capture_logs() as captured:
        get_logger().info("worker.ready", worker_id=1)
    assert captured == [{"event": "worker.ready", "worker_id": 1, "log_level": "info"}]
    assert buf.getvalue() == ""  # captured instead of written
    get_logger().info("written")
    assert [r["event"] for r in _lines(buf)] == ["written"]


def test_capture_logs_merges_context_and_follows_the_level() -> None:
    configure_logging("warning", "json", stream=io.StringIO())
    bind_context(worker_id=2, generation=1)
    with capture_logs() as captured, bound_contextvars(request_id="r1"):
        get_logger().info("below.level")
        get_logger(component="engine").warning("engine.slow", duration_s=1.5)
    assert captured == [
        {
            "worker_id": 2,
            "generation": 1,
            "component": "engine",
            "duration_s": 1.5,
            "event": "engine.slow",
            "request_id": "r1",
            "log_level": "warning",
        }
    ]


def test_capture_logs_exceptions_and_stdlib_records() -> None:
    configure_logging("info", "json", stream=io.StringIO())
    with capture_logs() as captured:
        try:
            _boom()
        except RuntimeError:
            get_logger().exception("worker.boot_failed")
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    first, second = captured
    assert first["log_level"] == "error"
    assert first["exc_info"] is True
    assert second == {
        "message": "Invalid HTTP request received.",
        "event": "uvicorn.server",
        "log_level": "warning",
    }


def test_capture_logs_nest() -> None:
    with capture_logs() as outer:
        get_logger().info("a")
        with capture_logs() as inner, capture_logs() as innermost:
            get_logger().info("b")
        get_logger().info("c")
    assert [e["event"] for e in outer] == ["a", "c"]
    assert inner == []
    assert [e["event"] for e in innermost] == ["b"]
    assert applog._captures == []


# --- stdlib ----------------------------------------------------------------------------------


def test_stdlib_records_are_routed() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    bind_context(worker_id=1)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)  # debug now
    logging.getLogger("uvicorn.error").info("Uvicorn running on unix socket %s", "/run/a.sock")
    logging.getLogger("uvicorn.access").debug("dropped at info")
    try:
        _boom()
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application\n")
    logging.getLogger("myapp.orders").info("order %d", 7)
    first, second, third = _lines(buf)
    assert first["event"] == "uvicorn.server"
    assert first["level"] == "info"
    assert first["message"] == "Uvicorn running on unix socket /run/a.sock"
    assert first["worker_id"] == 1
    assert second["event"] == "app.exception"
    assert second["level"] == "error"
    assert third["event"] == "myapp.orders" and third["message"] == "order 7"
    assert second["exception"].endswith("RuntimeError: worker failed to import app")


def test_stdlib_level_follows_reconfiguration() -> None:
    buf = io.StringIO()
    configure_logging("warning", "json", stream=buf)
    logging.getLogger("uvicorn.error").info("hidden")
    configure_logging("debug", "json", stream=buf)
    logging.getLogger("uvicorn.error").debug("shown")
    bridges = [h for h in logging.getLogger().handlers if type(h).__name__ == "_StdlibBridge"]
    assert len(bridges) == 1
    assert [r["message"] for r in _lines(buf)] == ["shown"]


def test_stdlib_in_journal_message(fake_journal: tuple[JournalSender, socket.socket]) -> None:
    sender, server = fake_journal
    configure_logging("info", "journal", stream=io.StringIO(), journal=sender)
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    entry = _decode(server.recv(65536))
    assert entry["EVENT"] == "uvicorn.server"
    assert entry["MESSAGE"] == "uvicorn.server: Invalid HTTP request received."
    assert entry["PRIORITY"] == "4"
    assert "F_MESSAGE" not in entry


def test_broken_stream_never_raises() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    buf.close()
    get_logger().info("still.fine")


# --- what importing appliance.log brings along -----------------------------------------------


def test_import_pulls_in_no_structlog_sdnotify_or_pydantic() -> None:
    """A worker's module namespace belongs to the app (soon from its own virtualenv): an app
    that pins its own structlog must get its own, so appliance's logging must not import it,
    nor sdnotify or pydantic, even when they are installed."""
    check = (
        "import appliance.log, sys; "
        "assert 'structlog' not in sys.modules and 'sdnotify' not in sys.modules "
        "and 'pydantic' not in sys.modules, "
        "sorted({'structlog', 'sdnotify', 'pydantic'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
    # Still true once logging is configured and used, stdlib bridge included.
    use = (
        "import io, logging, sys; from appliance import log; "
        "log.configure_logging('debug', 'console', stream=io.StringIO()); "
        "log.get_logger().info('a', n=1); logging.getLogger('x').info('b'); "
        "assert not {'structlog', 'sdnotify', 'pydantic'} & set(sys.modules), sys.modules"
    )
    subprocess.run([sys.executable, "-c", use], check=True, timeout=60)


def test_uvicorn_lines_have_event_names_and_levels() -> None:
    def event(name: str, level: int, msg: str) -> tuple[str, int]:
        return applog.stdlib_event(logging.LogRecord(name, level, __file__, 1, msg, None, None))

    assert event("uvicorn.error", logging.INFO, "Application startup complete.") == (
        "app.startup_complete", logging.DEBUG)
    assert event("uvicorn.error", logging.INFO, "ASGI 'lifespan' protocol appears unsupported.") == (
        "app.lifespan_unsupported", logging.INFO)
    assert event("uvicorn.error", logging.WARNING, "Invalid HTTP request received.") == (
        "uvicorn.server", logging.WARNING)
    assert event("uvicorn.access", logging.INFO, "%s - %s") == ("uvicorn.access", logging.INFO)
    assert event("myapp", logging.ERROR, "x") == ("myapp", logging.ERROR)


def test_instance_journal_identifier(fake_journal: tuple[JournalSender, socket.socket]) -> None:
    sender, server = fake_journal
    env = {"JOURNAL_STREAM": "", "APPLIANCE_INSTANCE": "site-a"}
    assert applog.syslog_identifier(env) == "appliance@site-a"
    assert applog.syslog_identifier({}) == "appliance"
    configure_logging("info", "journal", stream=io.StringIO(), journal=sender, env=env)
    get_logger().info("master.ready")
    assert _decode(server.recv(65536))["SYSLOG_IDENTIFIER"] == "appliance@site-a"


def test_log_stream_auto_is_stdout_only_as_pid_1():
    from appliance.log import resolve_stream

    assert resolve_stream("auto", 1) == "stdout"
    assert resolve_stream("auto", 4242) == "stderr"
    assert resolve_stream("stderr", 1) == "stderr"
    assert resolve_stream("stdout", 4242) == "stdout"
