"""The only module that forks, signals, reaps and waits: it carries out the policy's actions.

One thread, one selector. The selector watches the signal wakeup pipe (signal handlers do
nothing else: ``signal.set_wakeup_fd`` writes the signal number), every worker's report pipe
and the control socket. The timeout is the policy's next deadline, never a fixed poll. Every
input becomes an event for :func:`appliance.master.policy.step`; every decision comes back as
an action executed here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from appliance import log
from appliance.engines.balance import LoadBoard
from appliance.master import policy
from appliance.master.events import (
    Action,
    ApplyLive,
    ConfigRejected,
    Event,
    Exit,
    Generation,
    Heartbeat,
    Kill,
    Log,
    Notify,
    ReloadOutcome,
    ReloadProgress,
    ReloadRequested,
    ScaleRequested,
    Spawn,
    SpawnFailed,
    StopRequested,
    Tick,
    WorkerBootFailed,
    WorkerDraining,
    WorkerExited,
    WorkerForked,
    WorkerReady,
)
from appliance.master.state import MasterState
from appliance.worker import main as worker_main
from appliance.worker.protocol import MessageReader

__all__ = ["Master", "MasterDeps"]

_HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


def _noop(_signo: int, _frame: object) -> None:
    """Signal handlers do nothing: the wakeup fd carries the signal to the loop."""


@dataclass
class MasterDeps:
    """What the master needs from the outside world, built by ``appliance serve``."""

    sockets: list[socket.socket]
    notifier: Any  # appliance.systemd.Notifier
    #: Re-read the config for the pool as it runs now: a new generation (and whether only live
    #: settings changed), or the reason it cannot be used.
    reload_config: Callable[[MasterState], tuple[Generation, bool] | str]
    engine_settings: Callable[[Generation], Any]
    preloaded_app: Any = None
    control: Any = None  # appliance.control.ControlServer
    on_exit: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class _Pipe:
    key: int
    fd: int
    lane: int | None = None
    reader: MessageReader = field(default_factory=MessageReader)


class Master:
    def __init__(self, state: MasterState, deps: MasterDeps) -> None:
        self.state = state
        self.deps = deps
        self.log = log.get_logger()
        self.selector = selectors.DefaultSelector()
        self.pending: deque[Event] = deque()
        self.pipes: dict[int, _Pipe] = {}  # by worker key
        self.pids: dict[int, int] = {}  # pid -> worker key
        self.conns: dict[int, Any] = {}  # fd -> ControlConn
        self.waiters: dict[int, Any] = {}  # reload request id -> ControlConn
        self.next_request = 1
        self.exit_code: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Workers watch this pipe: EOF means the master is gone and they should drain and exit.
        self._alive_r, self._alive_w = os.pipe()
        # Open-connection counts the workers balance their accepting on (engines.balance).
        self.board = LoadBoard(capacity=2 * policy.MAX_POOL)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "signal")
        if deps.control is not None:
            self.selector.register(deps.control.fileno(), selectors.EVENT_READ, "control")

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            self.state, actions = policy.start(self.state, time.monotonic())
            self._execute(actions)
            while self.exit_code is None:
                self._drain_events()
                if self.exit_code is not None:
                    break
                deadline = policy.next_deadline(self.state)
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, mask in self.selector.select(timeout):
                    if mask & selectors.EVENT_WRITE:
                        self._flush_conn(key)
                    if mask & selectors.EVENT_READ:
                        self._dispatch(key)
                self._update_conn_interest()
                if not self.pending:
                    self.pending.append(Tick())
        finally:
            self._cleanup()
        return self.exit_code

    def _drain_events(self) -> None:
        while self.pending and self.exit_code is None:
            event = self.pending.popleft()
            self.state, actions = policy.step(self.state, event, time.monotonic())
            self._execute(actions)

    def _install_signals(self) -> None:
        for sig in _HANDLED:
            signal.signal(sig, _noop)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    # --- inputs -----------------------------------------------------------------------------

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        tag = key.data
        if tag == "signal":
            self._read_signals()
        elif tag == "control":
            self._accept_control()
        # A key from this batch may be stale: an earlier key's handling (a reap) can have
        # closed its fd already, and the number may even be reused by then.
        elif isinstance(tag, _Pipe) and self.pipes.get(tag.key) is tag:
            self._read_pipe(tag)
        elif isinstance(tag, tuple) and self.conns.get(key.fd) is tag[1]:
            self._read_conn(tag[1])

    def _flush_conn(self, key: selectors.SelectorKey) -> None:
        conn = self.conns.get(key.fd)
        if conn is not None and isinstance(key.data, tuple) and key.data[1] is conn:
            conn.flush()

    def _read_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signo in data:
            match signo:
                case signal.SIGCHLD:
                    self._reap()
                case signal.SIGTERM:
                    self.pending.append(StopRequested("SIGTERM"))
                case signal.SIGINT:
                    force = self.state.phase.value == "stopping"
                    self.pending.append(StopRequested("SIGINT", force=force))
                case signal.SIGQUIT:
                    self.pending.append(StopRequested("SIGQUIT", force=True))
                case signal.SIGHUP:
                    self._reload(self._request_id(), "SIGHUP")
                case signal.SIGTTIN:
                    self.pending.append(ScaleRequested(self._request_id(), delta=1))
                case signal.SIGTTOU:
                    self.pending.append(ScaleRequested(self._request_id(), delta=-1))

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            key = self.pids.pop(pid, None)
            if key is None:
                continue  # not ours (we may be PID 1 of a container): reaped quietly
            pipe = self.pipes.get(key)
            if pipe is not None:
                self._read_pipe(pipe, final=True)
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                self.pending.append(WorkerExited(key, None, signal.Signals(-code).name))
            else:
                self.pending.append(WorkerExited(key, code, None))

    def _read_pipe(self, pipe: _Pipe, *, final: bool = False) -> None:
        while True:
            try:
                data = os.read(pipe.fd, 65536)
            except BlockingIOError:
                data = None
            if not data:
                if data == b"" or final:
                    self._close_pipe(pipe)
                return
            for msg in pipe.reader.feed(data):
                self._on_message(pipe.key, msg)

    def _on_message(self, key: int, msg: dict[str, Any]) -> None:
        match msg.get("t"):
            case "ready":
                self.pending.append(WorkerReady(key))
            case "hb":
                self.pending.append(
                    Heartbeat(
                        key,
                        int(msg.get("req", 0)),
                        int(msg.get("inflight", 0)),
                        float(msg.get("rss", 0.0)),
                    )
                )
            case "draining":
                self.pending.append(WorkerDraining(key))
            case "boot_error":
                self.pending.append(WorkerBootFailed(key, str(msg.get("error", "unknown"))))
            case _:
                self.log.warning("worker.bad_message", key=key, message=msg)

    def _close_pipe(self, pipe: _Pipe) -> None:
        if self.pipes.pop(pipe.key, None) is None:
            return
        if pipe.lane is not None:
            self.board.release(pipe.lane)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(pipe.fd)
        os.close(pipe.fd)

    # --- control socket ---------------------------------------------------------------------

    def _accept_control(self) -> None:
        while True:
            conn = self.deps.control.accept()
            if conn is None:
                return
            self.conns[conn.fileno()] = conn
            self.selector.register(conn.fileno(), selectors.EVENT_READ, ("conn", conn))

    def _update_conn_interest(self) -> None:
        """Watch a control connection for writability only while replies are queued."""
        for fd, conn in list(self.conns.items()):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
            key = self.selector.get_key(fd)
            if key.events != events:
                self.selector.modify(fd, events, key.data)

    def _drop_conn(self, conn: Any) -> None:
        fd = conn.fileno()
        if self.conns.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)
        for rid in [r for r, c in self.waiters.items() if c is conn]:
            del self.waiters[rid]
        conn.close()

    def _read_conn(self, conn: Any) -> None:
        requests = conn.read_requests()
        if requests is None:
            self._drop_conn(conn)
            return
        for req in requests:
            error = getattr(req, "error", None)
            if error is not None:
                conn.send({"ok": False, "error": error})
                continue
            match req.cmd:
                case "status":
                    status = policy.snapshot(self.state, time.monotonic())
                    status["pid"] = os.getpid()
                    # The policy counts in monotonic time; people read wall-clock times.
                    wall = time.time()
                    status["started_at_unix"] = round(wall - status["uptime_s"], 3)
                    last = status["reload"]["last"]
                    if last is not None:
                        last["finished_unix"] = round(wall - last["age_s"], 3)
                    conn.send({"ok": True, "status": status})
                case "reload":
                    rid = self._request_id()
                    self.waiters[rid] = conn
                    self._reload(rid, "control socket")
                case "scale":
                    n = req.args["workers"]  # an int >= 1: control.parse_request checked it
                    if n > policy.MAX_POOL:
                        conn.send(
                            {
                                "ok": False,
                                "error": f"workers must be 1..{policy.MAX_POOL} (got {n!r})",
                            }
                        )
                        continue
                    self.pending.append(ScaleRequested(self._request_id(), absolute=n))
                    conn.send({"ok": True, "workers": n})

    def _request_id(self) -> int:
        rid = self.next_request
        self.next_request += 1
        return rid

    def _reload(self, rid: int, source: str) -> None:
        result = self.deps.reload_config(self.state)
        if isinstance(result, str):
            self.pending.append(ConfigRejected(rid, result, source))
        else:
            generation, live_only = result
            self.pending.append(ReloadRequested(rid, generation, live_only, source))

    # --- actions ----------------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Spawn():
                    self._spawn(action)
                case Kill(key=key, pid=pid, signal_name=name):
                    pipe = self.pipes.get(key)
                    if pipe is not None and pipe.lane is not None:
                        self.board.mark_dead(pipe.lane)  # nobody should wait for it to accept
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.Signals[name])
                case Notify(message=message):
                    if not self.deps.notifier.send(message) and self.deps.notifier.enabled:
                        self.log.warning("notify.failed", message=message.splitlines()[0])
                case Log(level=level, event=event, fields=fields):
                    getattr(self.log, level)(event, **dict(fields))
                case ApplyLive(generation=gen):
                    settings = gen.config.settings
                    log.configure_logging(settings.log.level, settings.log.format)
                case ReloadProgress():
                    for rid in action.request_ids:
                        conn = self.waiters.get(rid)
                        if conn is not None:
                            conn.send(
                                {
                                    "progress": {
                                        "generation": action.generation,
                                        "replaced": action.replaced,
                                        "total": action.total,
                                        "message": action.message,
                                    }
                                }
                            )
                case ReloadOutcome():
                    for rid in action.request_ids:
                        conn = self.waiters.pop(rid, None)
                        if conn is None:
                            continue
                        if action.ok:
                            conn.send(
                                {
                                    "ok": True,
                                    "reload": {
                                        "generation": action.generation,
                                        "message": action.message,
                                    },
                                }
                            )
                        else:
                            conn.send({"ok": False, "error": action.message})
                case Exit(code=code):
                    self.exit_code = code

    def _spawn(self, action: Spawn) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        lane = self.board.claim()
        # Move everything the master has allocated so far out of the collector's reach: a
        # collection in the child would otherwise write to every object's header and copy the
        # shared pages (copy-on-write) that make preloading and the engine import cheap.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            if lane is not None:
                self.board.release(lane)
            self.pending.append(SpawnFailed(action.key, f"fork failed: {exc}"))
            return
        if pid == 0:
            self._become_worker(action, read_fd, write_fd, lane)
        os.close(write_fd)
        pipe = _Pipe(action.key, read_fd, lane)
        self.pipes[action.key] = pipe
        self.pids[pid] = action.key
        self.selector.register(read_fd, selectors.EVENT_READ, pipe)
        self.pending.append(WorkerForked(action.key, pid))

    def _become_worker(
        self, action: Spawn, read_fd: int, write_fd: int, lane: int | None
    ) -> NoReturn:
        try:
            settings = action.generation.config.settings
            master_fds = [read_fd, self._wake_r, self._wake_w, self._alive_w]
            master_fds += [p.fd for p in self.pipes.values()]
            master_fds += list(self.conns)
            if self.deps.control is not None:
                master_fds.append(self.deps.control.fileno())
            for fd in master_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.selector.close()
            with contextlib.suppress(Exception):
                self.deps.notifier.close()
            spec = worker_main.WorkerSpec(
                worker_id=action.slot,
                generation=action.generation.number,
                config_digest=action.generation.digest,
                app_target=settings.app.target,
                app_directory=settings.app.directory,
                preloaded_app=self.deps.preloaded_app,
                sockets=tuple(self.deps.sockets),
                engine=self.deps.engine_settings(action.generation),
                log_level=settings.log.level,
                log_format=settings.log.format,
                report_fd=write_fd,
                alive_fd=self._alive_r,
                board=self.board,
                lane=lane,
            )
        except BaseException:  # noqa: BLE001 - never return into the master's loop
            os._exit(worker_main.EXIT_CRASH)
        worker_main.run(spec)

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for conn in list(self.conns.values()):
            self._drop_conn(conn)
        for pipe in list(self.pipes.values()):
            self._close_pipe(pipe)
        for fd in (self._wake_r, self._wake_w, self._alive_r, self._alive_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.selector.close()
        for fn in self.deps.on_exit:
            fn()
