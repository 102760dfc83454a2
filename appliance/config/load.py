"""Read, merge and validate the configuration files; explain every problem in operator terms.

Loading is deterministic and traceable (systemd drop-in style): the main file first, then
``conf.d/*.toml`` next to it in lexical order. Tables merge key by key; scalars and arrays
(including the ``[[listen]]`` array of tables) are replaced whole by a later file, because
merging list entries by position would silently mix two files' sockets. While merging we record
which file set each leaf key, so that a validation error can say *where* to fix it (the file
is a full path in reality)::

    50-site.toml: workers.count: Input should be greater than or equal to 1 (got -1)

Validation runs once, on the merged result: a drop-in may legitimately fix a value an earlier
file got wrong, so intermediate states are never judged.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from appliance.config.schema import Settings

__all__ = [
    "DEFAULT",
    "DEFAULT_CONFIG",
    "ConfigError",
    "LoadedConfig",
    "Problem",
    "config_files",
    "load_config",
    "render_origins",
    "render_toml",
    "render_value",
]

DEFAULT_CONFIG = Path("/etc/appliance/appliance.toml")
DEFAULT = "(default)"
"""The origin of a key no file set."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, located as precisely as we can.

    ``key`` is a dotted path (``listen[0].address``), or empty when the problem concerns a
    whole file (not found, unreadable, TOML syntax). ``has_value`` distinguishes "the value was
    None" from "there is no value worth showing".
    """

    file: str
    key: str
    message: str
    value: object | None = None
    has_value: bool = False

    def __str__(self) -> str:
        parts = [self.file]
        if self.key:
            parts.append(self.key)
        text = ": ".join([*parts, self.message])
        if self.has_value:
            text += f" (got {render_value(self.value)})"
        return text


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` says every reason we found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated configuration plus the facts needed to explain it.

    ``origins`` maps every leaf key of the effective settings (``listen`` as one key) to the
    file that set it, or ``"(default)"``. ``digest`` identifies the effective settings (not the
    file bytes), so reformatting a file or moving a key to a drop-in keeps it, and the
    built-in app and ``appliance status`` can show which config a worker runs.
    """

    settings: Settings
    origins: Mapping[str, str]
    files: tuple[Path, ...]
    digest: str
    raw: Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# Reading and merging


def config_files(main: Path) -> tuple[Path, ...]:
    """The drop-ins that follow ``main``: ``conf.d/*.toml`` beside it, in lexical order.

    Hidden files (editor swap files, ``.#50-site.toml``) and non-files are skipped. Sorting by
    the name as a string gives the same order as systemd drop-ins, so ``50-site.toml`` always
    overrides ``10-package.toml``.
    """
    confd = main.parent / "conf.d"
    if not confd.is_dir():
        return ()
    return tuple(
        path
        for path in sorted(confd.glob("*.toml"), key=lambda p: p.name)
        if not path.name.startswith(".") and path.is_file()
    )


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position:
            line, column = position.groups()
            message = f"line {line}, column {column}: {message[: position.start()]}"
        else:
            message = "end of file: " + message.replace(" (at end of document)", "")
        raise ConfigError([Problem(str(path), "", message)]) from None
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "", "file not found")]) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([Problem(str(path), "", f"cannot read file: {reason}")]) from None


def _forget(origins: dict[str, str], key: str) -> None:
    """Drop the provenance of ``key`` and of everything below it (it is being replaced)."""
    for known in [k for k in origins if k == key or k.startswith((f"{key}.", f"{key}["))]:
        del origins[known]


def _record_leaves(origins: dict[str, str], key: str, value: object, file: str) -> None:
    if isinstance(value, dict):
        for name, item in value.items():
            _record_leaves(origins, f"{key}.{name}", item, file)
    else:
        origins[key] = file


def _merge(
    into: dict[str, Any], layer: Mapping[str, Any], origins: dict[str, str], file: str, prefix: str
) -> None:
    """Deep-merge ``layer`` into ``into`` in place, recording which file set each leaf."""
    for name, value in layer.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _merge(into[name], value, origins, file, key)
            continue
        _forget(origins, key)
        into[name] = _copy(value)
        _record_leaves(origins, key, value, file)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {name: _copy(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def load_config(path: Path | None = None, *, explicit: bool = False) -> LoadedConfig:
    """Load ``path`` (default ``/etc/appliance/appliance.toml``) and its ``conf.d``.

    With ``explicit`` (the operator named the file) a missing main file is an error. Otherwise
    a missing main file means "all defaults", and its ``conf.d`` is still read, so a package
    can ship drop-ins without owning the main file. Raises :class:`ConfigError` listing every
    problem: all syntax errors of all files, or else all validation errors.
    """
    main = DEFAULT_CONFIG if path is None else path
    files: list[Path] = []
    problems: list[Problem] = []
    merged: dict[str, Any] = {}
    recorded: dict[str, str] = {}
    candidates = [main, *config_files(main)]
    for index, file in enumerate(candidates):
        if index == 0 and not explicit and not file.exists():
            continue
        try:
            layer = _read_toml(file)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        files.append(file)
        _merge(merged, layer, recorded, str(file), "")
    if problems:
        raise ConfigError(problems)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, merged, recorded, files)) from None
    return LoadedConfig(
        settings=settings,
        origins=types.MappingProxyType(_all_origins(settings, recorded)),
        files=tuple(files),
        digest=settings_digest(settings),
        raw=types.MappingProxyType(merged),
    )


