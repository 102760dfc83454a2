"""``appliance status|reload|scale`` against fake masters: one line on stderr, never a traceback.

Each fake master is a real unix socket served by a thread of the test, replying whatever the
case needs (nothing, garbage, a 5 MiB line, a proper conversation).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import cli
from appliance.control import (
    encode_line,
    error_reply,
    reload_ok_reply,
    reload_progress,
    scale_reply,
    status_reply,
)
from appliance.control.locate import ENV_VAR

Script = Callable[[bytes], list[bytes]]
"""What the fake master answers to one request line: the raw reply lines."""


@contextlib.contextmanager
def fake_master(
    path: Path, script: Script | None, *, hang_up: bool = False
) -> Iterator[list[bytes]]:
    """Serve *path* until the test is done: answer each request with *script* (None: never
    answer), then hang up or hold the connection. Yields the request lines seen."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.05)
    done = threading.Event()
    requests: list[bytes] = []

    def serve() -> None:
        held: list[socket.socket] = []
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            line = conn.makefile("rb").readline()
            requests.append(line)
            if script is not None:
                with contextlib.suppress(OSError):
                    for reply in script(line):
                        conn.sendall(reply)
                    if hang_up:
                        conn.shutdown(socket.SHUT_RDWR)
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        done.set()
        thread.join(10)
        listener.close()


@pytest.fixture
def sock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A socket path; the environment and the system socket cannot leak into the tests."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setattr("appliance.control.locate.SYSTEM_SOCKET", str(tmp_path / "no-system"))
    return tmp_path / "control.sock"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


# --- the happy paths -------------------------------------------------------------------------


