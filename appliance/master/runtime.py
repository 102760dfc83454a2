"""The only module that forks, signals, reaps and waits: it carries out the policy's actions.

One thread, one selector. The selector watches the signal wakeup pipe (signal handlers do
nothing else: ``signal.set_wakeup_fd`` writes the signal number), every worker's report pipe
and the control socket. The timeout is the policy's next deadline, never a fixed poll. Every
input becomes an event for :func:`appliance.master.policy.step`; every decision comes back as
an action executed here.

Workers are forked by each generation's template process (:mod:`appliance.worker.template`)
and re-parented to the master, a child subreaper: the master still reaps and signals them
itself. A fork is reported asynchronously (``forked`` on the template's channel), so other
events may come first; the policy's worker table decides those cases (a worker superseded
before its pid was known is SIGKILLed when the pid arrives). After each wait every ready input
is read before a :class:`Tick` lets the policy judge deadlines (a stalled master finds
heartbeats in the pipes, not missing), and time the master could not listen is reported to
the policy as :class:`MasterStalled` before anything else of that wake-up. The wire formats are owned
elsewhere: the worker pipe by :mod:`appliance.worker.protocol`, the control socket by
:mod:`appliance.control.protocol`, sd_notify by :mod:`appliance.systemd`.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from appliance.appenv import AppEnvError, AppEnvironment
from appliance.engines.balance import LoadBoard
from appliance.master import drainmark, policy, rules
from appliance.master.events import (
    Action,
    ApplyLive,
    CancelSpawn,
    ConfigRejected,
    DrainOutcome,
    DrainRequested,
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
from appliance.worker import channel, protocol, template

if TYPE_CHECKING:
    from appliance.agent import AgentServer
    from appliance.control import ControlConn, ControlServer
    from appliance.engines.settings import EngineSettings
    from appliance.systemd import Notifier

__all__ = ["Master", "MasterDeps"]

#: How long the master looks away from its control socket after accept() failed (EMFILE).
_CONTROL_PAUSE_S = 1.0
#: Exit statuses kept for children reaped before their fork report was read.
_MAX_ORPHANS = 1024
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Workers are forked by a template process through a middle process that exits: as a
    child subreaper the master inherits them, so it reaps and signals its own children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


@dataclass
class MasterDeps:
    """What the master needs from the outside world, built by ``appliance serve``."""

    sockets: list[socket.socket]
    notifier: Notifier
    #: Re-read the config for the pool as it runs now: a new generation (and whether only live
    #: settings changed), or the reason it cannot be used.
    reload_config: Callable[[MasterState], tuple[Generation, bool] | str]
    engine_settings: Callable[[Generation], EngineSettings]
    #: The app's environment for a generation (may raise AppEnvError: its spawns then fail).
    app_environment: Callable[[Generation], AppEnvironment]
    control: ControlServer | None = None
    #: The HAProxy agent-check responder (``[agent] address``), when configured.
    agent: AgentServer | None = None
    #: The signal pipe ``appliance serve`` set up before reading the config (else a new one).
    signals: SignalPipe | None = None
    #: The first template, forked before the config was read (used once, then None).
    pretemplate: template.PreTemplate | None = None
    #: Where an operator's drain is kept across restarts (:mod:`appliance.master.drainmark`).
    drain_mark: str | None = None
    #: ``stdout`` or ``stderr``: ``log.stream`` as resolved (at start, and on a live reload),
    #: for the master and every template and worker started from then on.
    log_stream: str = "stderr"
    on_exit: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class _Template:
    """The master's handle on one generation's template process."""

    generation: int
    pid: int
    sock: socket.socket
    started_at: float
    ready: bool = False
    error: str | None = None
    #: Workers asked for and not yet reported forked (or failed).
    keys: set[int] = field(default_factory=set)
    #: Spawns waiting for ``ready``: (key, slot, lane, report pipe write end).
    queued: list[tuple[int, int, int | None, int]] = field(default_factory=list)


@dataclass
class _Pipe:
    key: int
    fd: int
    lane: int | None = None
    reader: protocol.MessageReader = field(default_factory=protocol.MessageReader)
    #: The worker's fork was reported: its messages may go to the policy. Before that they
    #: wait here (the worker can say "ready" before its template's report is read).
    forked: bool = False
    early: list[protocol.Message | protocol.Invalid] = field(default_factory=list)


class Master:
    def __init__(self, state: MasterState, deps: MasterDeps) -> None:
        self.state = state
        self.deps = deps
        self.log = log.get_logger()
        self.selector = selectors.DefaultSelector()
        self.pending: deque[Event] = deque()
        self.pipes: dict[int, _Pipe] = {}  # by worker key
        self.pids: dict[int, int] = {}  # pid -> worker key
        self.conns: dict[int, ControlConn] = {}  # fd -> connection
        self.waiters: dict[int, ControlConn] = {}  # reload/scale request id -> connection
        self.next_request = 1
        self.exit_code: int | None = None
        self.signals = deps.signals if deps.signals is not None else SignalPipe()
        self._control_resume_at: float | None = None
        self._agent_resume_at: float | None = None
        self.templates: dict[int, _Template] = {}  # by generation number
        self.template_pids: dict[int, int] = {}  # pid -> generation number
        self._template_error = ""
        self._orphans: dict[int, int] = {}  # pid -> wait status
        # Workers watch this pipe: EOF means the master is gone and they should drain and exit.
        self._alive_r, self._alive_w = os.pipe()
        # Open-connection counts the workers balance their accepting on (engines.balance).
        self.board = LoadBoard(capacity=2 * policy.MAX_POOL)
        self.selector.register(self.signals.read_fd, selectors.EVENT_READ, "signal")
        if deps.control is not None:
            self.selector.register(deps.control.fileno(), selectors.EVENT_READ, "control")
        if deps.agent is not None:
            self.selector.register(deps.agent.fileno(), selectors.EVENT_READ, "agent")

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        _become_subreaper()
        self.signals.install()
        try:
            self.state, actions = policy.start(self.state, time.monotonic())
            self._publish_readiness()
            self._execute(actions)
            heard_at = time.monotonic()  # when the master last took in its inputs
            while self.exit_code is None:
                self._drain_events()
                if self.exit_code is not None:
                    break
                deadline = policy.next_deadline(self.state)
                for resume_at in (self._control_resume_at, self._agent_resume_at):
                    if resume_at is not None:
                        deadline = resume_at if deadline is None else min(deadline, resume_at)
                wait_started = time.monotonic()
                timeout = None if deadline is None else max(0.0, deadline - wait_started)
                ready = self.selector.select(timeout)
                if not ready:
                    # The wait timed out, or the process was stopped and Python's retry saw the
                    # timeout as spent and returned without polling: either way, look at what
                    # is waiting before any deadline is judged.
                    ready = self.selector.select(0)
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

    def _publish_readiness(self) -> None:
        """Write the pool's readiness where every worker reads it (``http.readiness_path``)."""
        self.board.set_readiness(policy.readiness(self.state))

    def _drain_events(self) -> None:
        while self.pending and self.exit_code is None:
            event = self.pending.popleft()
            before = (self.state.drained, self.state.maint)
            self.state, actions = policy.step(self.state, event, time.monotonic())
            if (self.state.drained, self.state.maint) != before:
                self._keep_drain_mark()
            # Before the actions: a drain is answered only once workers see it too.
            self._publish_readiness()
            self._execute(actions)
            self._retire_templates()

    # --- inputs -----------------------------------------------------------------------------

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        tag = key.data
        if tag == "signal":
            self._read_signals()
        elif tag == "control":
            self._accept_control()
        elif tag == "agent":
            self._answer_agent()
        # A key from this batch may be stale: an earlier key's handling (a reap) can have
        # closed its fd already, and the number may even be reused by then.
        elif isinstance(tag, _Pipe) and self.pipes.get(tag.key) is tag:
            self._read_pipe(tag)
        elif isinstance(tag, _Template) and self.templates.get(tag.generation) is tag:
            self._read_template(tag)
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
            number = self.template_pids.pop(pid, None)
            if number is not None:
                tpl = self.templates.get(number)
                code = os.waitstatus_to_exitcode(status)
                self.log.info("template.exited", generation=number, pid=pid, exit_code=code)
                if tpl is not None and tpl.pid == pid:
                    self._template_gone(tpl, f"exit status {code}")
                continue
            key = self.pids.pop(pid, None)
            if key is None:
                # A worker whose fork report is still in its template's channel, or not ours
                # at all (as PID 1 of a container we inherit orphans): keep it briefly.
                for tpl in list(self.templates.values()):
                    self._read_template(tpl)
                key = self.pids.pop(pid, None)
            if key is None:
                self._orphans[pid] = status
                while len(self._orphans) > _MAX_ORPHANS:
                    del self._orphans[next(iter(self._orphans))]
                continue
            self._exited(key, status)

    def _exited(self, key: int, status: int) -> None:
        self.pids = {p: k for p, k in self.pids.items() if k != key}
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
                self._on_message(pipe, msg)

    def _on_message(self, pipe: _Pipe, msg: protocol.Message | protocol.Invalid) -> None:
        if not pipe.forked:
            pipe.early.append(msg)
            return
        key = pipe.key
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
        agent = self.deps.agent
        if self._agent_resume_at is not None and now >= self._agent_resume_at:
            self._agent_resume_at = None
            if agent is not None:
                self.selector.register(agent.fileno(), selectors.EVENT_READ, "agent")

    # --- agent-check ------------------------------------------------------------------------

    def _answer_agent(self) -> None:
        """Answer every waiting agent-check with the state as of the last step, and close."""
        agent = self.deps.agent
        assert agent is not None
        try:
            agent.answer(policy.agent_reply(self.state))
        except OSError as exc:
            # Out of descriptors: as for the control socket, look away for a second.
            self.log.warning("master.agent_accept_failed", error=exc.strerror or str(exc))
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(agent.fileno())
            self._agent_resume_at = time.monotonic() + _CONTROL_PAUSE_S

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
                case "drain" | "undrain":
                    rid = self._request_id()
                    self.waiters[rid] = conn
                    maint = bool(req.args.get("maint", False))
                    self.pending.append(DrainRequested(rid, req.cmd == "drain", maint))

    def _status(self) -> dict[str, Any]:
        status = policy.snapshot(self.state, time.monotonic())
        status["pid"] = os.getpid()
        status["templates"] = [
            {"generation": t.generation, "pid": t.pid, "state": "ready" if t.ready else "booting"}
            for t in sorted(self.templates.values(), key=lambda t: t.generation)
        ]
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
                case CancelSpawn(key=key):
                    self._cancel_spawn(key)
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
                    self.deps.log_stream = log.resolve_stream(settings.log.stream, os.getpid())
                    log.configure_logging(
                        settings.log.level,
                        settings.log.format,
                        stream=log.named_stream(self.deps.log_stream),
                    )
                case ReloadProgress():
                    self._answer_progress(action)
                case ReloadOutcome():
                    self._answer_reload(action)
                case ScaleOutcome():
                    self._answer_scale(action)
                case DrainOutcome():
                    self._answer_drain(action)
                case Exit(code=code):
                    self.exit_code = code

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

    def _keep_drain_mark(self) -> None:
        """Write (or remove) the drain mark, so a restart keeps the operator's drain."""
        path = self.deps.drain_mark
        if path is None:
            return
        state = self.state
        try:
            if not state.drained:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return
            mark = drainmark.Mark.MAINT if state.maint else drainmark.Mark.DRAIN
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(drainmark.render(mark))
            os.replace(tmp, path)
        except OSError as exc:
            self.log.warning("master.drain_mark_failed", file=path, error=str(exc))

    def _answer_drain(self, action: DrainOutcome) -> None:
        from appliance.control import drain_reply, error_reply

        conn = self.waiters.pop(action.request_id, None)
        if conn is not None:
            self._reply(
                conn,
                drain_reply(action.agent, action.message)
                if action.ok
                else error_reply(action.message),
            )

    # --- templates and spawns --------------------------------------------------------------

    def _spawn(self, action: Spawn) -> None:
        """Ask the generation's template for a worker (forking the template first if needed)."""
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:  # EMFILE: a failed boot, retried with backoff
            self.pending.append(SpawnFailed(action.key, f"cannot create its pipe: {exc}"))
            return
        os.set_blocking(read_fd, False)
        lane = self.board.claim()
        pipe = _Pipe(action.key, read_fd, lane)
        self.pipes[action.key] = pipe
        self.selector.register(read_fd, selectors.EVENT_READ, pipe)
        tpl = self._template_for(action.generation)
        if tpl is None:
            os.close(write_fd)
            self._fail_spawn(action.key, self._template_error)
            return
        tpl.keys.add(action.key)
        if tpl.ready:
            self._send_spawn(tpl, action.key, action.slot, lane, write_fd)
        else:
            tpl.queued.append((action.key, action.slot, lane, write_fd))

    def _send_spawn(
        self, tpl: _Template, key: int, slot: int, lane: int | None, write_fd: int
    ) -> None:
        sent = channel.send(tpl.sock, channel.Spawn(key, slot, lane), write_fd)
        os.close(write_fd)
        if not sent:
            self._fail_spawn(key, "the generation's template process is not answering")

    def _fail_spawn(self, key: int, error: str) -> None:
        for tpl in self.templates.values():
            tpl.keys.discard(key)
        pipe = self.pipes.get(key)
        if pipe is not None:
            self._close_pipe(pipe)
        self.pending.append(SpawnFailed(key, error))

    def _template_for(self, generation: Generation) -> _Template | None:
        template = self.templates.get(generation.number)
        if template is not None:
            return template
        try:
            environment = self.deps.app_environment(generation)
        except AppEnvError as exc:
            self._template_error = str(exc)
            return None
        pre, self.deps.pretemplate = self.deps.pretemplate, None
        if pre is not None:
            tpl = self._hand_to_pretemplate(pre, generation, environment)
            if tpl is not None:
                return tpl
        try:
            master_end, template_end = channel.pair()
        except OSError as exc:
            self._template_error = f"cannot create the template's channel: {exc}"
            return None
        # Everything the master allocated so far stays out of the collector's reach, so a
        # collection in a child does not copy the pages it shares with the master.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            master_end.close()
            template_end.close()
            self._template_error = f"fork failed: {exc}"
            return None
        if pid == 0:
            self._become_template(generation, environment, master_end, template_end)
        template_end.close()
        return self._track_template(generation, pid, master_end)

    def _track_template(
        self, generation: Generation, pid: int, master_end: socket.socket, **fields: Any
    ) -> _Template:
        master_end.setblocking(False)
        tpl = _Template(generation.number, pid, master_end, time.monotonic())
        self.templates[generation.number] = tpl
        self.template_pids[pid] = generation.number
        self.selector.register(master_end.fileno(), selectors.EVENT_READ, tpl)
        self.log.info("template.started", generation=generation.number, pid=pid, **fields)
        return tpl

    def _hand_to_pretemplate(
        self, pre: template.PreTemplate, generation: Generation, environment: AppEnvironment
    ) -> _Template | None:
        """Make the pre-forked template this generation's (None: fork one instead)."""
        try:
            spec = self._template_spec(generation, environment, pre.sock, close_fds=())
            handed = template.hand_over(pre, spec, os.environ)
        except Exception as exc:  # noqa: BLE001 - e.g. a setting that does not pickle
            handed, reason = False, f"{type(exc).__name__}: {exc}"
        else:
            reason = "it is gone"
        if not handed:
            pre.sock.close()  # it exits at EOF; its exit is reaped as a stray child
            self.log.warning("template.prefork_unused", pid=pre.pid, reason=reason)
            return None
        return self._track_template(generation, pre.pid, pre.sock, preforked=True)

    def _become_template(
        self,
        generation: Generation,
        environment: AppEnvironment,
        master_end: socket.socket,
        template_end: socket.socket,
    ) -> NoReturn:
        try:
            master_fds = [self.signals.read_fd, self.signals.write_fd, self._alive_w]
            master_fds += [p.fd for p in self.pipes.values()]
            master_fds += list(self.conns)
            master_fds += [t.sock.fileno() for t in self.templates.values()]
            master_fds += [fd for *_rest, fd in self._queued_fds()]
            if self.deps.control is not None:
                master_fds.append(self.deps.control.fileno())
            if self.deps.agent is not None:
                master_fds.append(self.deps.agent.fileno())
            master_end.close()
            self.selector.close()
            with contextlib.suppress(Exception):
                self.deps.notifier.close()
            spec = self._template_spec(generation, environment, template_end, tuple(master_fds))
        except BaseException:  # noqa: BLE001 - never return into the master's loop
            os._exit(template.EXIT_CRASH)
        template.run(spec)

    def _template_spec(
        self,
        generation: Generation,
        environment: AppEnvironment,
        template_end: socket.socket,
        close_fds: tuple[int, ...],
    ) -> template.TemplateSpec:
        settings = generation.settings
        return template.TemplateSpec(
            generation=generation.number,
            config_digest=generation.digest,
            app_target=settings.app.target,
            app_directory=settings.app.directory,
            preload=settings.app.preload,
            environment=environment,
            sockets=tuple(self.deps.sockets),
            engine=self.deps.engine_settings(generation),
            log_level=settings.log.level,
            log_format=settings.log.format,
            log_stream=self.deps.log_stream,
            alive_fd=self._alive_r,
            board=self.board,
            channel=template_end,
            close_fds=close_fds,
        )

    def _queued_fds(self) -> list[tuple[int, int, int | None, int]]:
        return [item for t in self.templates.values() for item in t.queued]

    def _read_template(self, tpl: _Template) -> None:
        while True:
            try:
                received = channel.receive(tpl.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                received = None
            if received is None:
                self._template_gone(tpl, "its channel closed")
                return
            msg, fd = received
            if fd is not None:
                os.close(fd)  # the master never expects a descriptor back
            match msg:
                case channel.Ready():
                    tpl.ready = True
                    self.log.info(
                        "template.ready",
                        generation=tpl.generation,
                        pid=tpl.pid,
                        boot_s=round(time.monotonic() - tpl.started_at, 4),
                    )
                    queued, tpl.queued = tpl.queued, []
                    for key, slot, lane, write_fd in queued:
                        self._send_spawn(tpl, key, slot, lane, write_fd)
                case channel.BootError(error=error):
                    tpl.error = error
                case channel.Forked(key=key, pid=pid):
                    self._forked(tpl, key, pid)
                case channel.SpawnFailed(key=key, error=error):
                    tpl.keys.discard(key)
                    self._fail_spawn(key, error)
                case _:
                    self.log.warning("template.bad_message", generation=tpl.generation, line=msg)

    def _forked(self, tpl: _Template, key: int, pid: int) -> None:
        """Worker ``key`` runs as ``pid``: tell the policy, then what the worker said so far."""
        tpl.keys.discard(key)
        self.pids[pid] = key
        self.pending.append(WorkerForked(key, pid))
        pipe = self.pipes.get(key)
        if pipe is not None:
            pipe.forked = True
            early, pipe.early = pipe.early, []
            for msg in early:
                self._on_message(pipe, msg)
        status = self._orphans.pop(pid, None)
        if status is not None:  # reaped before this report was read
            self._exited(key, status)

    def _template_gone(self, tpl: _Template, why: str) -> None:
        """The template's channel closed or it was reaped: fail what it had not forked."""
        if self.templates.get(tpl.generation) is not tpl:
            return
        del self.templates[tpl.generation]
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(tpl.sock.fileno())
        # Reports already in the socket come first (a worker forked just before the end).
        with contextlib.suppress(OSError):
            while (received := channel.receive(tpl.sock)) is not None:
                msg, fd = received
                if fd is not None:
                    os.close(fd)
                if isinstance(msg, channel.Forked):
                    self._forked(tpl, msg.key, msg.pid)
                elif isinstance(msg, channel.BootError):
                    tpl.error = msg.error
        tpl.sock.close()
        for _key, _slot, _lane, write_fd in tpl.queued:
            os.close(write_fd)
        tpl.queued = []
        error = f"boot failed: {tpl.error}" if tpl.error else f"template process ended ({why})"
        for key in sorted(tpl.keys):
            self._fail_spawn(key, error)
        tpl.keys.clear()
        if tpl.error:
            self.log.error(
                "template.boot_failed", generation=tpl.generation, pid=tpl.pid, error=tpl.error
            )

    def _retire_templates(self) -> None:
        """Close the channel of templates no generation needs any more; they exit on EOF.

        Needed: the current generation's, and during a reload the previous one's (an abort
        goes back to it, and its slots may need respawning meanwhile).
        """
        needed = {self.state.current.number}
        if self.state.reload is not None:
            needed.add(self.state.reload.previous.number)
        for number, tpl in list(self.templates.items()):
            if number not in needed and not tpl.keys and not tpl.queued:
                del self.templates[number]
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(tpl.sock.fileno())
                tpl.sock.close()

    def _cancel_spawn(self, key: int) -> None:
        """The policy gave up on a worker whose fork was not reported (boot timeout)."""
        for tpl in list(self.templates.values()):
            if key not in tpl.keys:
                continue
            for item in tpl.queued:
                if item[0] == key:
                    tpl.queued.remove(item)
                    os.close(item[3])
                    self._fail_spawn(key, "cancelled: the template did not become ready")
                    break
            if not tpl.ready:
                # Still importing after a whole boot timeout: it is stuck; a new one may not be.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(tpl.pid, signal.SIGKILL)

    def _cleanup(self) -> None:
        self.signals.close()
        for conn in list(self.conns.values()):
            self._drop_conn(conn)
        for pipe in list(self.pipes.values()):
            self._close_pipe(pipe)
        for tpl in list(self.templates.values()):
            for *_rest, fd in tpl.queued:
                os.close(fd)
            tpl.sock.close()
        self.templates.clear()
        for fd in (self._alive_r, self._alive_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.selector.close()
        for fn in self.deps.on_exit:
            fn()
