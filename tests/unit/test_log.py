"""Logging outputs (JSON, console, journal), level changes at run time, the stdlib bridge."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from appliance import log as applog
from appliance.journal import JournalSender
from appliance.log import (
    bind_context,
    clear_context,
    configure_logging,
    format_ts,
    get_logger,
    unbind_context,
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
    global_proxy = structlog.get_logger()  # structlog's cached lazy proxy
    configure_logging("info", "json", stream=buf)
    early.debug("policy.tick")
    global_proxy.debug("policy.tick")
    early.info("policy.step")
    global_proxy.info("policy.step")  # caches the bound logger on first use
    configure_logging("debug", "json", stream=buf)
    early.debug("policy.tick", n=1)
    global_proxy.debug("policy.tick", n=2)
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
    with structlog.contextvars.bound_contextvars(request_id="r1"):
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


def test_capture_logs_sees_appliance_events() -> None:
    configure_logging("info", "json", stream=io.StringIO())
    with capture_logs() as captured:
        get_logger().info("worker.ready", worker_id=1)
    assert captured == [{"event": "worker.ready", "worker_id": 1, "log_level": "info"}]


# --- stdlib ----------------------------------------------------------------------------------


def test_stdlib_records_are_routed() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    bind_context(worker_id=1)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("uvicorn.access").debug("dropped at info")
    try:
        _boom()
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    first, second = _lines(buf)
    assert first["event"] == "uvicorn.error"
    assert first["level"] == "info"
    assert first["message"] == "Started server process [42]"
    assert first["worker_id"] == 1
    assert second["level"] == "error"
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
    assert entry["EVENT"] == "uvicorn.error"
    assert entry["MESSAGE"] == "uvicorn.error: Invalid HTTP request received."
    assert entry["PRIORITY"] == "4"
    assert "F_MESSAGE" not in entry


def test_broken_stream_never_raises() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    buf.close()
    get_logger().info("still.fine")
