"""A generation's template process: the app's environment, imported once, forked per worker.

The master forks one template per generation (:mod:`appliance.master.runtime`). The template
turns itself into the app's process (:func:`appliance.appenv.enter`: appliance's own modules
out of ``sys.modules``, the app's virtualenv and paths in front, ``app.env`` set), imports the
app when ``app.preload`` is on (else only checks that its module can be found), says
``ready``, and then forks a worker for every ``spawn`` the master sends. So:

* workers of one generation share the engine's and the app's memory copy-on-write, and a
  replacement boots in milliseconds (a fork: no interpreter start, no import);
* a reload starts a new template, so new code (or a new virtualenv) is imported even with
  preload, and an import error there aborts the reload while the old workers keep serving;
* the master itself never imports the app.

The first generation's template is *pre-forked* (:func:`prefork`): ``appliance serve`` forks
it before it imports anything heavy, so the template imports the engine on the other core
while the master reads and validates the config; the master then hands it its spec
(:func:`hand_over`: the spec pickled, its descriptors by ``SCM_RIGHTS``) instead of forking.
Later generations' templates are forked from the master. A pre-forked template that cannot
be used (it died, the hand-over failed) is dropped and the master forks one as usual.

Each worker is forked through a short-lived middle process that exits at once: the worker is
re-parented to the master (a child subreaper), which reaps it, learns its exit status and
signals it exactly as if it had forked it itself. The template is not the workers' parent and
may exit (on EOF from the master) while they serve.
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import pickle
import resource
import select
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn

from appliance import appenv, log
from appliance.worker import channel

if TYPE_CHECKING:
    from appliance.engines.balance import LoadBoard
    from appliance.engines.settings import EngineSettings

__all__ = [
    "EXIT_BOOT_ERROR",
    "EXIT_CRASH",
    "PreTemplate",
    "TemplateSpec",
    "hand_over",
    "prefork",
    "run",
]

# A template exits like a worker (see appliance.worker.main, which the master does not load).
EXIT_CRASH = 1
EXIT_BOOT_ERROR = 3


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    """Everything a template needs, decided by the master before the fork."""

    generation: int
    config_digest: str
    app_target: str
    app_directory: str | None
    preload: bool
    environment: appenv.AppEnvironment
    sockets: tuple[socket.socket, ...]
    engine: EngineSettings
    log_level: str
    log_format: str
    log_stream: str
    alive_fd: int
    board: LoadBoard | None
    channel: socket.socket
    close_fds: tuple[int, ...]  # the master's descriptors this process must not keep


@dataclass(frozen=True, slots=True)
class PreTemplate:
    """The master's handle on the pre-forked first template (see :func:`prefork`)."""

    pid: int
    sock: socket.socket  # the master's end of what becomes the template's channel


#: Most descriptors a hand-over carries: the listening sockets, the alive pipe, the board.
_MAX_FDS = 250
_MAX_SPEC = 1 << 20


def prefork() -> PreTemplate | None:
    """Fork the process that will become the first generation's template (None if the fork
    fails: the master then forks the template itself, later).

    Call it before importing anything heavy: the child resets what the master set up, imports
    the engine and waits for :func:`hand_over`. At EOF (the master never needed it, or died)
    it exits quietly.
    """
    try:
        master_end, template_end = channel.pair()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        master_end.close()
        template_end.close()
        return None
    if pid == 0:
        master_end.close()
        _await_spec(template_end)
    template_end.close()
    return PreTemplate(pid, master_end)


def _await_spec(sock: socket.socket) -> NoReturn:
    code = 0
    try:
        gc.enable()  # `appliance serve` forks us with its collector paused (cli._cmd_serve)
        _reset_signals()
        # Nothing the master opened is ours (its stdin, stdout and stderr aside): what the
        # template needs comes with the spec.
        os.closerange(3, sock.fileno())
        os.closerange(sock.fileno() + 1, _max_fd())
        # The work this process exists for: the engine, and the worker's code run() needs.
        from appliance import importer  # noqa: F401
        from appliance.engines import asgi  # noqa: F401
        from appliance.worker import main  # noqa: F401

        spec = _receive_spec(sock)
        if spec is not None:
            run(spec)
    except BaseException:  # noqa: BLE001 - never return into the master's code
        code = 1
    finally:
        os._exit(code)


def _max_fd() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def hand_over(pre: PreTemplate, spec: TemplateSpec, environ: Mapping[str, str]) -> bool:
    """Give the pre-forked template its spec; False if it cannot take it (it then exits at
    EOF once the master closes ``pre.sock``).

    ``environ`` is the environment a template forked by the master now would inherit (the
    master's, without systemd's variables), and the template takes the master's file
    descriptor limit with it, as a fork would.
    """
    board = spec.board
    fds = [s.fileno() for s in spec.sockets] + [spec.alive_fd]
    if board is not None:
        fds.append(board.fd)
    if len(fds) > _MAX_FDS:
        return False
    wire = replace(spec, sockets=(), board=None, channel=None, alive_fd=-1, close_fds=())  # type: ignore[arg-type]
    payload = pickle.dumps(
        (
            wire,
            len(spec.sockets),
            None if board is None else board.capacity,
            dict(environ),
            resource.getrlimit(resource.RLIMIT_NOFILE),
        )
    )
    if len(payload) > _MAX_SPEC:
        return False
    try:
        pre.sock.sendmsg(
            [payload],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
            socket.MSG_NOSIGNAL,
        )
    except OSError:
        return False
    return True


