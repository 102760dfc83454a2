"""The only module that forks, signals, reaps and waits: it carries out the policy's actions.

One thread, one selector. The selector watches the signal wakeup pipe (signal handlers do
nothing else: ``signal.set_wakeup_fd`` writes the signal number), every worker's report pipe
and the control socket. The timeout is the policy's next deadline, never a fixed poll. Every
input becomes an event for :func:`appliance.master.policy.step`; every decision comes back as
an action executed here.

Three orderings matter and are kept here: a fork's report goes to the front of the queue (a
reload queued behind it must know the pid it supersedes); after each wait every ready input is
read before a :class:`Tick` lets the policy judge deadlines (a stalled master finds heartbeats
in the pipes, not missing); and time the master could not listen is reported to the policy
as :class:`MasterStalled` before anything else of that wake-up. The wire formats are owned
elsewhere: the worker pipe by :mod:`appliance.worker.protocol`, the control socket by
:mod:`appliance.control.protocol`, sd_notify by :mod:`appliance.systemd`.
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
from typing import TYPE_CHECKING, Any, NoReturn

from appliance import log
from appliance.engines.balance import LoadBoard
from appliance.master import policy, rules
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
    MasterStalled,
    Notify,
    ReloadOutcome,
    ReloadProgress,
    ReloadRequested,
    ScaleOutcome,
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
from appliance.master.signals import SignalPipe
from appliance.master.state import MasterState
from appliance.worker import main as worker_main
from appliance.worker import protocol

if TYPE_CHECKING:
    from appliance.control import ControlConn, ControlServer
    from appliance.engines.asgi import EngineSettings
    from appliance.systemd import Notifier

__all__ = ["Master", "MasterDeps"]

#: How long the master looks away from its control socket after accept() failed (EMFILE).
_CONTROL_PAUSE_S = 1.0


@dataclass
class MasterDeps:
    """What the master needs from the outside world, built by ``appliance serve``."""

    sockets: list[socket.socket]
    notifier: Notifier
    #: Re-read the config for the pool as it runs now: a new generation (and whether only live
    #: settings changed), or the reason it cannot be used.
    reload_config: Callable[[MasterState], tuple[Generation, bool] | str]
    engine_settings: Callable[[Generation], EngineSettings]
    #: The app imported in the master (``app.preload``); any ASGI/WSGI callable.
    preloaded_app: object = None
    control: ControlServer | None = None
    #: The signal pipe ``appliance serve`` set up before reading the config (else a new one).
    signals: SignalPipe | None = None
    on_exit: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class _Pipe:
    key: int
    fd: int
    lane: int | None = None
    reader: protocol.MessageReader = field(default_factory=protocol.MessageReader)


class Master:
    def __init__(self, state: MasterState, deps: MasterDeps) -> None:
        self.state = state
        self.deps = deps
        self.log = log.get_logger()
        self.selector = selectors.DefaultSelector()
        self.pending: deque[Event] = deque()
        self._forks: list[Event] = []  # fork reports of the actions being executed
        self.pipes: dict[int, _Pipe] = {}  # by worker key
        self.pids: dict[int, int] = {}  # pid -> worker key
        self.conns: dict[int, ControlConn] = {}  # fd -> connection
        self.waiters: dict[int, ControlConn] = {}  # reload/scale request id -> connection
        self.next_request = 1
        self.exit_code: int | None = None
        self.signals = deps.signals if deps.signals is not None else SignalPipe()
        self._control_resume_at: float | None = None
        # Workers watch this pipe: EOF means the master is gone and they should drain and exit.
        self._alive_r, self._alive_w = os.pipe()
        # Open-connection counts the workers balance their accepting on (engines.balance).
        self.board = LoadBoard(capacity=2 * policy.MAX_POOL)
        self.selector.register(self.signals.read_fd, selectors.EVENT_READ, "signal")
        if deps.control is not None:
            self.selector.register(deps.control.fileno(), selectors.EVENT_READ, "control")

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self.signals.install()
        try:
            self.state, actions = policy.start(self.state, time.monotonic())
            self._execute(actions)
            heard_at = time.monotonic()  # when the master last took in its inputs
            while self.exit_code is None:
                self._drain_events()
                if self.exit_code is not None:
                    break
                deadline = policy.next_deadline(self.state)
                if self._control_resume_at is not None:
                    deadline = min(deadline or self._control_resume_at, self._control_resume_at)
                wait_started = time.monotonic()
                timeout = None if deadline is None else max(0.0, deadline - wait_started)
                ready = self.selector.select(timeout)
                now = time.monotonic()
                stalled = rules.stall_seconds(
                    deaf_since=heard_at, wait_started=wait_started, timeout=timeout, now=now
                )
                heard_at = now
                self._resume_control(now)
                if stalled:
                    self.pending.append(MasterStalled(stalled))
                for key, mask in ready:
                    if mask & selectors.EVENT_WRITE:
                        self._flush_conn(key)
                    if mask & selectors.EVENT_READ:
                        self._dispatch(key)
                self._update_conn_interest()
                # Deadlines are judged after every input that was waiting has been read.
                self.pending.append(Tick())
        finally:
            self._cleanup()
        return self.exit_code

    def _drain_events(self) -> None:
        while self.pending and self.exit_code is None:
            event = self.pending.popleft()
            self.state, actions = policy.step(self.state, event, time.monotonic())
            self._execute(actions)

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
        elif isinstance(tag, tuple) and (conn := self.conns.get(key.fd)) is tag[1]:
            assert conn is not None
            self._read_conn(conn)

    def _read_signals(self) -> None:
        reload_asked = False
        for signo in self.signals.read():
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
                case signal.SIGHUP if not reload_asked:
                    # Several SIGHUPs read at once ask for one thing: the config as it is now.
                    reload_asked = True
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

    def _on_message(self, key: int, msg: protocol.Message | protocol.Invalid) -> None:
        match msg:
            case protocol.Ready():
                self.pending.append(WorkerReady(key))
            case protocol.Beat(requests=req, in_flight=inflight, rss_mb=rss):
                self.pending.append(Heartbeat(key, req, inflight, rss))
            case protocol.Draining():
                self.pending.append(WorkerDraining(key))
            case protocol.BootError(error=error):
                self.pending.append(WorkerBootFailed(key, error))
            case protocol.Invalid(excerpt=excerpt):
                self.log.warning("worker.bad_message", key=key, line=excerpt)

    def _close_pipe(self, pipe: _Pipe) -> None:
        if self.pipes.pop(pipe.key, None) is None:
            return
        if pipe.lane is not None:
            self.board.release(pipe.lane)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(pipe.fd)
        os.close(pipe.fd)

    # --- control socket ---------------------------------------------------------------------
    # A ControlConn never closes itself: after every read, send and flush the master checks
    # ``broken`` and drops the connection here, unregistering the fd before it is closed (and
    # so before the number can be reused by the next accept).

    def _accept_control(self) -> None:
        control = self.deps.control
        assert control is not None
        while True:
            try:
                conn = control.accept()
            except OSError as exc:
                # Out of descriptors: the socket stays readable, so watching it now would spin
                # the loop. Look away for a second; clients wait in the backlog meanwhile.
                self.log.warning("master.control_accept_failed", error=exc.strerror or str(exc))
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(control.fileno())
                self._control_resume_at = time.monotonic() + _CONTROL_PAUSE_S
                return
            if conn is None:
                return
            self.conns[conn.fileno()] = conn
            self.selector.register(conn.fileno(), selectors.EVENT_READ, ("conn", conn))

    def _resume_control(self, now: float) -> None:
        control = self.deps.control
        if self._control_resume_at is not None and now >= self._control_resume_at:
            self._control_resume_at = None
            if control is not None:
                self.selector.register(control.fileno(), selectors.EVENT_READ, "control")

    def _update_conn_interest(self) -> None:
        """Watch a control connection for writability only while replies are queued."""
        for fd, conn in list(self.conns.items()):
            if conn.broken:
                self._drop_conn(conn)
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
            key = self.selector.get_key(fd)
            if key.events != events:
                self.selector.modify(fd, events, key.data)

    def _drop_conn(self, conn: ControlConn) -> None:
        fd = conn.fileno()
        if self.conns.get(fd) is conn:
            del self.conns[fd]
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)
        for rid in [r for r, c in self.waiters.items() if c is conn]:
            del self.waiters[rid]
        conn.close()

    def _reply(self, conn: ControlConn, obj: dict[str, Any]) -> None:
        if not conn.send(obj) or conn.broken:
            self._drop_conn(conn)

    def _flush_conn(self, key: selectors.SelectorKey) -> None:
        conn = self.conns.get(key.fd)
        if conn is not None and isinstance(key.data, tuple) and key.data[1] is conn:
            conn.flush()
            if conn.broken:
                self._drop_conn(conn)

    def _read_conn(self, conn: ControlConn) -> None:
        from appliance.control import BadRequest, error_reply, status_reply

        requests = conn.read_requests()
        if requests is None or conn.broken:
            self._drop_conn(conn)
            return
        for req in requests:
            if self.conns.get(conn.fileno()) is not conn:
                return  # dropped while answering an earlier request of this batch
            if isinstance(req, BadRequest):
                self._reply(conn, error_reply(req.error))
                continue
            match req.cmd:
                case "status":
                    self._reply(conn, status_reply(self._status()))
                case "reload":
                    rid = self._request_id()
                    self.waiters[rid] = conn
                    self._reload(rid, "control socket")
                case "scale":
                    rid = self._request_id()
                    self.waiters[rid] = conn
                    self.pending.append(ScaleRequested(rid, absolute=req.args["workers"]))

    def _status(self) -> dict[str, Any]:
        status = policy.snapshot(self.state, time.monotonic())
        status["pid"] = os.getpid()
        # The policy counts in monotonic time; people read wall-clock times.
        wall = time.time()
        status["started_at_unix"] = round(wall - status["uptime_s"], 3)
        last = status["reload"]["last"]
        if last is not None:
            last["finished_unix"] = round(wall - last["age_s"], 3)
        return status

    def _request_id(self) -> int:
        rid = self.next_request
        self.next_request += 1
        return rid

    def _reload(self, rid: int, source: str) -> None:
        try:
            result = self.deps.reload_config(self.state)
        except Exception as exc:
            self.log.exception("reload.internal_error", source=source)
            result = rules.clamp_detail(f"cannot read the configuration: {exc!r}")
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
                    settings = gen.settings
                    log.configure_logging(settings.log.level, settings.log.format)
                case ReloadProgress():
                    self._answer_progress(action)
                case ReloadOutcome():
                    self._answer_reload(action)
                case ScaleOutcome():
                    self._answer_scale(action)
                case Exit(code=code):
                    self.exit_code = code
        if self._forks:
            # A fork's outcome comes before anything already queued: a reload queued behind
            # it must find the pid of the worker it supersedes.
            self.pending.extendleft(reversed(self._forks))
            self._forks.clear()

    def _answer_progress(self, action: ReloadProgress) -> None:
        from appliance.control import reload_progress

        for rid in action.request_ids:
            conn = self.waiters.get(rid)
            if conn is not None:
                self._reply(
                    conn,
                    reload_progress(
                        action.generation, action.replaced, action.total, action.message
                    ),
                )

    def _answer_reload(self, action: ReloadOutcome) -> None:
        from appliance.control import error_reply, reload_ok_reply

        for rid in action.request_ids:
            conn = self.waiters.pop(rid, None)
            if conn is not None:
                self._reply(
                    conn,
                    reload_ok_reply(action.generation, action.message)
                    if action.ok
                    else error_reply(action.message),
                )

    def _answer_scale(self, action: ScaleOutcome) -> None:
        from appliance.control import error_reply, scale_reply

        conn = self.waiters.pop(action.request_id, None)
        if conn is not None:
            self._reply(
                conn, scale_reply(action.workers) if action.ok else error_reply(action.message)
            )

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
            self._forks.append(SpawnFailed(action.key, f"fork failed: {exc}"))
            return
        if pid == 0:
            self._become_worker(action, read_fd, write_fd, lane)
        os.close(write_fd)
        pipe = _Pipe(action.key, read_fd, lane)
        self.pipes[action.key] = pipe
        self.pids[pid] = action.key
        self.selector.register(read_fd, selectors.EVENT_READ, pipe)
        self._forks.append(WorkerForked(action.key, pid))

    def _become_worker(
        self, action: Spawn, read_fd: int, write_fd: int, lane: int | None
    ) -> NoReturn:
        try:
            settings = action.generation.settings
            master_fds = [read_fd, self.signals.read_fd, self.signals.write_fd, self._alive_w]
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
        self.signals.close()
        for conn in list(self.conns.values()):
            self._drop_conn(conn)
        for pipe in list(self.pipes.values()):
            self._close_pipe(pipe)
        for fd in (self._alive_r, self._alive_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.selector.close()
        for fn in self.deps.on_exit:
            fn()
