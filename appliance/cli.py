"""``appliance``: serve, check and inspect a pre-fork pool (``appliance --help``).

Commands:
  serve    run the master and its worker pool (systemd's ExecStart)
  check    validate the configuration; exit 1 listing every problem (ExecStartPre)
  config   print the effective merged configuration (``--origin``: which file set each key)
  status   show the running master's workers, generation and last reload
  reload   roll the pool onto the current configuration and wait for the outcome (ExecReload)
  scale    change the pool size of the running master until the next reload
  drain    tell balancers to send nothing new (agent-check drain, readiness 503); keep serving
  undrain  tell balancers to send connections again
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__

if TYPE_CHECKING:
    from appliance.control import ControlClient, ControlError
    from appliance.control.locate import ControlTarget

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

INSTANCE_ENV = "APPLIANCE_INSTANCE"
_INSTANCE_MAX = 21  # "appliance-NAME" is the instance's dynamic user; a user name has <= 31
_INSTANCE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _instance_name(text: str) -> str:
    """``--instance``: the NAME of ``appliance@NAME``; it becomes part of paths and a user name."""
    if not (
        0 < len(text) <= _INSTANCE_MAX and set(text) <= _INSTANCE_CHARS and text[0] not in "-_"
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: 1-{_INSTANCE_MAX} lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    return text


def instance_config(instance: str) -> Path:
    """The main config file of ``appliance@NAME`` (its drop-ins are in ``conf.d/`` beside it)."""
    return Path("/etc/appliance") / instance / "appliance.toml"


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        type=Path,
        default=None,
        help=(
            "main config file; drop-ins are read from conf.d/*.toml beside it in lexical order "
            "(default: $APPLIANCE_CONFIG or /etc/appliance/appliance.toml; a missing default "
            "file means built-in defaults)"
        ),
    )


_MAX_TIMEOUT_S = 86400.0


def _seconds(text: str) -> float:
    """``--timeout``: a positive, finite number of seconds (a socket timeout must fit time_t)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= _MAX_TIMEOUT_S):
        raise argparse.ArgumentTypeError(f"must be > 0 and <= {_MAX_TIMEOUT_S:g} (got {text})")
    return value


