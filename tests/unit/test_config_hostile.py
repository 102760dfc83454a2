"""Hostile bytes in config files: one bounded problem each, never an exception or a hang.

Each case here once escaped ``load_config`` (UnicodeDecodeError, RecursionError), blocked it
(a FIFO), or kept it busy for minutes and wrote a 308 MB log line (a million unknown keys).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import cli
from appliance.config.load import ConfigError, config_files, load_config, read_toml
from appliance.config.problems import MAX_PROBLEMS, MAX_SHOWN_CHARS, Problem
from appliance.config.read import (
    MAX_DEPTH,
    MAX_DROP_INS,
    MAX_FILE_BYTES,
    MAX_TOTAL_BYTES,
    MAX_VALUES,
)

NESTING = f"nested deeper than the {MAX_DEPTH}-level limit"


@pytest.fixture
def main(tmp_path: Path) -> Path:
    return tmp_path / "appliance.toml"


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, explicit=True)
    return [str(problem) for problem in info.value.problems]


def _one(path: Path) -> str:
    (problem,) = _problems(path)
    return problem


def _drop_in(main: Path, name: str) -> Path:
    confd = main.parent / "conf.d"
    confd.mkdir(exist_ok=True)
    return confd / name


# --------------------------------------------------------------------------------------------
# Bytes that are not TOML text


def test_a_latin1_byte_names_line_and_column(main: Path) -> None:
    main.write_bytes(b'[workers]\ncount = 4\n# caf\xe9 "au lait"\n')
    assert _one(main) == (
        f"{main}: line 3, column 6: not valid UTF-8 (byte 0xe9); TOML files are UTF-8"
    )


def test_columns_count_characters_not_bytes(main: Path) -> None:
    main.write_bytes("# é\n# ü ß \xff".encode().replace(b"\xc3\xbf", b"\xff"))
    assert _one(main).startswith(f"{main}: line 2, column 7: not valid UTF-8 (byte 0xff)")


def test_a_nul_byte(main: Path) -> None:
    main.write_bytes(b"[log]\nlevel = 'info'\x00\n")
    assert _one(main) == f"{main}: line 2, column 15: contains a NUL byte (not a text file?)"


def test_a_binary_file_in_conf_d(main: Path) -> None:
    main.write_text("")
    blob = _drop_in(main, "50-site.toml")
    blob.write_bytes(bytes(range(256)) * 4)
    assert _one(main) == f"{blob}: line 1, column 1: contains a NUL byte (not a text file?)"


def test_an_integer_too_long_to_convert(main: Path) -> None:
    main.write_text("[workers]\nmax_requests = " + "9" * 5000 + "\n")
    problem = _one(main)
    assert problem.startswith(f"{main}: cannot parse: Exceeds the limit (4300 digits)")
    assert "sys.set_int_max_str_digits" not in problem  # Python's advice is not the operator's


# --------------------------------------------------------------------------------------------
# Nesting


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("a = " + "[" * 3000 + "]" * 3000, 5 + MAX_DEPTH),
        ("a = " + "{b = " * 3000 + "1" + "}" * 3000, 5 + MAX_DEPTH * 5),
        ("a" + ".a" * 3000 + " = 1", 2 + MAX_DEPTH * 2),
        ("[a" + ".a" * 3000 + "]", 3 + MAX_DEPTH * 2),
    ],
    ids=["array", "inline-table", "dotted-key", "table-header"],
)
def test_deep_nesting_is_refused_before_parsing(main: Path, text: str, column: int) -> None:
    main.write_text(text)
    assert _one(main) == f"{main}: line 1, column {column}: {NESTING}"


def test_nesting_combined_from_header_and_key_is_measured_after_parsing(main: Path) -> None:
    # 20 levels of table header plus 20 of dotted key: each within the scan's bounds.
    main.write_text("[" + ".".join(["t"] * 20) + "]\n" + ".".join(["k"] * 20) + " = 1\n")
    problem = _one(main)
    key = ".".join(["t"] * 20 + ["k"] * (MAX_DEPTH + 1 - 20))
    assert problem == f"{main}: {key}: {NESTING}"


def test_the_depth_limit_itself_is_allowed(main: Path) -> None:
    # MAX_DEPTH levels reach the schema (which explains the real mistake); one more does not.
    main.write_text(".".join(["k"] * MAX_DEPTH) + " = 1\n")
    assert _one(main) == f"{main}: k: unknown setting; valid tables: " + (
        "app, workers, reload, listen, http, websocket, wsgi, watchdog, control, agent, log"
    )
    main.write_text(".".join(["k"] * (MAX_DEPTH + 1)) + " = 1\n")
    assert _one(main).endswith(NESTING)


def test_brackets_and_dots_in_strings_and_comments_are_not_nesting(main: Path) -> None:
    deep = "[" * 100 + "." * 100 + "{" * 100 + "=" * 100 + "," * 100
    main.write_text(
        f"# {deep}\n"
        f'[app]\ntarget = "a.b:c"  # {deep}\n'
        f'directory = "/srv/{deep}\\""\n'
        f"[http]\nforwarded_allow_ips = '{deep}'\n"
        f'[log]\nlevel = """info"""\n'
        f'format = """\\\n{deep} "" \\" ""\n"""\n'
        f"[reload]\n\"{deep}\" = '''{deep}\n'' '''\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(main, explicit=True)
    # Only the schema's own verdicts: the quoted key is unknown, the multi-line format invalid.
    assert [problem.key[:9] for problem in info.value.problems] == ['reload."[', "log.forma"]


