"""Turn the bytes of one config file into a TOML table, or into exactly one :class:`Problem`.

This is the boundary between whatever is on disk and the rest of the loader. The master runs
it on SIGHUP and ``appliance check`` runs it as the unit's ``ExecStartPre``, so no content may
escape it as an exception (a traceback there keeps the service down), block it (a FIFO named
``50-site.toml``) or keep it busy: every failure is a :class:`ConfigError` naming the file and,
where there is one, the line and column. The limits below bound the work for any input;
``tomllib`` is pure Python and parses hostile text at well under 1 MB/s, so the byte limits
are what bound the time.

Order of the checks, cheapest first: ``stat`` (kind and size, nothing is opened that is not a
regular file), a bounded read, NUL bytes, UTF-8, a lexical scan for nesting, ``tomllib``, and
a walk of the result that counts keys and measures depth exactly.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config.problems import ConfigError, Problem, clip, dotted_key

__all__ = [
    "MAX_DEPTH",
    "MAX_DROP_INS",
    "MAX_FILE_BYTES",
    "MAX_TOTAL_BYTES",
    "MAX_VALUES",
    "Layer",
    "drop_ins",
    "parse_layer",
    "read_bytes",
    "read_toml",
]

MAX_FILE_BYTES = 64 * 1024
"""Bytes in one config file.