def _socket_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _control_args(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    """``--config``, ``--control`` and ``--timeout``: the options every client command takes."""
    _config_arg(parser)
    parser.add_argument(
        "--control",
        metavar="PATH",
        type=_socket_path,
        default=None,
        help=(
            "the master's control socket (default: $APPLIANCE_CONTROL, else [control] path "
            "from the config files, read even when they are broken, else "
            "$RUNTIME_DIRECTORY/control.sock, /run/appliance/control.sock as root, "
            "$XDG_RUNTIME_DIR/appliance/control.sock or /tmp/appliance-UID/control.sock); "
            "use it when [control] path is set in a file that is missing or unreadable"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=timeout,
        metavar="SECONDS",
        help=f"give up when the master has not answered within this, in all (default {timeout:g})",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="appliance",
        description="A systemd-native, config-driven pre-fork server for Python ASGI/WSGI apps.",
        epilog="Settings reference: /usr/share/doc/appliance/settings.md (docs/settings.md).",
    )
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    p.add_argument(
        "--instance",
        metavar="NAME",
        type=_instance_name,
        default=None,
        help=(
            "act on the instance appliance@NAME (default: $APPLIANCE_INSTANCE): its config is "
            "/etc/appliance/NAME/appliance.toml and conf.d/, its control socket "
            "/run/appliance-NAME/control.sock, its journal identifier appliance@NAME"
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "serve",
        help="run the master and its worker pool",
        description=(
            "Run the master: load and validate the config, adopt the sockets systemd passed "
            "(LISTEN_FDNAMES matched to [[listen]] names) or bind them, fork the worker pool and "
            "supervise it. SIGHUP reloads by rolling replacement, SIGTERM drains and exits "
            "(after workers.drain_delay_s, while balancers are told drain), "
            "SIGTTIN/SIGTTOU grow/shrink the pool by one."
        ),
    )
    _config_arg(s)

    c = sub.add_parser(
        "check",
        help="validate the configuration",
        description="Validate the config; exit 0, or exit 1 printing every problem as "
        "FILE: key: message (got VALUE). The app's environment (app.virtualenv, "
        "app.python_path) is checked too.",
    )
    _config_arg(c)
    c.add_argument(
        "--app",
        action="store_true",
        help="also import the app once, in a throwaway child with its configured environment "
        "(virtualenv, paths, env), and report the import error in one line",
    )

    cfg = sub.add_parser(
        "config",
        help="print the effective configuration as TOML",
        description="Print the effective merged configuration (defaults included) as TOML.",
    )
    _config_arg(cfg)
    cfg.add_argument("--origin", action="store_true", help="show which file set each key")

    st = sub.add_parser(
        "status",
        help="show the running master's pool",
        description="Ask the running master (over its control socket) for its phase, "
        "generation, workers and last reload.",
    )
    _control_args(st, timeout=10.0)
    st.add_argument("--json", action="store_true", help="print the raw status document")

    r = sub.add_parser(
        "reload",
        help="reload and wait for the outcome",
        description="Ask the running master to reload (like SIGHUP) and wait until the rolling "
        "replacement finished: exit 0 on success, 1 with the reason when the config was invalid "
        "or a new worker could not boot (the old workers keep serving).",
    )
    _control_args(r, timeout=900.0)

    sc = sub.add_parser(
        "scale",
        help="set the pool size of the running master",
        description="Set the number of workers of the running master (until the next reload).",
    )
    _control_args(sc, timeout=10.0)
    sc.add_argument("workers", type=int, help="the new pool size")

    d = sub.add_parser(
        "drain",
        help="tell balancers to send nothing new; the workers keep serving",
        description="Change only what the running master tells balancers: the [agent] "
        "agent-check answers drain (or maint with --maint) and http.readiness_path answers "
        "503, while the workers keep serving every connection they get. Returns once the "
        "master's answer has changed (the reply shows the agent-check line); draining again "
        "is not an error. Fails while the master is stopping. Until `appliance undrain` or a "
        "restart; a reload keeps it.",
    )
    _control_args(d, timeout=10.0)
    d.add_argument(
        "--maint",
        action="store_true",
        help="answer maint instead of drain: HAProxy then sends this host nothing at all, "
        "not even on persistent sessions",
    )
    u = sub.add_parser(
        "undrain",
        help="tell balancers to send connections again",
        description="Undo `appliance drain` (or --maint): the agent-check answers ready NN% "
        "again and http.readiness_path 200. Returns once the master's answer has changed; "
        "undraining a master that is not drained is not an error.",
    )
    _control_args(u, timeout=10.0)
    return p


def _config_path(args: argparse.Namespace) -> tuple[Path, bool]:
    from appliance.config.load import DEFAULT_CONFIG

    if args.config is not None:
        return args.config, True
    env = os.environ.get("APPLIANCE_CONFIG")
    if env:
        return Path(env), True
    instance = os.environ.get(INSTANCE_ENV)
    if instance:
        return instance_config(instance), False
    return DEFAULT_CONFIG, False


def _load(args: argparse.Namespace) -> Any:
    """Load the config or print every problem and exit 1."""
    from appliance.config.load import ConfigError, load_config

    path, explicit = _config_path(args)
    try:
        return load_config(path, explicit=explicit)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(EXIT_FAIL) from None


def _cmd_check(args: argparse.Namespace) -> int:
    from appliance.appenv import AppEnvError, check_findable, resolve

    loaded = _load(args)
    app = loaded.settings.app
    try:
        environment = resolve(app)
        check_findable(environment, app.target)
    except AppEnvError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_FAIL
    files = ", ".join(str(f) for f in loaded.files) or "no files (built-in defaults)"
    line = f"configuration ok ({files}; digest {loaded.digest})"
    if args.app:
        from appliance.worker.probe import probe_import

        ok, text, seconds = probe_import(
            environment, app.target, app.directory, loaded.settings.workers.boot_timeout_s
        )
        if not ok:
            print(f"appliance: {text}", file=sys.stderr)
            return EXIT_FAIL
        line += f"; app {text} ({seconds:.2f}s)"
    print(line)
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from appliance.config.load import render_origins, render_toml

    loaded = _load(args)
    sys.stdout.write(render_origins(loaded) if args.origin else render_toml(loaded))
    return EXIT_OK


def _target(args: argparse.Namespace) -> ControlTarget:
    """The socket to talk to: ``--control``, ``$APPLIANCE_CONTROL``, or the config, read
    leniently so that a broken config does not hide the master (see ``control.locate``)."""
    from appliance.control.locate import locate_control

    main, _explicit = _config_path(args)
    return locate_control(args.control, main, os.environ, os.getuid())


def _client(target: ControlTarget, args: argparse.Namespace) -> ControlClient:
    from appliance.control import ControlClient

    return ControlClient(target.path, timeout=args.timeout)


def _one_line(text: object) -> str:
    """*text* (from the master, maybe hostile) as one printable line: newlines folded to
    spaces, other control characters escaped, so it cannot forge lines or move the cursor."""
    folded = " ".join(str(text).splitlines())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in folded)


def _fail(command: str, reason: object) -> int:
    print(f"appliance: {command} failed: {_one_line(reason)}", file=sys.stderr)
    return EXIT_FAIL


def _unreachable(command: str, target: ControlTarget, exc: ControlError) -> int:
    """Report a failed conversation; when nobody listened, say where else to look."""
    from appliance.control import ControlUnavailable
    from appliance.control.locate import DEFAULT, system_socket

    if not (isinstance(exc, ControlUnavailable) and exc.nobody_listening) or target.explicit:
        return _fail(command, exc)
    system = system_socket(os.environ)
    if (
        target.source == DEFAULT
        and os.getuid() != 0
        and target.path != system
        and os.path.lexists(system)
    ):
        return _fail(
            command,
            "permission denied or not running as the service user: the system master's socket "
            f"is {system} (mode 0600); run as root (tried {target.path})",
        )
    hint = f"{exc}; pass --control PATH if [control] path is set in a file that is missing or "
    hint += "unreadable"
    if target.unread:
        hint += f" (not read: {', '.join(target.unread)})"
    return _fail(command, hint)


def _converse(
    command: str,
    args: argparse.Namespace,
    talk: Callable[[ControlClient], Iterator[dict[str, Any]]],
) -> dict[str, Any] | int:
    """Run one conversation; the final reply, or the exit status after printing one line."""
    from appliance.control import ControlError

    target = _target(args)
    final: dict[str, Any] = {}
    try:
        for reply in talk(_client(target, args)):
            final = reply
    except ControlError as exc:
        return _unreachable(command, target, exc)
    if final.get("ok") is not True:
        return _fail(command, final.get("error", "the master sent no reason"))
    return final


def _cmd_status(args: argparse.Namespace) -> int:
    from appliance.control import format_status

    final = _converse("status", args, lambda client: iter([client.call("status")]))
    if isinstance(final, int):
        return final
    status = final.get("status")
    if not isinstance(status, Mapping):
        return _fail("status", "unexpected reply from the master: no status document")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()

    def talk(client: ControlClient) -> Iterator[dict[str, Any]]:
        for msg in client.stream("reload"):
            progress = msg.get("progress")
            if "ok" not in msg and isinstance(progress, Mapping):
                line = f"reloading: {_one_line(progress.get('message') or 'in progress')}"
                if tty:
                    print(f"\r\x1b[K{line}", end="", flush=True)
                else:
                    print(line, flush=True)
            yield msg

    try:
        final = _converse("reload", args, talk)
    finally:
        if tty:
            print("\r\x1b[K", end="", flush=True)
    if isinstance(final, int):
        return final
    outcome = final.get("reload")
    outcome = outcome if isinstance(outcome, Mapping) else {}
    text = "reload ok"
    if outcome.get("message"):
        text += f": {_one_line(outcome['message'])}"
    if outcome.get("generation") is not None:
        text += f" (generation {_one_line(outcome['generation'])})"
    print(text)
    return EXIT_OK


def _cmd_scale(args: argparse.Namespace) -> int:
    final = _converse(
        "scale", args, lambda client: iter([client.call("scale", workers=args.workers)])
    )
    if isinstance(final, int):
        return final
    workers = final.get("workers", args.workers)
    print(f"pool size set to {_one_line(workers)}")
    return EXIT_OK


def _cmd_drain(args: argparse.Namespace) -> int:
    command = args.command
    if command == "drain" and args.maint:
        request: dict[str, Any] = {"maint": True}
    else:
        request = {}
    final = _converse(command, args, lambda client: iter([client.call(command, **request)]))
    if isinstance(final, int):
        return final
    outcome = final.get("drain")
    outcome = outcome if isinstance(outcome, Mapping) else {}
    print(_one_line(outcome.get("message") or f"{command} ok"))
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    # Start-up builds what lives as long as the master (modules, classes, the settings): the
    # cyclic collector would walk it some 80 times for nothing, about 5% of the start-up.
    # serve() freezes it and turns the collector back on before the loop.
    gc.disable()
    try:
        return _serve(args)
    finally:
        gc.enable()


def _serve(args: argparse.Namespace) -> int:
    # Before the heavy imports: a SIGHUP from here on is kept for the loop, not fatal.
    from appliance.master.signals import SignalPipe

    signals = SignalPipe()
    signals.install_early()
    # The first template imports the engine on the other core while we read the config.
    from appliance.worker.template import prefork

    pretemplate = prefork()
    from appliance.serve import StartupError, serve

    path, explicit = _config_path(args)
    try:
        return serve(path, explicit=explicit, signals=signals, pretemplate=pretemplate)
    except StartupError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_FAIL


_COMMANDS = {
    "serve": _cmd_serve,
    "check": _cmd_check,
    "config": _cmd_config,
    "status": _cmd_status,
    "reload": _cmd_reload,
    "scale": _cmd_scale,
    "drain": _cmd_drain,
    "undrain": _cmd_drain,
}


def _select_instance(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--instance NAME`` is ``$APPLIANCE_INSTANCE``: set in the environment, so the config
    and socket defaults, the journal identifier, and every process the master starts see it."""
    instance = args.instance
    if instance is None and os.environ.get(INSTANCE_ENV):
        try:
            instance = _instance_name(os.environ[INSTANCE_ENV])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"${INSTANCE_ENV}: {exc}")
    if instance is None:
        os.environ.pop(INSTANCE_ENV, None)  # an empty value means none
    else:
        os.environ[INSTANCE_ENV] = instance


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _select_instance(parser, args)
    # Text from the master may hold lone surrogates ("\\udcff" is valid JSON): print it
    # escaped rather than die with UnicodeEncodeError halfway through the output.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `appliance status | head -1`: the reader left, nothing to say
        _silence_stdout()
        return EXIT_FAIL


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real fd behind stdout (an embedding, a test)
        pass


if __name__ == "__main__":
    raise SystemExit(main())
