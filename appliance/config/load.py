"""Merge and validate the configuration files, remembering which file set each key.

Loading is deterministic and traceable (systemd drop-in style): the main file first, then
``conf.d/*.toml`` next to it in lexical order. Tables merge key by key; scalars and arrays
(including the ``[[listen]]`` array of tables) are replaced whole by a later file, because
merging list entries by position would silently mix two files' sockets. While merging we record
which file set each leaf key, so that a validation error can say *where* to fix it (the file
is a full path in reality)::

    50-site.toml: workers.count: Input should be greater than or equal to 1 (got -1)

Validation runs once, on the merged result: a drop-in may legitimately fix a value an earlier
file got wrong, so intermediate states are never judged. Reading one file safely, and the
limits that bound the work, live in :mod:`appliance.config.read`; wording problems in
:mod:`appliance.config.problems`; writing TOML back in :mod:`appliance.config.render`. Their
public names are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance.config.problems import ConfigError, Problem, validation_problems
from appliance.config.read import (
    MAX_TOTAL_BYTES,
    MAX_VALUES,
    drop_ins,
    parse_layer,
    read_bytes,
    read_toml,
)
from appliance.config.render import (
    DEFAULT,
    render_key,
    render_origins,
    render_toml,
    render_value,
)
from appliance.config.schema import Settings

__all__ = [
    "DEFAULT",
    "DEFAULT_CONFIG",
    "ConfigError",
    "LoadedConfig",
    "Problem",
    "config_files",
    "load_config",
    "read_toml",
    "render_origins",
    "render_toml",
    "render_value",
    "settings_digest",
]

DEFAULT_CONFIG = Path("/etc/appliance/appliance.toml")


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


def config_files(main: Path) -> tuple[Path, ...]:
    """The regular-file drop-ins that follow ``main``, in the order :func:`load_config` reads.

    Never raises and never opens a file. It is for lenient readers (finding the control
    socket of a master whose config on disk no longer validates); :func:`load_config` itself
    also reports drop-ins that are not regular files, or too many of them.
    """
    paths, _ = drop_ins(main)
    return tuple(path for path in paths if os.path.isfile(path))


# --------------------------------------------------------------------------------------------
# Merging with provenance


def _forget(origins: dict[str, str], key: str, old: object) -> None:
    """Drop the provenance of ``key`` and everything below it: ``old`` is being replaced.

    Walks the value being replaced rather than every recorded key, so a drop-in replacing
    many tables costs what it replaces, not that times everything recorded.
    """
    if isinstance(old, dict) and old:
        for name, item in old.items():
            _forget(origins, f"{key}.{render_key(name)}", item)
    else:
        origins.pop(key, None)


def _record_leaves(origins: dict[str, str], key: str, value: object, file: str) -> None:
    """Record ``file`` for every leaf of ``value``; an empty table counts as a leaf."""
    if isinstance(value, dict) and value:
        for name, item in value.items():
            _record_leaves(origins, f"{key}.{render_key(name)}", item, file)
    else:
        origins[key] = file


def _merge(
    into: dict[str, Any], layer: Mapping[str, Any], origins: dict[str, str], file: str, prefix: str
) -> None:
    """Deep-merge ``layer`` into ``into`` in place, recording which file set each leaf."""
    for name, value in layer.items():
        key = f"{prefix}.{render_key(name)}" if prefix else render_key(name)
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            if not value:
                continue  # nothing to merge; an empty table keeps the file that made it
            if not into[name]:
                origins.pop(key, None)  # an empty table recorded as a leaf gets children now
            _merge(into[name], value, origins, file, key)
            continue
        if name in into:
            _forget(origins, key, into[name])
        into[name] = _copy(value)
        _record_leaves(origins, key, value, file)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {name: _copy(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | None = None, *, explicit: bool = False) -> LoadedConfig:
    """Load ``path`` (default ``/etc/appliance/appliance.toml``) and its ``conf.d``.

    With ``explicit`` (the operator named the file) a missing main file is an error. Otherwise
    a missing main file means "all defaults", and its ``conf.d`` is still read, so a package
    can ship drop-ins without owning the main file. Raises :class:`ConfigError` listing every
    problem: all problems of reading all files, or else all validation errors; never any
    other exception, whatever the files contain.

    The limits of :mod:`appliance.config.read` apply to the files together: every byte read
    counts against ``MAX_TOTAL_BYTES`` (parsing is the cost), and the keys of the files that
    parsed count against ``MAX_VALUES``.
    """
    main = DEFAULT_CONFIG if path is None else path
    paths, problems = drop_ins(main)
    candidates = [main, *paths]
    if not explicit and not os.path.exists(main):
        candidates.remove(main)
    files: list[Path] = []
    merged: dict[str, Any] = {}
    recorded: dict[str, str] = {}
    bytes_left, values_left = MAX_TOTAL_BYTES, MAX_VALUES
    for file in candidates:
        try:
            data = read_bytes(file, budget=bytes_left)
            bytes_left -= len(data)
            layer = parse_layer(file, data, budget=values_left)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        values_left -= layer.values
        files.append(file)
        _merge(merged, layer.table, recorded, str(file), "")
    if problems:
        raise ConfigError(problems)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise validation_problems(exc, Settings, merged, recorded, files) from None
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