Ten times the generated ``conf.d/00-example.toml``, which lists every setting with its full
description; a real config is a few hundred bytes. ``tomllib`` needs up to a few µs per byte
of hostile text (thousands of table headers, string escapes), so this keeps the load of any
one file under about 0.2 s; a bigger file is refused after a ``stat``, without reading it.
"""

MAX_TOTAL_BYTES = 256 * 1024
"""Bytes in all files together (main file and drop-ins), which bounds the whole load."""

MAX_DROP_INS = 256
"""``conf.d/*.toml`` files; a package and a site use a handful. More means a runaway tool."""

MAX_DEPTH = 32
"""Levels of keys, tables and arrays above any value (``listen[0].name`` is 3).

Ten times the deepest setting, so any plausible mistake still reaches the schema and gets its
precise message, yet far from Python's recursion limit in ``tomllib``, the merge and pydantic.
"""

MAX_VALUES = 10_000
"""Keys and array items in all files together, counted at every depth.

A few dozen settings exist; each unknown key costs pydantic an error and the loader a
provenance entry, so a file of generated junk is refused before validation (a million unknown
keys once blocked the master for two minutes).
"""

_NOT_REGULAR = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}

_NESTING = f"nested deeper than the {MAX_DEPTH}-level limit"
_TOO_MANY = f"more than {MAX_VALUES} keys and array items"


@dataclass(frozen=True, slots=True)
class Layer:
    """One file's table, and how many keys and array items it holds (for the total limit)."""

    path: Path
    table: dict[str, Any]
    values: int


def _problem(path: Path, message: str) -> ConfigError:
    return ConfigError([Problem(str(path), "", message)])


# --------------------------------------------------------------------------------------------
# Files and bytes


def drop_ins(main: Path) -> tuple[tuple[Path, ...], list[Problem]]:
    """The drop-ins that follow ``main``: ``conf.d/*.toml`` beside it, in lexical order.

    Hidden names (editor lock files such as ``.#50-site.toml``) are skipped; anything else
    ending in ``.toml`` is returned whatever it is, so that a directory or FIFO by that name is
    reported by :func:`read_bytes` rather than silently ignored. Sorting by the name as a
    string gives systemd's drop-in order: ``50-site.toml`` overrides ``10-package.toml``.
    The listing stops after :data:`MAX_DROP_INS` + 1 names; more is a problem, and then no
    drop-in is returned.
    """
    confd = main.parent / "conf.d"
    names: list[str] = []
    try:
        with os.scandir(confd) as entries:
            for entry in entries:
                if entry.name.endswith(".toml") and not entry.name.startswith("."):
                    names.append(entry.name)
                    if len(names) > MAX_DROP_INS:
                        message = f"more than the limit of {MAX_DROP_INS} drop-in files (*.toml)"
                        return (), [Problem(str(confd), "", message)]
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the path
        return (), []
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return (), [Problem(str(confd), "", f"cannot list directory: {reason}")]
    return tuple(confd / name for name in sorted(names)), []


def read_bytes(path: Path, *, budget: int = MAX_TOTAL_BYTES) -> bytes:
    """The content of ``path`` if it is a regular file within the byte limits.

    ``budget`` is what is left of :data:`MAX_TOTAL_BYTES`. Nothing but a regular file is
    opened, and it is opened non-blocking, so a FIFO swapped in after the ``stat`` cannot hang
    the read. At most one byte more than the limit is read, so a file growing meanwhile is
    caught too.
    """
    limit = min(MAX_FILE_BYTES, budget)
    try:
        kind = _kind(os.stat(path).st_mode)
        if kind:
            raise _problem(path, f"not a regular file ({kind})")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            kind = _kind(info.st_mode)
            if kind:
                raise _problem(path, f"not a regular file ({kind})")
            if info.st_size > limit:
                raise _too_big(path, info.st_size, budget)
            data = _read_at_most(fd, limit + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        dangling = " (a dangling symbolic link)" if os.path.islink(path) else ""
        raise _problem(path, f"file not found{dangling}") from None
    except OSError as exc:
        raise _problem(path, f"cannot read file: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL in the path itself
        raise _problem(path, f"cannot read file: {exc}") from None
    if len(data) > limit:  # it grew since fstat, or it is a /proc file that reports size 0
        raise _too_big(path, len(data), budget, at_least=True)
    return data


def _kind(mode: int) -> str:
    """Empty for a regular file, else what it is instead."""
    return "" if stat.S_ISREG(mode) else _NOT_REGULAR.get(stat.S_IFMT(mode), "not a file")


def _read_at_most(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    while size > 0:
        chunk = os.read(fd, size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _too_big(path: Path, size: int, budget: int, *, at_least: bool = False) -> ConfigError:
    size_text = f"at least {size}" if at_least else str(size)
    if size > MAX_FILE_BYTES:
        return _problem(
            path, f"file is {size_text} bytes, more than the {MAX_FILE_BYTES}-byte limit"
        )
    return _problem(
        path,
        f"file is {size_text} bytes, which takes all files together past the "
        f"{MAX_TOTAL_BYTES}-byte limit ({MAX_TOTAL_BYTES - budget} bytes read before it)",
    )


# --------------------------------------------------------------------------------------------
# Text and TOML


def _line_column(data: bytes, offset: int) -> str:
    """``line L, column C`` of a byte offset; columns count characters, as tomllib's do."""
    start = data.rfind(b"\n", 0, offset) + 1
    line = data.count(b"\n", 0, offset) + 1
    column = len(data[start:offset].decode("utf-8", "replace")) + 1
    return f"line {line}, column {column}"


def _text(path: Path, data: bytes) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        where = _line_column(data, nul)
        raise _problem(path, f"{where}: contains a NUL byte (not a text file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = _line_column(data, exc.start)
        byte = data[exc.start]
        raise _problem(
            path, f"{where}: not valid UTF-8 (byte 0x{byte:02x}); TOML files are UTF-8"
        ) from None


# The lexical scan. Strings and comments are skipped whole, because they can hold any of the
# characters that matter; an unclosed string runs to the end of its line (multi-line: of the
# file), as tomllib then rejects it anyway. Possessive quantifiers keep the scan linear.
_LEXEME = re.compile(
    r"(?P<skip>"
    r'"""(?:[^"\\]|\\[\s\S]|"{1,2}(?!"))*+(?:"{3,5}|\Z)'  # multi-line basic string
    r"|'''(?:[^']|'{1,2}(?!'))*+(?:'{3,5}|\Z)"  # multi-line literal string
    r'|"(?:[^"\\\n]|\\.)*+"?'  # basic string
    r"|'[^'\n]*+'?"  # literal string
    r"|#[^\n]*+"  # comment
    r")"
    r"|(?P<header>^[ \t]*+\[)"  # a "[" opening a line: a table header, outside any array
    r"|(?P<open>[\[{])"
    r"|(?P<close>[\]}])"
    r"|(?P<item>[=,])"
    r"|(?P<dot>\.)",
    re.MULTILINE,
)


def _scan(text: str, budget: int) -> tuple[int, str] | None:
    """Where, and why, the text is refused before ``tomllib`` parses it, by a lexical scan.

    ``tomllib`` recurses once per open array or inline table, takes time growing with the
    square of the parts of one dotted key, and several µs per key or array item, so all three
    are bounded here, from counts that are lower bounds of the real ones for any valid TOML
    (a valid document within the limits therefore never trips the scan):

    * open brackets outside strings and comments, for the depth;
    * dots since the last ``=``, ``,`` or bracket, for the depth too (at most one of them
      belongs to a float value before a dotted key);
    * ``=`` (one per key), commas directly inside an array (one fewer than its items at
      most) and table headers (one new table each), for the number of values.

    The exact depth and count are measured on the parsed result (:func:`_measure`).
    """
    open_brackets: list[str] = []
    values = dots = 0
    for match in _LEXEME.finditer(text):
        kind = match.lastgroup
        if kind == "skip":
            continue
        if kind == "header" and not open_brackets:
            values += 1
        if kind in ("header", "open"):
            open_brackets.append(match.group()[-1])
            dots = 0
            if len(open_brackets) > MAX_DEPTH:
                return match.end() - 1, _NESTING
        elif kind == "close":
            if open_brackets:
                open_brackets.pop()
            dots = 0
        elif kind == "item":
            dots = 0
            if match.group() == "=" or open_brackets[-1:] == ["["]:
                values += 1
        elif kind == "dot":
            dots += 1
            if dots > MAX_DEPTH:
                return match.start(), _NESTING
        if values > budget:
            return match.start(), _too_many(budget)
    return None


def _too_many(budget: int) -> str:
    return _TOO_MANY if budget == MAX_VALUES else f"{_TOO_MANY} in all files together"


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _toml_message(exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    position = _TOML_POSITION.search(message)
    if position:
        line, column = position.groups()
        return f"line {line}, column {column}: {clip(message[: position.start()])}"
    return "end of file: " + clip(message.replace(" (at end of document)", ""))


def _measure(path: Path, table: dict[str, Any], budget: int) -> int:
    """Count the keys and array items of ``table``; refuse too deep or more than ``budget``.

    Iterative, because the scan bounds brackets and dotted keys separately and a document may
    combine both (a dotted table header, then a dotted key, then arrays).
    """
    count = 0
    pending: list[tuple[tuple[int | str, ...], Any]] = [((), table)]
    while pending:
        where, value = pending.pop()
        items: Sequence[tuple[int | str, Any]]
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        count += len(items)
        if count > budget:
            raise _problem(path, _too_many(budget))
        if items and len(where) == MAX_DEPTH:
            raise ConfigError([Problem(str(path), dotted_key((*where, items[0][0])), _NESTING)])
        pending.extend(
            ((*where, name), item) for name, item in items if isinstance(item, (dict, list))
        )
    return count


def parse_layer(path: Path, data: bytes, *, budget: int = MAX_VALUES) -> Layer:
    """Parse the bytes :func:`read_bytes` returned; ``budget`` is what is left of MAX_VALUES."""
    text = _text(path, data)
    refused = _scan(text, budget)
    if refused is not None:
        offset, message = refused
        raise _problem(path, f"{_line_column(data, len(text[:offset].encode()))}: {message}")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _problem(path, _toml_message(exc)) from None
    except ValueError as exc:  # int() refusing a number of thousands of digits
        raise _problem(path, f"cannot parse: {clip(str(exc).split(';')[0])}") from None
    except RecursionError:  # not reached past the nesting scan; kept as the last line of defence
        raise _problem(path, _NESTING) from None
    return Layer(path, table, _measure(path, table, budget))


def read_toml(path: Path) -> dict[str, Any]:
    """One file's table on its own (no drop-ins, no validation), or :class:`ConfigError`.

    For lenient readers that want one key from a config that may not validate.
    """
    return parse_layer(path, read_bytes(path)).table
