"""A worker's whole life after ``fork()``: reset what the master set up, boot, serve, exit.

This function never returns: it ends in ``os._exit`` so the child can never fall back into the
master's loop (or run its ``finally`` blocks and atexit handlers). Exit codes are a contract
with the master: ``EXIT_OK`` after a drain, ``EXIT_BOOT_ERROR`` when the app cannot be
imported or its lifespan startup failed (reported on the pipe first, so the log says why).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from appliance import log
from appliance.importer import AppImportError, import_app
from appliance.worker import info, protocol

if TYPE_CHECKING:
    from appliance.engines.balance import LoadBoard
    from appliance.engines.settings import EngineSettings

__all__ = ["EXIT_BOOT_ERROR", "EXIT_CRASH", "EXIT_OK", "WorkerSpec", "run"]

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT_ERROR = 3

_IGNORED = (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGQUIT)
_DEFAULT = (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker_id: int
    generation: int
    config_digest: str
    app_target: str
    app_directory: str | None
    #: The app the master imported (``app.preload``), else None: import it here.
    preloaded_app: object
    sockets: tuple[socket.socket, ...]
    engine: EngineSettings
    log_level: str
    log_format: str
    log_stream: str
    report_fd: int
    alive_fd: int | None
    board: LoadBoard | None = None
    lane: int | None = None


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in _DEFAULT:
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C on a terminal reaches the whole process group: the master decides, not us.
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    # The master asks for our stack with SIGUSR1 before it kills a hung worker.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def run(spec: WorkerSpec) -> NoReturn:
    code = EXIT_CRASH
    try:
        _reset_signals()
        pid = os.getpid()
        info.set_current(info.WorkerInfo(spec.worker_id, pid, spec.generation, spec.config_digest))
        log.configure_logging(
            spec.log_level, spec.log_format, stream=log.named_stream(spec.log_stream)
        )
        log.clear_context()
        log.bind_context(worker_id=spec.worker_id, pid=pid, generation=spec.generation)
        logger = log.get_logger()
        if spec.preloaded_app is not None:
            app = spec.preloaded_app
        else:
            try:
                app = import_app(spec.app_target, spec.app_directory)
            except AppImportError as exc:
                protocol.send(spec.report_fd, protocol.BootError(str(exc)))
                logger.exception("worker.import_failed", error=str(exc))
                os._exit(EXIT_BOOT_ERROR)
        from appliance.engines import asgi

        code = asgi.serve(
            app,
            list(spec.sockets),
            spec.engine,
            report_fd=spec.report_fd,
            alive_fd=spec.alive_fd,
            board=spec.board,
            lane=spec.lane,
        )
    except SystemExit as exc:  # uvicorn exits 3 when the app's lifespan startup fails
        code = exc.code if isinstance(exc.code, int) else EXIT_CRASH
        if code == EXIT_BOOT_ERROR:
            protocol.send(spec.report_fd, protocol.BootError("the app's lifespan startup failed"))
    except BaseException:  # noqa: BLE001 - the last line of defence before os._exit
        try:
            log.get_logger().exception("worker.crashed")
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        code = EXIT_CRASH
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
