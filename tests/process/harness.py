"""Process-level test harness: the real master as a child process, driven over HTTP and signals.

Everything here synchronises on events with deadlines: a JSON log event from the master's
stderr, an sd_notify datagram on a socket the test binds, or an HTTP response. Nothing sleeps
to wait for something to happen. Every started process group is SIGKILLed at teardown.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from appliance.systemd import CHILD_ENV_VARS

APPS = Path(__file__).resolve().parent.parent / "apps"
REPO = Path(__file__).resolve().parents[2]
# Whatever the test runner itself got from systemd must not leak into the masters it starts.
_SYSTEMD_VARS = (*CHILD_ENV_VARS, "JOURNAL_STREAM", "RUNTIME_DIRECTORY", "APPLIANCE_CONFIG")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``appliance ARGS`` (status, reload, scale, ...) the way an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env(**extra: str) -> dict[str, str]:
    # APPLIANCE_* of the runner's shell would point the CLI at another master or config.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SYSTEMD_VARS and not k.startswith("APPLIANCE_")
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def short_tmpdir() -> Path:
    """A short directory: unix socket paths must fit in 108 bytes, pytest's tmp_path may not."""
    return Path(tempfile.mkdtemp(prefix="apl-", dir="/tmp"))


def write_config(directory: Path, config: dict[str, Any], name: str = "appliance.toml") -> Path:
    path = directory / name
    path.write_text(tomli_w.dumps(config))
    return path


def base_config(directory: Path, **sections: Any) -> dict[str, Any]:
    """A config for tests: port 0, JSON logs, a private control socket, short timeouts."""
    cfg: dict[str, Any] = {
        "listen": [{"name": "http", "address": "127.0.0.1:0"}],
        "log": {"format": "json", "level": "info"},
        "control": {"path": str(directory / "control.sock")},
        "workers": {"count": 2, "graceful_timeout_s": 10, "boot_timeout_s": 20},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class Deadline(AssertionError):
    pass


class LogStream:
    """Collects JSON log lines from a pipe in a thread; tests wait on events by name."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe: Any) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            event = None
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
            with self._cond:
                self.lines.append(line)
                if isinstance(event, dict):
                    self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def find(self, event: str, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e
                for e in self.events[since:]
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
            ]

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_for(
        self,
        event: str,
        timeout: float = 30.0,
        since: int = 0,
        count: int = 1,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **match: Any,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [
                    e
                    for e in self.events[since:]
                    if e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())
                    and (where is None or where(e))
                ]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    tail = "\n".join(self.lines[-25:])
                    raise Deadline(f"no {event} {match} within {timeout}s; last lines:\n{tail}")
                self._cond.wait(left)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def texts(self) -> list[str]:
        with self._cond:
            return [m for _, m in self.messages]

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 30.0, since: int = 0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, m in self.messages[since:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Deadline(f"no matching notify message within {timeout}s: {self.texts()}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def close(self) -> None:
        self.sock.close()


class Master:
    """The real ``appliance serve`` in its own process group."""

    def __init__(
        self,
        config: Path | None,
        *,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
        args: list[str] | None = None,
        logs_on: str = "stderr",
    ) -> None:
        cmd = [*(prefix or []), sys.executable, "-m", "appliance", *(args or ["serve"])]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if logs_on == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if logs_on == "stdout" else subprocess.PIPE,
            env=env if env is not None else clean_env(),
            start_new_session=True,
            pass_fds=pass_fds,
        )
        self.logs = LogStream(self.proc.stdout if logs_on == "stdout" else self.proc.stderr)
        self._port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def started(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.logs.wait_for("master.started", timeout=timeout)

    def ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.logs.wait_for("master.ready", timeout=timeout)

    @property
    def port(self) -> int:
        if self._port is None:
            address = self.started()["listeners"][0]["address"]
            self._port = int(address.rsplit(":", 1)[1])
        return self._port

    def get(self, path: str = "/", timeout: float = 10.0) -> tuple[int, Any]:
        return http_get(self.port, path, timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def worker_pids(self) -> list[int]:
        """Current worker pids, from the master's own spawn/exit events."""
        alive: dict[int, int] = {}
        for e in list(self.logs.events):
            if e.get("event") == "worker.spawned":
                alive[e["pid"]] = e["worker_id"]
            elif e.get("event") == "worker.exited":
                alive.pop(e.get("pid"), None)
        return sorted(alive)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def http_get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body.decode("utf-8", "replace")
    finally:
        conn.close()


def wait_http(port: int, path: str = "/", timeout: float = 20.0) -> tuple[int, Any]:
    """Retry until the server answers (used only where nothing else signals readiness)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(port, path, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Load:
    """Client threads sending requests until stopped; every failure is counted with its reason.

    ``keepalive`` clients reuse one connection (reconnecting only after a server-side close
    announced with ``Connection: close``); the others open a new connection per request.
    """

    def __init__(self, port: int, *, keepalive: int = 2, fresh: int = 2, path: str = "/") -> None:
        self.port = port
        self.path = path
        self.ok = 0
        self.failures: list[str] = []
        self.seen: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._keepalive, daemon=True) for _ in range(keepalive)
        ] + [threading.Thread(target=self._fresh, daemon=True) for _ in range(fresh)]
        self._max_requests = 200_000
        self._max_seconds = 240.0

    def __enter__(self) -> Load:
        self._started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _record(self, status: int | None, body: Any, error: str | None) -> None:
        with self._lock:
            if error is not None:
                self.failures.append(error)
            elif status != 200:
                self.failures.append(f"HTTP {status}")
            else:
                self.ok += 1
                self.seen.append(body)

    def _running(self) -> bool:
        return (
            not self._stop.is_set()
            and self.ok + len(self.failures) < self._max_requests
            and time.monotonic() - self._started < self._max_seconds
        )

    def _keepalive(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while self._running():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = json.loads(resp.read())
                self._record(resp.status, body, None)
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._record(None, None, f"keepalive: {type(exc).__name__}: {exc}")
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _fresh(self) -> None:
        while self._running():
            try:
                status, body = http_get(self.port, self.path, timeout=15)
                self._record(status, body, None)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._record(None, None, f"fresh: {type(exc).__name__}: {exc}")

    def wait_requests(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` more requests succeeded (progress, not time)."""
        with self._lock:
            goal = self.ok + n
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.ok >= goal:
                    return
            if time.monotonic() > deadline:
                raise Deadline(f"load made no progress: ok={self.ok} failures={self.failures[-5:]}")
            time.sleep(0.01)


@contextmanager
def running(master: Master) -> Iterator[Master]:
    try:
        yield master
    finally:
        master.kill_group()


_UVICORN_RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@contextmanager
def uvicorn_server(target: str, *flags: str) -> Iterator[int]:
    """Plain uvicorn (httptools, uvloop) serving ``target`` from tests/apps on port 0, the
    reference the HTTP tests compare with; yields the port it logs once it listens (no
    free-port race, no polling), and kills it at the end."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--http", "httptools", "--loop", "uvloop"),
            *("--no-access-log", "--host", "127.0.0.1", "--port", "0", *flags),
            *("--app-dir", str(APPS), target),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # also keeps uvicorn's tracebacks from filling the pipe
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 30, []
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError("uvicorn did not start:\n" + "".join(seen))
            seen.append(line)
            if match := _UVICORN_RUNNING.search(line):
                port = int(match.group(1))
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
                yield port
                return
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
