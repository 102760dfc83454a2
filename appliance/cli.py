"""``appliance``: serve, check and inspect a pre-fork pool (``appliance --help``).

Commands:
  serve    run the master and its worker pool (systemd's ExecStart)
  check    validate the configuration; exit 1 listing every problem (ExecStartPre)
  config   print the effective merged configuration (``--origin``: which file set each key)
  status   show the running master's workers, generation and last reload
  reload   roll the pool onto the current configuration and wait for the outcome (ExecReload)
  scale    change the pool size of the running master until the next reload
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance import __version__

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="appliance",
        description="A systemd-native, config-driven pre-fork server for Python ASGI/WSGI apps.",
        epilog="Settings reference: /usr/share/doc/appliance/settings.md (docs/settings.md).",
    )
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "serve",
        help="run the master and its worker pool",
        description=(
            "Run the master: load and validate the config, adopt the sockets systemd passed "
            "(LISTEN_FDNAMES matched to [[listen]] names) or bind them, fork the worker pool and "
            "supervise it. SIGHUP reloads by rolling replacement, SIGTERM drains and exits, "
            "SIGTTIN/SIGTTOU grow/shrink the pool by one."
        ),
    )
    _config_arg(s)

    c = sub.add_parser(
        "check",
        help="validate the configuration",
        description="Validate the config; exit 0, or exit 1 printing every problem as "
        "FILE: key: message (got VALUE).",
    )
    _config_arg(c)

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
    _config_arg(st)
    st.add_argument("--json", action="store_true", help="print the raw status document")

    r = sub.add_parser(
        "reload",
        help="reload and wait for the outcome",
        description="Ask the running master to reload (like SIGHUP) and wait until the rolling "
        "replacement finished: exit 0 on success, 1 with the reason when the config was invalid "
        "or a new worker could not boot (the old workers keep serving).",
    )
    _config_arg(r)
    r.add_argument(
        "--timeout", type=float, default=900.0, metavar="SECONDS", help="give up waiting after this"
    )

    sc = sub.add_parser(
        "scale",
        help="set the pool size of the running master",
        description="Set the number of workers of the running master (until the next reload).",
    )
    _config_arg(sc)
    sc.add_argument("workers", type=int, help="the new pool size")
    return p


def _config_path(args: argparse.Namespace) -> tuple[Path, bool]:
    from appliance.config.load import DEFAULT_CONFIG

    if args.config is not None:
        return args.config, True
    env = os.environ.get("APPLIANCE_CONFIG")
    if env:
        return Path(env), True
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
    loaded = _load(args)
    files = ", ".join(str(f) for f in loaded.files) or "no files (built-in defaults)"
    print(f"configuration ok ({files}; digest {loaded.digest})")
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from appliance.config.load import render_origins, render_toml

    loaded = _load(args)
    sys.stdout.write(render_origins(loaded) if args.origin else render_toml(loaded))
    return EXIT_OK


def _control_path(args: argparse.Namespace) -> str:
    """Where the running master listens, even when the config on disk is now broken.

    ``appliance reload`` must reach the master to be told *why* a new config is invalid, so a
    config that does not validate is read leniently here: only ``control.path`` matters.
    """
    import tomllib

    from appliance.config.load import ConfigError, config_files, load_config
    from appliance.config.schema import Settings, resolve_control_path

    path, explicit = _config_path(args)
    try:
        settings = load_config(path, explicit=explicit).settings
    except ConfigError:
        control_path = None
        for file in (path, *config_files(path)):
            try:
                with open(file, "rb") as f:
                    value = tomllib.load(f).get("control", {}).get("path")
            except (OSError, tomllib.TOMLDecodeError, AttributeError):
                continue
            if isinstance(value, str):
                control_path = value
        try:
            settings = Settings.model_validate({"control": {"path": control_path}})
        except ValueError:
            settings = Settings()
    return resolve_control_path(settings, os.environ, os.getuid())


def _client(args: argparse.Namespace, timeout: float) -> Any:
    from appliance.control import ControlClient

    return ControlClient(_control_path(args), timeout=timeout)


def _cmd_status(args: argparse.Namespace) -> int:
    from appliance.control import ControlUnavailable, format_status

    try:
        reply = _client(args, 10.0).call("status")
    except ControlUnavailable as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not reply.get("ok"):
        print(f"appliance: {reply.get('error')}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(reply["status"], indent=2, sort_keys=True))
    else:
        print(format_status(reply["status"]))
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    from appliance.control import ControlUnavailable

    tty = sys.stdout.isatty()
    final: dict[str, Any] = {}
    try:
        for msg in _client(args, args.timeout).stream("reload"):
            if "progress" in msg:
                p = msg["progress"]
                line = f"reloading: {p.get('message')}"
                if tty:
                    print(f"\r\x1b[K{line}", end="", flush=True)
                else:
                    print(line, flush=True)
            else:
                final = msg
    except ControlUnavailable as exc:
        print(f"appliance: reload failed: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except TimeoutError:
        print(f"appliance: reload: no outcome within {args.timeout:g}s", file=sys.stderr)
        return EXIT_FAIL
    if tty:
        print("\r\x1b[K", end="")
    if final.get("ok"):
        r = final.get("reload", {})
        print(f"reload ok: {r.get('message')} (generation {r.get('generation')})")
        return EXIT_OK
    print(f"appliance: reload failed: {final.get('error', 'no answer')}", file=sys.stderr)
    return EXIT_FAIL


def _cmd_scale(args: argparse.Namespace) -> int:
    from appliance.control import ControlUnavailable

    try:
        reply = _client(args, 10.0).call("scale", workers=args.workers)
    except ControlUnavailable as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not reply.get("ok"):
        print(f"appliance: scale failed: {reply.get('error')}", file=sys.stderr)
        return EXIT_FAIL
    print(f"pool size set to {args.workers}")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from appliance.serve import StartupError, serve

    path, explicit = _config_path(args)
    try:
        return serve(path, explicit=explicit)
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
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