def test_a_floats_dot_before_a_dotted_key_is_no_false_alarm(main: Path) -> None:
    # The scan counts dots since the last "=": the float's and then the key's own.
    main.write_text("a = 2.5\n" + ".".join(["k"] * MAX_DEPTH) + " = 1\n")
    assert [problem.split(": ")[1:3] for problem in _problems(main)] == [
        ["a", "unknown setting; valid tables"],
        ["k", "unknown setting; valid tables"],
    ]


def test_an_unclosed_multi_line_string_is_a_syntax_error(main: Path) -> None:
    main.write_text('a = """' + '\\"""\n' * 2000)
    assert _one(main) == f"{main}: end of file: Unterminated string"


# --------------------------------------------------------------------------------------------
# Sizes and counts


def test_a_file_over_the_size_limit_is_not_read(main: Path) -> None:
    with main.open("wb") as handle:
        handle.truncate(5 * 1024 * 1024)  # sparse: 5 MiB of NULs nobody has to read
    assert _one(main) == (
        f"{main}: file is 5242880 bytes, more than the {MAX_FILE_BYTES}-byte limit"
    )


def test_a_file_at_the_size_limit_is_read(main: Path) -> None:
    main.write_text("#" * (MAX_FILE_BYTES - 1) + "\n")
    assert load_config(main, explicit=True).files == (main,)


def test_all_files_together_are_limited(main: Path) -> None:
    chunk = "#" * (MAX_FILE_BYTES - 1) + "\n"
    main.write_text(chunk)
    count = MAX_TOTAL_BYTES // MAX_FILE_BYTES
    paths = [_drop_in(main, f"{index:02}.toml") for index in range(count)]
    for path in paths:
        path.write_text(chunk)
    # The main file and count - 1 drop-ins fill the budget; the last drop-in is refused.
    assert _problems(main) == [
        (
            f"{paths[-1]}: file is {MAX_FILE_BYTES} bytes, which takes all files together past "
            f"the {MAX_TOTAL_BYTES}-byte limit ({MAX_TOTAL_BYTES} bytes read before it)"
        )
    ]


def test_too_many_array_items_are_refused_before_parsing(main: Path) -> None:
    main.write_text("a = [" + "1," * 20_000 + "]\n")
    assert _one(main) == (
        f"{main}: line 1, column {5 + 2 * MAX_VALUES}: more than {MAX_VALUES} keys and array items"
    )


def test_the_value_limit_itself_is_allowed(main: Path) -> None:
    # "a" plus MAX_VALUES - 1 items is exactly the limit: the schema judges it.
    main.write_text("a = [" + ", ".join(["1"] * (MAX_VALUES - 1)) + "]\n")
    assert _one(main).startswith(f"{main}: a: unknown setting")
    main.write_text("a = [" + ", ".join(["1"] * MAX_VALUES) + "]\n")
    assert _one(main) == f"{main}: more than {MAX_VALUES} keys and array items"


