"""``appliance serve``: everything that happens before the master loop starts.

Order matters and every step can refuse with one clear line, before anything is forked:
load and validate the config, set up logging, size the pool, adopt systemd's sockets by name
(or bind our own), import the serving engine (and the app, with ``app.preload``; otherwise
only check that its module can be found), open the control socket, then hand over to
:class:`appliance.master.runtime.Master`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from appliance import __version__, log, systemd
from appliance.config.load import ConfigError, LoadedConfig, load_config
from appliance.config.schema import Settings, resolve_control_path
from appliance.importer import AppImportError, check_importable, import_app
from appliance.master import policy
from appliance.master.events import Generation
from appliance.master.plan import generation_for, plan_reload
from appliance.master.runtime import Master, MasterDeps
from appliance.master.state import MasterState
from appliance.sizing import size_pool
from appliance.sockets import Listener, ListenError, adopt_listener, bind_listener, close_listeners

__all__ = ["StartupError", "engine_settings", "open_listeners", "serve"]


class StartupError(Exception):
    """``appliance serve`` cannot start; ``lines`` are printed as they are, no traceback."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def engine_settings(generation: Generation) -> Any:
    from appliance.engines.asgi import EngineSettings

    s: Settings = generation.config.settings
    return EngineSettings(
        interface=s.app.interface,
        lifespan=s.app.lifespan,
        keepalive_timeout_s=s.http.keepalive_timeout_s,
        limit_concurrency=s.http.limit_concurrency,
        access_log=s.http.access_log,
        proxy_headers=s.http.proxy_headers,
        forwarded_allow_ips=s.http.forwarded_allow_ips,
        graceful_timeout_s=s.workers.graceful_timeout_s,
        heartbeat_interval_s=s.workers.heartbeat_interval_s,
        accept=s.http.accept,
    )


def open_listeners(settings: Settings, env: dict[str, str], pid: int) -> list[Listener]:
    """Adopt the sockets systemd passed (matched by name), or bind the configured addresses."""
    names = [entry.name for entry in settings.listen]
    try:
        fds = systemd.ListenFds.from_environ(env, pid)
        if fds is not None:
            claimed = systemd.claim_listeners(names, fds)
            return [adopt_listener(fd, name) for name in names for fd in claimed[name]]
    except systemd.SystemdEnvError as exc:
        raise StartupError(f"appliance: socket activation: {exc}") from None
    except ListenError as exc:
        raise StartupError(f"appliance: {exc}") from None
    listeners: list[Listener] = []
    try:
        for entry in settings.listen:
            listeners.append(bind_listener(entry))
    except ListenError as exc:
        close_listeners(listeners)
        raise StartupError(f"appliance: {exc}") from None
    return listeners


def _pool_target(settings: Settings) -> tuple[int, str]:
    size = size_pool(settings.workers)
    return size.workers, size.reason


def serve(path: Path, *, explicit: bool) -> int:
    try:
        loaded = load_config(path, explicit=explicit)
    except ConfigError as exc:
        raise StartupError(*(str(p) for p in exc.problems)) from None
    settings = loaded.settings
    env = os.environ
    log.configure_logging(settings.log.level, settings.log.format)
    logger = log.get_logger()
    pid = os.getpid()

    try:
        watchdog_s = systemd.watchdog_interval(env, pid)
        notifier = systemd.Notifier.from_environ(env)
    except systemd.SystemdEnvError as exc:
        raise StartupError(f"appliance: systemd environment: {exc}") from None

    from appliance.engines import preload_engine

    preload_engine()
    app = None
    try:
        if settings.app.preload:
            app = import_app(settings.app.target, settings.app.directory)
        else:
            check_importable(settings.app.target, settings.app.directory)
    except AppImportError as exc:
        raise StartupError(f"appliance: {exc}") from None

    listeners = open_listeners(settings, dict(env), pid)
    # Workers must not see systemd's per-service variables (they would try to use them).
    systemd.scrub_env(env)

    control = None
    control_path = resolve_control_path(settings, env, os.getuid())
    try:
        from appliance.control import ControlServer

        control = ControlServer.bind(control_path)
    except OSError as exc:
        close_listeners(listeners)
        raise StartupError(
            f"appliance: control socket {control_path}: {exc.strerror or exc}"
        ) from None

    target, reason = _pool_target(settings)

    def reload_config(running_state: MasterState) -> tuple[Generation, bool] | str:
        try:
            new = load_config(path, explicit=explicit)
        except ConfigError as exc:
            return "; ".join(str(p) for p in exc.problems)
        # Diff against what the pool runs now (an aborted reload reverted to the old config).
        running: LoadedConfig = running_state.current.config
        plan = plan_reload(running.settings, new.settings)
        if plan.restart:
            return plan.restart_error()
        new_target, new_reason = _pool_target(new.settings)
        logger.info(
            "reload.planned",
            live=list(plan.live),
            rolling=list(plan.rolling),
            workers=new_target,
            sizing=new_reason,
        )
        if new.settings.app.preload and not plan.live_only:
            logger.warning(
                "reload.preload_note",
                message="app.preload is on: new workers run the app code the master imported "
                "at start; restart the service to load new application code",
            )
        live_only = plan.live_only and new_target == running_state.target
        return generation_for(new, new_target), live_only

    generation = generation_for(loaded, target)
    state = policy.initial_state(generation, watchdog_interval_s=watchdog_s, now=time.monotonic())
    deps = MasterDeps(
        sockets=[listener.sock for listener in listeners],
        notifier=notifier,
        reload_config=reload_config,
        engine_settings=engine_settings,
        preloaded_app=app,
        control=control,
        on_exit=[lambda: close_listeners(listeners), control.close],
    )
    master = Master(state, deps)
    logger.info(
        "master.started",
        pid=pid,
        version=__version__,
        config_files=[str(f) for f in loaded.files],
        listeners=[
            {
                "name": lst.name,
                "address": _sockname(lst),
                "from": "systemd" if lst.adopted else "bound",
            }
            for lst in listeners
        ],
        workers=target,
        sizing=reason,
        control_socket=control_path,
        watchdog_interval_s=watchdog_s,
    )
    notifier.send(systemd.mainpid(pid))
    return master.run()


def _sockname(listener: Listener) -> str:
    try:
        name = listener.sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{name}" if name else "unix:?"
