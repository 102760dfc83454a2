"""Everything wrong with a configuration, told as one bounded line per problem.

A problem names the file, the key and the value (Unicorn's "too low (< 1):
worker_processes=0" spirit)::

    50-site.toml: workers.count: Input should be greater than or equal to 1 (got -1)

The same lines go to the terminal (``appliance check``, the unit's ``ExecStartPre``), into the
log and into the answer to ``appliance reload`` when a reload is refused, so whatever a file
contains they must stay short and each on one line: at most :data:`MAX_PROBLEMS` are kept, text taken from a file is cut to
:data:`MAX_SHOWN_CHARS` and non-printable characters are escaped. This module also turns
pydantic's ``ValidationError`` into problems, blaming the file that set each key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from appliance.config.introspect import section_model
from appliance.config.render import DEFAULT, render_key, render_value

__all__ = [
    "MAX_PROBLEMS",
    "MAX_SHOWN_CHARS",
    "ConfigError",
    "Problem",
    "clip",
    "dotted_key",
    "validation_problems",
]

MAX_PROBLEMS = 20
"""Problems kept per error; the rest become one "... and N more problems" line.

A real mistake produces a handful; a file of garbage produces thousands that all say the same
thing, and a log line or terminal screen of them helps nobody (one such reload once wrote a
308 MB log line).
"""

MAX_SHOWN_CHARS = 200
"""Characters of a key, value or parser message from a file shown in one problem.

Enough to recognise any real value (the longest setting value is a path of 107 bytes); a
64 KiB string is still shown as its start, followed by ``…``.
"""

_MAX_SUGGESTED_KEY = 64
"""Keys longer than this get no "did you mean": no setting name comes close, and difflib's
cost grows with the length of the key."""


def clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked with ``…`` when it was longer."""
    return text if len(text) <= limit else text[:limit] + "…"


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def dotted_key(loc: Sequence[int | str]) -> str:
    """``("listen", 0, "address")`` -> ``listen[0].address``; odd key parts are quoted."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{render_key(part)}" if text else render_key(part)
    return text


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, located as precisely as we can.

    ``key`` is a dotted path (``listen[0].address``), or empty when the problem concerns a
    whole file (not found, unreadable, TOML syntax, a limit). ``file`` is empty only for the
    summary line of problems left out. ``has_value`` distinguishes "the value was None" from
    "there is no value worth showing".
    """

    file: str
    key: str
    message: str
    value: object | None = None
    has_value: bool = False

    def __str__(self) -> str:
        parts = [_printable(self.file)] if self.file else []
        if self.key:
            parts.append(_printable(clip(self.key)))
        text = ": ".join([*parts, _printable(self.message)])
        if self.has_value:
            text += f" (got {_printable(clip(render_value(self.value)))})"
        return text


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` says why, in at most MAX_PROBLEMS + 1 lines.

    ``total`` is how many problems were found. When it exceeds :data:`MAX_PROBLEMS`,
    ``problems`` holds the first ones plus a last, file-less problem saying how many were
    left out, so code that prints or joins ``problems`` needs no limit of its own.
    """

    def __init__(self, problems: Sequence[Problem], *, total: int | None = None) -> None:
        self.total = len(problems) if total is None else max(total, len(problems))
        kept = list(problems[:MAX_PROBLEMS])
        omitted = self.total - len(kept)
        if omitted:
            noun = "problem" if omitted == 1 else "problems"
            kept.append(Problem("", "", f"... and {omitted} more {noun}"))
        self.problems: list[Problem] = kept
        super().__init__("\n".join(str(problem) for problem in self.problems))


# --------------------------------------------------------------------------------------------
# pydantic errors as problems


def _prefixes(loc: Sequence[int | str]) -> list[str]:
    """``listen[0].address`` -> the key, then each parent key, nearest first."""
    return [dotted_key(loc[:end]) for end in range(len(loc), 0, -1)]


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
    below = dotted_key(loc)
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


def _model_at(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` (list indices are stepped over)."""
    model = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        found = None if field is None else section_model(field)
        if found is None:
            return None
        model = found
    return model


def _unknown_key(root: type[BaseModel], loc: Sequence[int | str]) -> str:
    message = "unknown setting"
    model = _model_at(root, loc[:-1])
    if model is not None:
        valid = list(model.model_fields)
        name = str(loc[-1])
        close = []
        if len(name) <= _MAX_SUGGESTED_KEY:
            import difflib  # only for an unknown key: `appliance serve` starts without it

            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        if close:
            message += f'; did you mean "{dotted_key([*loc[:-1], close[0]])}"?'
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


def _problem(
    error: Mapping[str, Any],
    root: type[BaseModel],
    raw: Mapping[str, Any],
    recorded: Mapping[str, str],
    files: Sequence[Path],
) -> Problem:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    message = _message(error)
    value, has_value = error.get("input"), True
    if "at" in ctx:
        loc = (*loc, *ctx["at"])
        has_value, value = _lookup(raw, loc)
    elif "relation" in ctx:
        # Blame the first key of the pair some file set; word the message against the other.
        sides = ctx["relation"]
        name, message, value = next(
            (side for side in sides if dotted_key((*loc, side[0])) in recorded), sides[0]
        )
        loc = (*loc, name)
    if error["type"] == "extra_forbidden":
        message, has_value = _unknown_key(root, loc), False
    elif error["type"] == "missing":
        has_value = False
    file = _origin(loc, recorded, files) or DEFAULT
    return Problem(file, dotted_key(loc), message, value, has_value)


def validation_problems(
    exc: ValidationError,
    root: type[BaseModel],
    raw: Mapping[str, Any],
    recorded: Mapping[str, str],
    files: Sequence[Path],
) -> ConfigError:
    """The error to raise for ``exc``, raised by ``root.model_validate(raw)``.

    ``recorded`` maps dotted keys to the file that set them. Only the problems that will be
    shown are worked out (blame, "did you mean"): the rest are counted.
    """
    problems = [
        _problem(error, root, raw, recorded, files)
        for error in exc.errors(include_url=False)[:MAX_PROBLEMS]
    ]
    return ConfigError(problems, total=exc.error_count())