def test_twenty_thousand_unknown_keys_in_three_files(main: Path) -> None:
    names = [f"k{index}" for index in range(20_000)]
    chunks = [names[start : start + 6000] for start in range(0, len(names), 6000)]
    main.write_text("".join(f"{name}=1\n" for name in chunks[0]))
    later = [_drop_in(main, f"{index}0-junk.toml") for index in (1, 2, 3)]
    for path, chunk in zip(later, chunks[1:], strict=True):
        path.write_text("".join(f"{name}=1\n" for name in chunk))
    problems = _problems(main)
    # 6000 keys fit; the next two files of 6000 do not fit in the 4000 left, refused where the
    # count crosses it, before they are parsed; the last file's 2000 keys still fit.
    assert problems[0].startswith(f"{later[0]}: line 4001, column 7: ")
    assert problems[1].startswith(f"{later[1]}: line 4001, column 7: ")
    assert problems[0].endswith(
        f"more than {MAX_VALUES} keys and array items in all files together"
    )
    assert problems[1].endswith(
        f"more than {MAX_VALUES} keys and array items in all files together"
    )
    assert len(problems) == 2


def test_thousands_of_unknown_keys_give_a_bounded_list(main: Path) -> None:
    main.write_text("".join(f"k{index} = {index}\n" for index in range(5000)))
    with pytest.raises(ConfigError) as info:
        load_config(main, explicit=True)
    problems = info.value.problems
    assert info.value.total == 5000
    assert len(problems) == MAX_PROBLEMS + 1
    assert str(problems[0]).startswith(f"{main}: k0: unknown setting; valid tables: app,")
    assert str(problems[-1]) == f"... and {5000 - MAX_PROBLEMS} more problems"
    assert len(str(info.value)) < 21 * 200


def test_unknown_keys_in_a_table_blame_its_file(main: Path) -> None:
    main.write_text("[t0]\n[t1]\n")
    assert _problems(main) == [
        (
            f"{main}: t0: unknown setting; valid tables: app, workers, reload, listen, http, "
            "websocket, wsgi, watchdog, control, agent, log"
        ),
        (
            f"{main}: t1: unknown setting; valid tables: app, workers, reload, listen, http, "
            "websocket, wsgi, watchdog, control, agent, log"
        ),
    ]


def test_too_many_drop_ins(main: Path) -> None:
    main.write_text("[workers]\ncount = 2\n")
    for index in range(MAX_DROP_INS + 1):
        _drop_in(main, f"{index:03}.toml").write_text("")
    assert _one(main) == (
        f"{main.parent / 'conf.d'}: more than the limit of {MAX_DROP_INS} drop-in files (*.toml)"
    )
    assert config_files(main) == ()


def test_the_drop_in_limit_itself_is_allowed(main: Path) -> None:
    for index in range(MAX_DROP_INS):
        _drop_in(main, f"{index:03}.toml").write_text("")
    assert len(load_config(main).files) == MAX_DROP_INS


# --------------------------------------------------------------------------------------------
# What is shown


def test_a_long_value_is_shown_cut(main: Path) -> None:
    main.write_text(f'[workers]\ncount = "{"x" * 60_000}"\n')
    problem = _one(main)
    assert problem.startswith(
        f'{main}: workers.count: Input should be "auto" or an integer (got "x'
    )
    assert problem.endswith("x…)")
    assert len(problem) < len(str(main)) + MAX_SHOWN_CHARS + 100


def test_a_long_unknown_key_is_shown_cut_without_suggestions(main: Path) -> None:
    main.write_text(f"[workers]\n{'count' * 10_000} = 1\n")
    problem = _one(main)
    assert problem.startswith(f"{main}: workers.countcount")
    assert "…: unknown setting; valid keys here: count, reserve_cores" in problem
    assert len(problem) < 1000


def test_a_long_key_in_a_parser_message_is_cut(main: Path) -> None:
    key = "k" * 30_000
    main.write_text(f"[{key}]\n[{key}]\n")
    problem = _one(main)
    assert problem.startswith(f"{main}: line 2, column ")
    assert ": Cannot declare ('kkk" in problem
    assert len(problem) < len(str(main)) + MAX_SHOWN_CHARS + 40


def test_control_characters_in_keys_and_values_stay_on_one_line(main: Path) -> None:
    main.write_text('[log]\n"a\\n\\u001b[31mb\\u2028" = 1\nlevel = "x\\ny\\u009b"\n')
    problems = _problems(main)
    assert problems == [
        (
            f'{main}: log.level: Input should be "debug", "info", "warning" or "error" '
            '(got "x\\ny\\u009b")'
        ),
        f'{main}: log."a\\n\\u001b[31mb\\u2028": unknown setting; valid keys here: level, format, stream',
    ]


