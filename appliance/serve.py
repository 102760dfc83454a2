"""``appliance serve``: everything that happens before the master loop starts.

Order matters and every step can refuse with one clear line, before anything is forked:
load and validate the config, set up logging, size the pool, adopt systemd's sockets by name
(or bind our own), check the app's environment (its virtualenv and paths, see
:mod:`appliance.appenv`), import the serving engine (never the app: that happens in each
generation's template process), open the control socket, then hand over to
:class:`appliance.master.runtime.Master`.
"""

from __future__ import annotations

import functools
import gc
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import __version__, log, systemd
from appliance.appenv import AppEnvError, AppEnvironment, check_findable
from appliance.appenv import resolve as resolve_app_environment
from appliance.config.load import ConfigError, load_config
from appliance.config.schema import Settings, resolve_control_path
from appliance.master import drainmark, policy
from appliance.master.events import Generation
from appliance.master.plan import decide_reload, generation_for
from appliance.master.runtime import Master, MasterDeps
from appliance.master.signals import SignalPipe
from appliance.master.state import MasterState
from appliance.sizing import size_pool
from appliance.sockets import Listener, ListenError, adopt_listener, bind_listener, close_listeners

if TYPE_CHECKING:
    from appliance.engines.settings import EngineSettings
    from appliance.worker.template import PreTemplate

__all__ = ["StartupError", "engine_settings", "open_listeners", "raise_nofile_limit", "serve"]


class StartupError(Exception):
    """``appliance serve`` cannot start; ``lines`` are printed as they are, no traceback."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def engine_settings(generation: Generation, *, listeners: Sequence[str]) -> EngineSettings:
    """What a generation's workers serve with; ``listeners`` names each socket, in order."""
    from appliance.engines.settings import EngineSettings
    from appliance.http.proxy import ProxyPolicy

    s = generation.settings
    proxy = {
        entry.name: ProxyPolicy(entry.name, entry.trusted_networks())
        for entry in s.listen
        if entry.proxy_protocol
    }
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
        max_request_line_bytes=s.http.max_request_line_bytes,
        max_header_fields=s.http.max_header_fields,
        max_header_field_bytes=s.http.max_header_field_bytes,
        request_head_timeout_s=s.http.request_head_timeout_s,
        request_body_timeout_s=s.http.request_body_timeout_s,
        websocket=s.websocket.enabled,
        websocket_max_message_bytes=s.websocket.max_message_bytes,
        websocket_ping_interval_s=s.websocket.ping_interval_s,
        websocket_ping_timeout_s=s.websocket.ping_timeout_s,
        websocket_per_message_deflate=s.websocket.per_message_deflate,
        wsgi_threads=s.wsgi.threads,
        heartbeat_timeout_s=s.workers.heartbeat_timeout_s,
        readiness_path=s.http.readiness_path,
        proxy=tuple(proxy.get(name) for name in listeners) if proxy else (),
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


def _app_environment(generation: Generation) -> AppEnvironment:
    """Checked again when a generation's template is forked: the disk may have changed."""
    return resolve_app_environment(generation.settings.app)


