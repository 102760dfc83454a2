"""Write settings and values back as TOML: for ``appliance config``, the docs and error messages.

Everything an operator reads about a value goes through :func:`render_value`, so a value in a
problem, in ``docs/settings.md`` and in ``appliance config --origin`` is spelt the same way,
and a string from a config file can never put a newline or a terminal escape into one line of
output: every character that is not printable is written as a TOML escape.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.config.load import LoadedConfig

__all__ = ["DEFAULT", "quote", "render_key", "render_origins", "render_toml", "render_value"]

DEFAULT = "(default)"
"""The origin of a key no file set."""

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def quote(text: str) -> str:
    """``text`` as a TOML basic string, with every non-printable character escaped.

    ``json.dumps`` already escapes quotes, backslashes and C0 controls in forms TOML shares;
    the rest (C1 controls, bidi overrides, line separators) are escaped here.
    """
    quoted = json.dumps(text, ensure_ascii=False)
    if quoted.isprintable():
        return quoted
    return "".join(char if char.isprintable() else _escape(char) for char in quoted)


def render_key(key: object) -> str:
    """One key part as TOML writes it: bare when it can be, quoted otherwise."""
    text = str(key)
    return text if _BARE_KEY.match(text) else quote(text)


def render_value(value: object) -> str:
    """``value`` written the way TOML would: strings quoted, numbers and booleans bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{render_key(k)} = {render_value(v)}" for k, v in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(item) for item in value) + "]"
    if value is None:
        return "nothing"
    return str(value)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def render_toml(loaded: LoadedConfig) -> str:
    """The full effective configuration as TOML (unset optional settings are left out).

    Feeding the output back through :func:`~appliance.config.load.load_config` yields equal
    settings, which makes it a safe starting point for a new config and what
    ``appliance config`` prints.
    """
    import tomli_w  # `appliance config` only: not loaded by `appliance serve`

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