# --------------------------------------------------------------------------------------------
# Things that are not regular files


@pytest.mark.timeout(10)
def test_a_fifo_in_conf_d_does_not_block(main: Path) -> None:
    main.write_text("")
    fifo = _drop_in(main, "50-site.toml")
    os.mkfifo(fifo)
    assert _one(main) == f"{fifo}: not a regular file (a FIFO)"
    assert config_files(main) == ()  # the lenient listing leaves it out, unopened


@pytest.mark.timeout(10)
def test_a_fifo_as_the_main_file_does_not_block(main: Path) -> None:
    os.mkfifo(main)
    assert _one(main) == f"{main}: not a regular file (a FIFO)"
    with pytest.raises(ConfigError):
        read_toml(main)


def test_a_character_device() -> None:
    assert _one(Path("/dev/null")) == "/dev/null: not a regular file (a character device)"


def test_a_conf_d_that_cannot_be_listed(main: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root lists any directory")
    main.write_text("")
    confd = main.parent / "conf.d"
    confd.mkdir()
    confd.chmod(0)
    try:
        assert _one(main) == f"{confd}: cannot list directory: Permission denied"
    finally:
        confd.chmod(0o755)


def test_read_toml_is_the_same_boundary(main: Path) -> None:
    main.write_bytes(b"a = '\xe9'\n")
    with pytest.raises(ConfigError) as info:
        read_toml(main)
    assert [str(p) for p in info.value.problems] == [
        f"{main}: line 1, column 6: not valid UTF-8 (byte 0xe9); TOML files are UTF-8"
    ]
    main.write_text("[control]\npath = '/run/x.sock'\n")
    assert read_toml(main) == {"control": {"path": "/run/x.sock"}}


# --------------------------------------------------------------------------------------------
# `appliance check` prints one line per problem, never a traceback


def _write_fifo(path: Path) -> None:
    os.mkfifo(path)


_HOSTILE: dict[str, Callable[[Path], object]] = {
    "latin1": lambda p: p.write_bytes(b"[app]\ntarget = 'caf\xe9:app'\n"),
    "nul": lambda p: p.write_bytes(b"\x00\x01\x02"),
    "deep-array": lambda p: p.write_text("a = " + "[" * 3000 + "]" * 3000),
    "deep-inline-table": lambda p: p.write_text("a = " + "{b = " * 3000 + "1" + "}" * 3000),
    "5-MiB": lambda p: p.write_bytes(b"#" * (5 * 1024 * 1024)),
    "directory": lambda p: p.mkdir(),
    "fifo": _write_fifo,
    "unknown-keys": lambda p: p.write_text("".join(f"k{i} = 1\n" for i in range(5000))),
    "items": lambda p: p.write_text("a = [" + "1," * 20_000 + "]"),
    "huge-integer": lambda p: p.write_text("a = " + "1" * 5000),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(_HOSTILE))
@pytest.mark.parametrize("where", ["main", "drop-in"])
def test_check_prints_one_line_per_problem(
    main: Path, name: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "main":
        target = main
    else:
        main.write_text("[workers]\ncount = 2\n")
        target = _drop_in(main, "50-site.toml")
    _HOSTILE[name](target)
    with pytest.raises(ConfigError) as info:
        load_config(main, explicit=True)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "--config", str(main)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert lines == [str(problem) for problem in info.value.problems]
    assert 1 <= len(lines) <= MAX_PROBLEMS + 1
    assert all(line.startswith((str(target), "... and ")) for line in lines), lines
    assert all(len(line) < 1000 for line in lines)


def test_check_of_a_good_config_still_says_ok(
    main: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main.write_text("[workers]\ncount = 2\n")
    assert cli.main(["check", "--config", str(main)]) == 0
    assert capsys.readouterr().out.startswith(f"configuration ok ({main}; digest ")


def test_problem_rendering_caps_and_escapes() -> None:
    problems = [Problem("f.toml", f"k{index}", "bad") for index in range(MAX_PROBLEMS + 1)]
    error = ConfigError(problems)
    assert error.total == MAX_PROBLEMS + 1
    assert [str(p) for p in error.problems[-2:]] == [
        f"f.toml: k{MAX_PROBLEMS - 1}: bad",
        "... and 1 more problem",
    ]
    assert str(Problem("f\n.toml", "", "x")) == "f\\n.toml: x"
    assert str(ConfigError(problems[:2], total=7)).splitlines()[-1] == "... and 5 more problems"