def _pool_target(settings: Settings) -> tuple[int, str]:
    size = size_pool(settings.workers)
    return size.workers, size.reason


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one and return (soft, hard).

    Each connection is a descriptor; the soft default of 1024 is reached by a thousand slow
    clients, while the hard limit (``LimitNOFILE=`` in the unit) is what the operator meant.
    Workers inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def serve(
    path: Path,
    *,
    explicit: bool,
    signals: SignalPipe | None = None,
    pretemplate: PreTemplate | None = None,
) -> int:
    try:
        loaded = load_config(path, explicit=explicit)
    except ConfigError as exc:
        raise StartupError(*(str(p) for p in exc.problems)) from None
    settings = loaded.settings
    env = os.environ
    log_stream = log.resolve_stream(settings.log.stream, os.getpid())
    log.configure_logging(
        settings.log.level, settings.log.format, stream=log.named_stream(log_stream)
    )
    logger = log.get_logger()
    pid = os.getpid()

    try:
        watchdog_s = systemd.watchdog_interval(env, pid)
        notifier = systemd.Notifier.from_environ(env)
    except systemd.SystemdEnvError as exc:
        raise StartupError(f"appliance: systemd environment: {exc}") from None

    try:
        check_findable(resolve_app_environment(settings.app), settings.app.target)
    except AppEnvError as exc:
        raise StartupError(f"appliance: {exc}") from None
    listeners = open_listeners(settings, dict(env), pid)
    # Workers must not see systemd's per-service variables (they would try to use them).
    systemd.scrub_env(env)

    control_path = resolve_control_path(settings, env, os.getuid())
    from appliance.control import ControlError, ControlServer

    try:
        control = ControlServer.bind(control_path)
    except ControlError as exc:
        close_listeners(listeners)
        raise StartupError(f"appliance: {exc}") from None
    except OSError as exc:
        close_listeners(listeners)
        raise StartupError(
            f"appliance: control socket {control_path}: {exc.strerror or exc}"
        ) from None
    agent = None
    agent_address = settings.agent.parsed()
    if agent_address is not None:
        from appliance.agent import AgentServer

        try:
            agent = AgentServer.bind(agent_address, settings.agent.address or "")
        except ListenError as exc:
            control.close()
            close_listeners(listeners)
            raise StartupError(f"appliance: {exc}") from None
    nofile = raise_nofile_limit()

    target, reason = _pool_target(settings)

    def reload_config(running_state: MasterState) -> tuple[Generation, bool] | str:
        """Read and size the new config (effects); :func:`decide_reload` gives the verdict."""
        try:
            new = load_config(path, explicit=explicit)
        except ConfigError as exc:
            return "; ".join(str(p) for p in exc.problems)
        try:
            check_findable(resolve_app_environment(new.settings.app), new.settings.app.target)
        except AppEnvError as exc:
            return str(exc)
        new_target, new_reason = _pool_target(new.settings)
        verdict = decide_reload(running_state.current, running_state.target, new, new_target)
        if isinstance(verdict, str):
            return verdict
        logger.info(
            "reload.planned",
            live=list(verdict.plan.live),
            rolling=list(verdict.plan.rolling),
            workers=new_target,
            sizing=new_reason,
        )
        return verdict.generation, verdict.live_only

    generation = generation_for(loaded, target)
    mark_path = drainmark.path_for(control_path)
    mark = _read_drain_mark(mark_path)
    state = policy.initial_state(
        generation,
        watchdog_interval_s=watchdog_s,
        now=time.monotonic(),
        drained=mark is not None,
        maint=mark is drainmark.Mark.MAINT,
    )
    if mark is not None:
        logger.info("master.drain_kept", mode=mark.value, file=mark_path)
    deps = MasterDeps(
        sockets=[listener.sock for listener in listeners],
        notifier=notifier,
        reload_config=reload_config,
        engine_settings=functools.partial(
            engine_settings, listeners=[listener.name for listener in listeners]
        ),
        app_environment=_app_environment,
        control=control,
        agent=agent,
        signals=signals,
        pretemplate=pretemplate,
        drain_mark=mark_path,
        log_stream=log_stream,
        on_exit=[
            lambda: close_listeners(listeners),
            control.close,
            *([agent.close] if agent is not None else []),
        ],
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
        agent=None if agent is None else agent.address(),
        watchdog_interval_s=watchdog_s,
        open_files_limit=nofile[0],
    )
    notifier.send(systemd.mainpid(pid))
    # `appliance serve` starts up with the collector paused (cli): what start-up built lives
    # as long as the master, so it is frozen out of the collector's walks, not walked first.
    gc.freeze()
    gc.enable()
    return master.run()


def _read_drain_mark(path: str) -> drainmark.Mark | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return drainmark.parse(f.read(64))
    except OSError:
        return None


def _sockname(listener: Listener) -> str:
    try:
        name = listener.sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{name}" if name else "unix:?"
