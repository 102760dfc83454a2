"""Finding the master's socket from the CLI: options, environment, and configs that are broken."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.control.locate import (
    MAX_CONFIG_BYTES,
    ControlTarget,
    locate_control,
    read_control_path,
    scan_control_path,
)

# --- the tolerant scanner --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[control]\npath = "/run/a.sock"\n', "/run/a.sock"),
        ("[control]\npath='/run/literal.sock'  # a comment\n", "/run/literal.sock"),
        ('[ "control" ]  # quoted\n"path" = "/run/q.sock"\n', "/run/q.sock"),
        ('[control]\npath = "/run/esc\\u0061pe.sock"\n', "/run/escape.sock"),
        ('control.path = "/run/dotted.sock"\n[app]\n', "/run/dotted.sock"),
        ('control = { path = "/run/inline.sock" }\n', "/run/inline.sock"),
        ('[control]\npath = "/a.sock"\npath = "/b.sock"\n', "/b.sock"),  # the last one
        # a syntax error elsewhere does not matter
        ('[workers]\ncount = = 3\n[control]\npath = "/run/ok.sock"\n[log\n', "/run/ok.sock"),
        # ... but on the line itself it does
        ('[control]\npath = "/run/unterminated.sock\n', None),
        ("[control]\npath = 42\n", None),
        # other tables, including arrays of tables and sub-tables, are not [control]
        ('[app]\npath = "/srv/app"\n', None),
        ('[control.extra]\npath = "/x.sock"\n', None),
        ('[[listen]]\npath = "/x.sock"\n', None),
        ('[control]\n[[listen]]\npath = "/x.sock"\n', None),
        ('[control] trailing junk\npath = "/x.sock"\n', None),
        ('path = "/root/level.sock"\n', None),
        ("", None),
    ],
)
def test_scan_control_path(text: str, expected: str | None) -> None:
    assert scan_control_path(text) == expected


def test_scan_is_linear_on_pathological_lines() -> None:
    text = "[" + " " * 500_000 + "\n" + "path" + " " * 500_000 + "\n[control]\npath = '/ok.sock'\n"
    assert scan_control_path(text) == "/ok.sock"


# --- reading the files -----------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_later_files_win_and_broken_files_are_scanned(tmp_path: Path) -> None:
    main = _write(tmp_path / "appliance.toml", '[control]\npath = "/run/main.sock"\n')
    ok = _write(tmp_path / "conf.d/10-ok.toml", '[control]\npath = "/run/ten.sock"\n')
    broken = _write(
        tmp_path / "conf.d/20-broken.toml", '[control]\npath = "/run/broken.sock"\n[oops\n'
    )
    other = _write(tmp_path / "conf.d/30-other.toml", "[workers]\ncount = 2\n")
    assert read_control_path([main, ok]) == ("/run/ten.sock", str(ok), ())
    assert read_control_path([main, ok, broken, other]) == ("/run/broken.sock", str(broken), ())


def test_unreadable_files_are_skipped_and_named(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.toml", '[control]\npath = "/run/good.sock"\n')
    huge = _write(tmp_path / "huge.toml", b"#" * (MAX_CONFIG_BYTES + 1))
    binary = _write(tmp_path / "binary.toml", b'[control]\npath = "/x.sock"\n\0\0')
    latin1 = _write(tmp_path / "latin1.toml", '[control]\npath = "/x\xe9.sock"\n'.encode("latin-1"))
    relative = _write(tmp_path / "relative.toml", '[control]\npath = "x.sock"\n')
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opening it for reading would block forever without O_NONBLOCK
    bomb = _write(tmp_path / "bomb.toml", "v = " + "[" * 60_000 + "\n")
    dotted = _write(tmp_path / "dotted.toml", "a" + ".a" * 30_000 + " = 1\n")  # slow in tomllib
    path, source, unread = read_control_path(
        [good, huge, binary, latin1, relative, fifo, tmp_path / "missing.toml", bomb, dotted,
         tmp_path]
    )
    assert (path, source) == ("/run/good.sock", str(good))
    assert unread == (
        f"{huge}: larger than 64 KiB",
        f"{binary}: binary",
        f"{latin1}: not UTF-8",
        f"{relative}: its [control] path is not a valid socket path",
        f"{fifo}: not a regular file",
        f"{tmp_path / 'missing.toml'}: missing",
        f"{tmp_path}: not a regular file",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_a_file_without_permission_is_named(tmp_path: Path) -> None:
    secret = _write(tmp_path / "secret.toml", '[control]\npath = "/x.sock"\n')
    secret.chmod(0)
    assert read_control_path([secret]) == (None, None, (f"{secret}: Permission denied",))


# --- the order: --control, $APPLIANCE_CONTROL, the config, the default ----------------------


def test_option_then_environment_then_config_then_default(tmp_path: Path) -> None:
    main = _write(tmp_path / "appliance.toml", '[control]\npath = "/run/cfg.sock"\n[broken\n')
    env = {"APPLIANCE_CONTROL": "/run/env.sock", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert locate_control("/run/opt.sock", main, env, 1000) == ControlTarget(
        "/run/opt.sock", "--control"
    )
    assert locate_control(None, main, env, 1000) == ControlTarget(
        "/run/env.sock", "$APPLIANCE_CONTROL"
    )
    del env["APPLIANCE_CONTROL"]
    assert locate_control(None, main, env, 1000) == ControlTarget("/run/cfg.sock", str(main))
    main.unlink()
    assert locate_control(None, main, env, 1000) == ControlTarget(
        "/run/user/1000/appliance/control.sock", "default", (f"{main}: missing",)
    )
    assert locate_control(None, main, {}, 0).path == "/run/appliance/control.sock"
    assert locate_control("/x.sock", main, {}, 0).explicit
    assert not locate_control(None, main, {}, 0).explicit


def test_dropins_are_read_when_the_main_file_is_gone(tmp_path: Path) -> None:
    _write(tmp_path / "conf.d/50-site.toml", '[control]\npath = "/run/site.sock"\n')
    target = locate_control(None, tmp_path / "appliance.toml", {}, 1000)
    assert target.path == "/run/site.sock"
    assert target.source == str(tmp_path / "conf.d/50-site.toml")