def test_status_reload_scale_happy(sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def script(line: bytes) -> list[bytes]:
        request = json.loads(line)
        match request["cmd"]:
            case "status":
                return [encode_line(status_reply({"phase": "running", "generation": 2}))]
            case "reload":
                return [
                    encode_line(reload_progress(3, 1, 2, "1/2 workers replaced")),
                    encode_line(reload_ok_reply(3, "2 worker(s) replaced")),
                ]
            case _:
                return [encode_line(scale_reply(request["workers"]))]

    with fake_master(sock, script) as requests:
        code, out, err = run(capsys, "status", "--control", str(sock))
        assert (code, err) == (0, "")
        assert "running" in out
        code, out, err = run(capsys, "status", "--json", "--control", str(sock))
        assert json.loads(out) == {"phase": "running", "generation": 2}
        code, out, err = run(capsys, "reload", "--control", str(sock))
        assert (code, err) == (0, "")
        assert out == (
            "reloading: 1/2 workers replaced\nreload ok: 2 worker(s) replaced (generation 3)\n"
        )
        code, out, err = run(capsys, "scale", "3", "--control", str(sock))
        assert (code, out, err) == (0, "pool size set to 3\n", "")
    assert [json.loads(r) for r in requests] == [
        {"cmd": "status"},
        {"cmd": "status"},
        {"cmd": "reload"},
        {"cmd": "scale", "workers": 3},
    ]


def test_a_failed_reload_is_one_line_even_when_the_reason_is_not(
    sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "worker 0 failed to boot:\nImportError: new code\x1b[2J is broken\n" + "x" * (2 << 20)
    with fake_master(sock, lambda _line: [encode_line(error_reply(reason))]):
        code, out, err = run(capsys, "reload", "--control", str(sock))
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith(
        "appliance: reload failed: worker 0 failed to boot: ImportError: new code\\x1b[2J is"
    )
    assert line.endswith("more bytes)")


# --- a master that misbehaves ----------------------------------------------------------------


def test_no_answer_within_the_timeout(sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with fake_master(sock, None):
        code, out, err = run(capsys, "reload", "--control", str(sock), "--timeout", "0.3")
    assert (code, out) == (1, "")
    assert one_line(err) == (
        f"appliance: reload failed: no reply from the master on {sock} within 0.3s"
    )


@pytest.mark.parametrize("command", ["status", "reload", "scale"])
@pytest.mark.parametrize(
    ("replies", "needle"),
    [
        ([b"\xff\xfe\x00garbage\n"], "unreadable reply from the master on {sock}: not UTF-8"),
        ([b"x" * (5 << 20) + b"\n"], "reply too long: the master on {sock} sent a line of more"),
        ([b"[1, 2]\n"], "expected a JSON object, got list"),
        ([b'{"ok": "yes"}\n'], "the master sent no reason"),
        ([b'{"progress": 7}\n', b'{"ok": false, "error": ["a", "b"]}\n'], "['a', 'b']"),
        ([b'{"ok": false, "error": "\\udcff surrogate"}\n'], "\\udcff surrogate"),
        ([b'{"ok": tr'], "the master closed {sock} in the middle of a reply"),
        ([], "the master closed {sock} before replying"),
    ],
    ids=["garbage", "5MiB", "not-object", "ok-not-true", "odd-error", "surrogate", "cut", "closed"],
)
def test_confused_masters_give_one_line(
    sock: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    replies: list[bytes],
    needle: str,
) -> None:
    argv = [command, "--control", str(sock), "--timeout", "5"]
    if command == "scale":
        argv.insert(1, "2")
    with fake_master(sock, lambda _line: replies, hang_up=True):
        code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith(f"appliance: {command} failed: ")
    assert needle.replace("{sock}", str(sock)) in line
    assert len(line) < 500


def test_odd_types_in_a_success_reply(sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = [b'{"ok": true, "status": 3, "reload": 4, "workers": [1]}\n']
    with fake_master(sock, lambda _line: odd):
        code, out, err = run(capsys, "status", "--control", str(sock))
        assert (code, out) == (1, "")
        assert one_line(err) == (
            "appliance: status failed: unexpected reply from the master: no status document"
        )
        assert run(capsys, "reload", "--control", str(sock)) == (0, "reload ok\n", "")
        assert run(capsys, "scale", "2", "--control", str(sock)) == (
            0,
            "pool size set to [1]\n",
            "",
        )


# --- finding the master when the config is broken or gone -----------------------------------


def _status_script(_line: bytes) -> list[bytes]:
    return [encode_line(status_reply({"phase": "running"}))]


def test_broken_toml_still_names_the_socket(
    tmp_path: Path, sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = tmp_path / "appliance.toml"
    main.write_text(f'[workers\ncount = 2\n\n[control]\npath = "{sock}"\n')
    with fake_master(sock, _status_script):
        code, out, err = run(capsys, "status", "--config", str(main))
    assert (code, err) == (0, "")
    assert "running" in out


def test_deleted_main_file_and_control_option(
    tmp_path: Path, sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = tmp_path / "appliance.toml"  # never written: [control] path was set there
    with fake_master(sock, _status_script):
        code, out, err = run(capsys, "status", "--config", str(main), "--control", str(sock))
    assert (code, err) == (0, "")
    assert "running" in out


def test_environment_names_the_socket(
    tmp_path: Path, sock: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    main = tmp_path / "appliance.toml"
    main.write_text('[control]\npath = "/nonexistent/control.sock"\n')
    monkeypatch.setenv(ENV_VAR, str(sock))
    with fake_master(sock, _status_script):
        code, out, err = run(capsys, "status", "--config", str(main))
    assert (code, err) == (0, "")
    other = tmp_path / "other.sock"
    code, out, err = run(capsys, "status", "--config", str(main), "--control", str(other))
    assert (code, out) == (1, "")
    assert one_line(err) == (  # --control wins over the environment; no hint when explicit
        f"appliance: status failed: no appliance master is listening on {other} "
        "(is the service running?)"
    )


def test_nobody_listening_says_how_to_point_elsewhere(
    tmp_path: Path, sock: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = tmp_path / "appliance.toml"
    (tmp_path / "conf.d").mkdir()
    binary = tmp_path / "conf.d" / "50-site.toml"
    binary.write_bytes(b"\0\1\2")
    code, out, err = run(capsys, "reload", "--config", str(main))
    assert (code, out) == (1, "")
    default = one_line(err).split(" on ", 1)[1].split(" ", 1)[0]
    assert one_line(err) == (
        f"appliance: reload failed: no appliance master is listening on {default} (is the "
        "service running?); pass --control PATH if [control] path is set in a file that is "
        f"missing or unreadable (not read: {main}: missing, {binary}: binary)"
    )


def test_per_user_default_points_at_the_system_master(
    tmp_path: Path,
    sock: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    system = tmp_path / "system.sock"
    system.touch()  # exists; this user cannot connect to it (mode 0600, another owner)
    monkeypatch.setattr("appliance.control.locate.SYSTEM_SOCKET", str(system))
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    code, out, err = run(capsys, "status", "--config", str(tmp_path / "none.toml"))
    assert (code, out) == (1, "")
    assert one_line(err) == (
        "appliance: status failed: permission denied or not running as the service user: "
        f"the system master's socket is {system} (mode 0600); run as root "
        f"(tried {tmp_path}/xdg/appliance/control.sock)"
    )


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["reload", "--timeout", "0"],
        ["reload", "--timeout", "-1"],
        ["reload", "--timeout", "nan"],
        ["reload", "--timeout", "inf"],
        ["reload", "--timeout", "1e300"],
        ["status", "--timeout", "soon"],
        ["status", "--control", ""],
        ["scale", "many"],
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"appliance {argv[0]}: error: argument ")


def test_help_documents_control_and_environment(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("status", "reload", "scale"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--control PATH" in text
        assert "$APPLIANCE_CONTROL" in text
        assert "--timeout SECONDS" in text


def test_broken_stdout_pipe_is_quiet(
    sock: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def closed(*_args: object, **_kwargs: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with fake_master(sock, _status_script):
        monkeypatch.setattr("builtins.print", closed)
        code = cli.main(["status", "--control", str(sock)])
    assert code == 1