def settings_digest(settings: Settings) -> str:
    """First 12 hex digits of the SHA-256 of the settings as canonical JSON."""
    canonical = json.dumps(
        settings.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _leaf_keys(value: Any, prefix: str) -> list[str]:
    if isinstance(value, dict):
        return [key for name, item in value.items() for key in _leaf_keys(item, f"{prefix}.{name}")]
    return [prefix]


def _all_origins(settings: Settings, recorded: Mapping[str, str]) -> dict[str, str]:
    dumped = settings.model_dump(mode="json")
    return {
        key: recorded.get(key, DEFAULT)
        for section, value in dumped.items()
        for key in _leaf_keys(value, section)
    }


# --------------------------------------------------------------------------------------------
# Turning pydantic errors into problems


def _dotted(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _prefixes(loc: Sequence[int | str]) -> list[str]:
    """``listen[0].address`` -> the key, then each parent key, nearest first."""
    return [_dotted(loc[:end]) for end in range(len(loc), 0, -1)]


def _origin(
    loc: Sequence[int | str], recorded: Mapping[str, str], files: Sequence[Path]
) -> str | None:
    """The file that set ``loc`` or its nearest parent; else the last file setting a child.

    None means no file touched it (a default, or a missing required key).
    """
    for key in _prefixes(loc):
        if key in recorded:
            return recorded[key]
    if not loc:
        return None
    below = _dotted(loc)
    setters = {file for key, file in recorded.items() if key.startswith((f"{below}.", f"{below}["))}
    order = [str(path) for path in files]
    return max(setters, key=order.index) if setters else None


def _lookup(raw: Any, loc: Sequence[int | str]) -> tuple[bool, Any]:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, raw


def _section_model(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` (list indices are stepped over)."""
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        while typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unknown_key(loc: Sequence[int | str]) -> str:
    message = "unknown setting"
    model = _section_model(loc[:-1])
    if model is not None:
        valid = list(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        if close:
            message += f'; did you mean "{_dotted([*loc[:-1], close[0]])}"?'
        elif len(loc) > 1:
            message += f"; valid keys here: {', '.join(valid)}"
        else:
            message += f"; valid tables: {', '.join(valid)}"
    return message


_MESSAGES = {
    "missing": "required setting is missing",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "dict_type": "expected a table",
    "list_type": "expected an array",
}


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        message = message.replace("'", '"')
    return message


def _problems(
    exc: ValidationError,
    raw: Mapping[str, Any],
    recorded: Mapping[str, str],
    files: Sequence[Path],
) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc: tuple[int | str, ...] = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        message = _message(error)
        value, has_value = error.get("input"), True
        file = None
        if "at" in ctx:
            loc = (*loc, *ctx["at"])
            has_value, value = _lookup(raw, loc)
        elif "relation" in ctx:
            # Blame the first key of the pair some file set; word the message against the other.
            sides = ctx["relation"]
            name, message, value = next(
                (side for side in sides if _dotted((*loc, side[0])) in recorded), sides[0]
            )
            loc = (*loc, name)
        if error["type"] == "extra_forbidden":
            message, has_value = _unknown_key(loc), False
        elif error["type"] == "missing":
            has_value = False
        if file is None:
            file = _origin(loc, recorded, files) or DEFAULT
        problems.append(Problem(file, _dotted(loc), message, value, has_value))
    return problems


# --------------------------------------------------------------------------------------------
# Rendering


def render_value(value: object) -> str:
    """``value`` written the way TOML would: strings quoted, numbers and booleans bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_bare_key(k)} = {render_value(v)}" for k, v in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(item) for item in value) + "]"
    if value is None:
        return "nothing"
    return str(value)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _bare_key(key: object) -> str:
    text = str(key)
    return text if _BARE_KEY.match(text) else json.dumps(text, ensure_ascii=False)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def render_toml(loaded: LoadedConfig) -> str:
    """The full effective configuration as TOML (unset optional settings are left out).

    Feeding the output back through :func:`load_config` yields equal settings, which makes it
    a safe starting point for a new config and what ``appliance config`` prints.
    """
    header = f"# effective configuration, digest {loaded.digest}\n"
    return header + tomli_w.dumps(_without_none(loaded.settings.model_dump(mode="json")))


def render_origins(loaded: LoadedConfig) -> str:
    """The effective configuration as TOML, each value followed by ``# FILE`` that set it.

    Still valid TOML, so it can be copied into a file. Comments are aligned per table.
    Unset optional settings appear commented out, so every key is listed.
    """
    dumped = loaded.settings.model_dump(mode="json")
    blocks: list[str] = []
    for section, value in dumped.items():
        entries = value if isinstance(value, list) else [value]
        header = f"[[{section}]]" if isinstance(value, list) else f"[{section}]"
        for entry in entries:
            rows = []
            for name, item in entry.items():
                key = section if isinstance(value, list) else f"{section}.{name}"
                origin = loaded.origins.get(key, DEFAULT)
                line = f"{name} = {render_value(item)}" if item is not None else f"# {name} (unset)"
                rows.append((line, origin))
            width = max(len(line) for line, _ in rows)
            body = "\n".join(f"{line.ljust(width)}  # {origin}" for line, origin in rows)
            blocks.append(f"{header}\n{body}\n")
    return "\n".join(blocks)