def _receive_spec(sock: socket.socket) -> TemplateSpec | None:
    from appliance.engines.balance import LoadBoard

    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(_MAX_SPEC, socket.CMSG_SPACE(_MAX_FDS * 4))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None  # EOF: the master did not need us
    # The master that forked us wrote it (a pickle is only ever read from that channel).
    wire, n_sockets, capacity, environ, nofile = pickle.loads(data)
    if not isinstance(wire, TemplateSpec):
        return None
    os.environ.clear()
    os.environ.update(environ)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
    sockets = tuple(socket.socket(fileno=fd) for fd in fds[:n_sockets])
    rest = list(fds[n_sockets:])
    alive_fd = rest[0]
    board = LoadBoard(capacity, fd=rest[1]) if capacity is not None else None
    return replace(wire, sockets=sockets, alive_fd=alive_fd, board=board, channel=sock)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def run(spec: TemplateSpec) -> NoReturn:
    code = EXIT_CRASH
    try:
        _reset_signals()
        for fd in spec.close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        log.configure_logging(
            spec.log_level, spec.log_format, stream=log.named_stream(spec.log_stream)
        )
        log.clear_context()
        log.bind_context(pid=os.getpid(), generation=spec.generation)
        logger = log.get_logger()
        ours = appenv.engine_versions() if spec.environment.site_dir is not None else {}
        # The engine first, from appliance's own packages: the app (and an app venv with its
        # own uvicorn) then shares this copy, and every worker inherits it instead of
        # importing it again after its fork. So does the worker's own code (the master never
        # loads it).
        from appliance.engines import asgi  # noqa: F401
        from appliance.importer import AppImportError, check_importable, import_app
        from appliance.worker import main as worker_main  # noqa: F401

        appenv.enter(spec.environment)
        if spec.environment.site_dir is not None:
            shadowed = appenv.shadowed_engine(spec.environment.site_dir, ours)
            if shadowed:
                logger.warning(
                    "template.engine_shadowed",
                    virtualenv=spec.environment.virtualenv,
                    packages=shadowed,
                    appliance_versions={name: ours.get(name) for name in shadowed},
                    message="the app's virtualenv has other versions of these engine packages; "
                    "appliance serves with its own (they are shared with the app)",
                )
        app: object = None
        try:
            if spec.preload:
                app = import_app(spec.app_target, spec.app_directory)
            else:
                check_importable(spec.app_target, spec.app_directory)
        except AppImportError as exc:
            channel.send(spec.channel, channel.BootError(str(exc)))
            logger.exception("template.import_failed", error=str(exc))
            os._exit(EXIT_BOOT_ERROR)
        # What is loaded now is shared by every worker: keep the collector off its pages.
        gc.freeze()
        channel.send(spec.channel, channel.Ready())
        code = _serve_spawns(spec, app)
    except BaseException:  # noqa: BLE001 - never return into the master's code
        with contextlib.suppress(BaseException):
            log.get_logger().exception("template.crashed")
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


def _serve_spawns(spec: TemplateSpec, app: object) -> int:
    # Middle processes not reaped yet. Every spawn already sent is forked before any of them
    # is waited for, so the workers of a pool that starts (or grows) together are forked side
    # by side rather than one middle's lifetime apart.
    middles: list[int] = []
    while True:
        if middles and not _pending(spec.channel):
            _reap(middles)
        try:
            received = channel.receive(spec.channel)
        except InterruptedError:
            continue
        except OSError:
            break
        if received is None:
            break  # the master closed our channel: this generation is done (or it died)
        msg, fd = received
        if not isinstance(msg, channel.Spawn) or fd is None:
            if fd is not None:
                os.close(fd)
            log.get_logger().warning("template.bad_message", message=repr(msg))
            continue
        middle = _fork_worker(spec, msg, fd, app)
        if middle is not None:
            middles.append(middle)
    _reap(middles)
    return 0


def _pending(sock: socket.socket) -> bool:
    """Whether the master's next message (or EOF) can be read without waiting."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False  # reap first, as if nothing were waiting; the receive then reports it


def _reap(middles: list[int]) -> None:
    """Wait for the middle processes: each exits right after forking its worker."""
    while middles:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(middles.pop(), 0)


def _fork_worker(spec: TemplateSpec, msg: channel.Spawn, report_fd: int, app: object) -> int | None:
    """Fork the middle process for one worker; its pid, to be reaped (None: fork failed)."""
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(report_fd)
        channel.send(spec.channel, channel.SpawnFailed(msg.key, f"fork failed: {exc}"))
        return None
    if middle == 0:
        _middle(spec, msg, report_fd, app)
    os.close(report_fd)
    return middle


def _middle(spec: TemplateSpec, msg: channel.Spawn, report_fd: int, app: object) -> NoReturn:
    """Fork the worker, report its pid, exit: the worker is re-parented to the master."""
    try:
        pid = os.fork()
    except OSError as exc:
        channel.send(spec.channel, channel.SpawnFailed(msg.key, f"fork failed: {exc}"))
        os._exit(1)
    if pid == 0:
        from appliance.worker import main as worker_main  # loaded by run(), before any fork

        with contextlib.suppress(OSError):
            spec.channel.close()
        worker_main.run(
            worker_main.WorkerSpec(
                worker_id=msg.slot,
                generation=spec.generation,
                config_digest=spec.config_digest,
                app_target=spec.app_target,
                app_directory=spec.app_directory,
                preloaded_app=app,
                sockets=spec.sockets,
                engine=spec.engine,
                log_level=spec.log_level,
                log_format=spec.log_format,
                log_stream=spec.log_stream,
                report_fd=report_fd,
                alive_fd=spec.alive_fd,
                board=spec.board,
                lane=msg.lane,
            )
        )
    channel.send(spec.channel, channel.Forked(msg.key, pid))
    os._exit(0)
