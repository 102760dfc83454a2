"""Where the CLI finds the running master's control socket, even when the config is broken.

``appliance reload`` must reach the master precisely when the config on disk has just gone
wrong, to be told why. So the socket path is looked up in this order, and nothing here raises:

1. ``--control PATH``, then ``$APPLIANCE_CONTROL``;
2. ``[control] path`` read leniently from the main file and its drop-ins, later files
   winning: a file that parses as TOML is read normally (nothing else in it is validated);
   one that does not is scanned line by line for ``path = "..."`` inside ``[control]``
   (:func:`scan_control_path`); a missing, huge (> 1 MiB), binary or unreadable file is
   skipped and remembered, so an error can say which files were not read;
3. the default of :func:`appliance.config.schema.resolve_control_path`.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from appliance.config.read import MAX_FILE_BYTES

__all__ = [
    "ENV_VAR",
    "MAX_CONFIG_BYTES",
    "SYSTEM_SOCKET",
    "ControlTarget",
    "locate_control",
    "read_control_path",
    "scan_control_path",
    "system_socket",
]

ENV_VAR: Final = "APPLIANCE_CONTROL"
SYSTEM_SOCKET: Final = "/run/appliance/control.sock"
"""The packaged service's socket (``RuntimeDirectory=appliance``)."""


def system_socket(env: Mapping[str, str]) -> str:
    """The packaged service's socket, or instance ``$APPLIANCE_INSTANCE``'s
    (``RuntimeDirectory=appliance-NAME`` in ``appliance@.service``)."""
    instance = env.get("APPLIANCE_INSTANCE", "")
    return f"/run/appliance-{instance}/control.sock" if instance else SYSTEM_SOCKET


MAX_CONFIG_BYTES: Final = MAX_FILE_BYTES  # the master reads no more of a file either
"""A config file larger than this is not read here (a real one is a few KiB)."""
_MAX_DROPINS: Final = 256
"""Drop-ins read at most; a conf.d with thousands of files is not worth reading for one key."""

_T = TypeVar("_T")

OPTION: Final = "--control"
DEFAULT: Final = "default"


@dataclass(frozen=True, slots=True)
class ControlTarget:
    """The socket to try, and how we came to it (for the error message when nobody is there).

    ``source`` is ``"--control"``, ``"$APPLIANCE_CONTROL"``, the config file that set
    ``[control] path``, or ``"default"``. ``unread`` lists the config files that could not be
    read, each as ``FILE: reason``.
    """

    path: str
    source: str
    unread: tuple[str, ...] = ()

    @property
    def explicit(self) -> bool:
        """The operator named the socket (``--control`` or ``$APPLIANCE_CONTROL``)."""
        return self.source in (OPTION, f"${ENV_VAR}")


def locate_control(
    option: str | None, main: Path, env: Mapping[str, str], uid: int
) -> ControlTarget:
    """Resolve the socket for ``appliance status|reload|scale`` (see the module docstring)."""
    if option:
        return ControlTarget(option, OPTION)
    if env.get(ENV_VAR):
        return ControlTarget(env[ENV_VAR], f"${ENV_VAR}")
    from appliance.config.schema import Settings, resolve_control_path

    path, source, unread = read_control_path(_candidates(main))
    if path is not None and source is not None:
        return ControlTarget(path, source, unread)
    return ControlTarget(resolve_control_path(Settings(), env, uid), DEFAULT, unread)


def _candidates(main: Path) -> list[Path]:
    from appliance.config.load import config_files

    try:
        dropins = list(config_files(main))
    except (OSError, ValueError, RuntimeError):  # an unreadable conf.d: the main file only
        dropins = []
    return [main, *dropins[:_MAX_DROPINS]]


def read_control_path(files: list[Path]) -> tuple[str | None, str | None, tuple[str, ...]]:
    """``[control] path`` from *files* (later files win): ``(path, file that set it, unread)``.

    A value that is not a valid socket path (relative, too long) is ignored, as the master
    would never have started with it.
    """
    from appliance.config.schema import ControlSettings

    found: str | None = None
    source: str | None = None
    unread: list[str] = []
    for file in files:
        text, reason = _read_text(file)
        if text is None:
            unread.append(f"{file}: {reason}")
            continue
        value = _parsed_control_path(text)
        if value is None:
            continue
        try:
            ControlSettings.model_validate({"path": value})
        except ValueError:
            unread.append(f"{file}: its [control] path is not a valid socket path")
            continue
        found, source = value, str(file)
    return found, source, tuple(unread)


def _read_text(path: Path) -> tuple[str | None, str]:
    """The file as text, or None and why not. Bounded, and never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, _why(exc)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > MAX_CONFIG_BYTES:
            return None, f"larger than {MAX_CONFIG_BYTES >> 10} KiB"
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return None, _why(exc)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:  # it grew since fstat
        return None, f"larger than {MAX_CONFIG_BYTES >> 10} KiB"
    if b"\0" in data:
        return None, "binary"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "not UTF-8"


def _parsed_control_path(text: str) -> str | None:
    # The config's own bounded parser: it refuses, in linear time, what would make tomllib slow
    # (thousands of dotted parts, deep nesting); the line scanner then gets its chance.
    from appliance.config.load import ConfigError
    from appliance.config.read import parse_layer

    try:
        doc = parse_layer(Path("control"), text.encode()).table
    except (ConfigError, ValueError, RecursionError):
        return scan_control_path(text)
    control = doc.get("control")
    value = control.get("path") if isinstance(control, dict) else None
    return value if isinstance(value, str) else None


def scan_control_path(text: str) -> str | None:
    """``[control] path`` from a file that does not parse as TOML, or None.

    Tolerant and line-based: tracks the current ``[table]`` header and takes the last
    ``path = "..."`` (basic or literal string, an optional comment after it) inside
    ``[control]``; also ``control.path = "..."`` and ``control = {path = "..."}`` before
    any table. A syntax error elsewhere in the file does not matter; one on that line does.
    Only string operations, no regular expressions, so a pathological line costs linear time.
    """
    table: str | None = ""  # "" is the root table; None is an array of tables
    found: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[["):
            table = None
        elif line.startswith("["):
            table = _header(line)
        elif table == "control":
            key, eq, value = line.partition("=")
            if eq and _bare(key) == "path":
                found = _toml_value(value, str) or found
        elif table == "":
            key, eq, value = line.partition("=")
            dotted = [_bare(part) for part in key.split(".")]
            if eq and dotted == ["control", "path"]:
                found = _toml_value(value, str) or found
            elif eq and dotted == ["control"]:
                inline = _toml_value(value, dict)
                if isinstance(inline, dict) and isinstance(inline.get("path"), str):
                    found = inline["path"]
    return found


def _header(line: str) -> str | None:
    """The name of a ``[table]`` header line; None when the line is not a clean header."""
    end = line.find("]")
    if end < 0:
        return None
    rest = line[end + 1 :].strip()
    if rest and not rest.startswith("#"):
        return None
    return ".".join(_bare(part) for part in line[1:end].split("."))


def _bare(key: str) -> str:
    """A key without its surrounding whitespace and quotes (``"control"`` is ``control``)."""
    key = key.strip()
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'":
        return key[1:-1]
    return key


def _toml_value(text: str, kind: type[_T]) -> _T | None:
    """One TOML value (with an optional trailing comment) decoded by tomllib itself."""
    try:
        value = tomllib.loads("v = " + text.strip()).get("v")
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, kind) else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
