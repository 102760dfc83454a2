"""``appliance check --app``: import the app once, in a throwaway child, in its environment.

The child is forked from the CLI, turns itself into the app's process exactly as a template
does (:func:`appliance.appenv.enter`), imports ``app.target`` and reports one line back on a
pipe. The CLI never imports the app itself, and a hanging import is killed at the deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from typing import NoReturn

from appliance import appenv
from appliance.importer import AppImportError, import_app

__all__ = ["probe_import"]

_MAX_REPLY = 4096


def probe_import(
    environment: appenv.AppEnvironment, target: str, directory: str | None, timeout_s: float
) -> tuple[bool, str, float]:
    """(ok, one line, seconds): whether ``target`` imports in ``environment``."""
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(environment, target, directory, write_fd)
    os.close(write_fd)
    data = b""
    try:
        deadline = started + timeout_s
        while len(data) < _MAX_REPLY:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                late = (
                    f'app.target "{target}": importing did not finish within '
                    f"{timeout_s:g}s (workers.boot_timeout_s)"
                )
                return False, late, time.monotonic() - started
            chunk = os.read(read_fd, _MAX_REPLY)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - started
    text = " ".join(data.decode("utf-8", "replace").split())
    if os.waitstatus_to_exitcode(status) == 0 and text == "ok":
        return True, f"{target} imports", elapsed
    return False, text or f'app.target "{target}": the import ended the process', elapsed


def _child(
    environment: appenv.AppEnvironment, target: str, directory: str | None, fd: int
) -> NoReturn:
    code = 1
    try:
        # Run as root by an operator, a .pyc written here would be root's, in the app's tree,
        # and could even be reused for a later source of the same size and mtime second.
        sys.dont_write_bytecode = True
        appenv.enter(environment)
        try:
            import_app(target, directory)
        except AppImportError as exc:
            os.write(fd, str(exc).encode()[:_MAX_REPLY])
        else:
            os.write(fd, b"ok")
            code = 0
    except BaseException as exc:  # noqa: BLE001 - one line, never a traceback
        with contextlib.suppress(BaseException):
            os.write(
                fd, f'app.target "{target}": {type(exc).__name__}: {exc}'.encode()[:_MAX_REPLY]
            )
    finally:
        os._exit(code)
