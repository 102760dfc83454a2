"""Hostile drop-ins: bad bytes, deep nesting, huge files and files that are not files.

Each is dropped into conf.d of a running master, then SIGHUP and `reload` over the control
socket. The reload must fail with one line naming the file, quickly, while the old generation
keeps serving every request and the master keeps answering; removing the file makes the next
reload succeed. Known bugs 3 (one Latin-1 byte or a 3000-deep array crashed the master on
SIGHUP) and 5 (1M unknown keys blocked the master for ~2 minutes).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faults import Deadline, under_load

#: A rejected reload must answer within this, whatever the file (tomllib alone needs ~12 s
#: for a million keys, so the loader has to refuse such a file before parsing it).
_REJECT_WITHIN_S = 5.0


def _latin1(path: Path) -> None:
    path.write_bytes(b'[log]\nlevel = "info" # caf\xe9\n')


def _nested(path: Path) -> None:
    path.write_text("[app]\ntarget = " + "[" * 3000 + "]" * 3000 + "\n")


def _binary(path: Path) -> None:
    path.write_bytes(random.Random(9).randbytes(64 * 1024))


def _nul(path: Path) -> None:
    path.write_bytes(b"[workers]\ncount\x00 = 2\n")


def _million_keys(path: Path) -> None:
    with path.open("w") as f:
        f.write("[workers]\n")
        f.writelines(f"k{i} = 1\n" for i in range(1_000_000))


def _huge_string(path: Path) -> None:
    with path.open("w") as f:
        f.write('[log]\nlevel = "')
        f.write("x" * (64 << 20))
        f.write('"\n')


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # nobody ever writes: open() would block the master forever


def _directory(path: Path) -> None:
    path.mkdir()


def _dangling_symlink(path: Path) -> None:
    path.symlink_to(path.parent / "does-not-exist.toml")


#: Files whose content is hostile: the reload must fail, naming the file.
BAD_CONTENT: dict[str, Callable[[Path], None]] = {
    "latin1-byte": _latin1,
    "nested-3000": _nested,
    "binary": _binary,
    "nul-byte": _nul,
    "million-keys": _million_keys,
    "huge-string-64MiB": _huge_string,
}
#: Entries that are not regular files: the loader may skip them (as it does today) or refuse
#: them, but it must never block on them (a FIFO nobody writes) or crash.
NOT_A_FILE: dict[str, Callable[[Path], None]] = {
    "fifo": _fifo,
    "directory": _directory,
    "dangling-symlink": _dangling_symlink,
}


@pytest.mark.parametrize("kind", list(NOT_A_FILE))
def test_drop_in_that_is_not_a_file_neither_blocks_nor_crashes_the_master(
    subject, workdir, figures, kind
):
    s = subject()
    confd = workdir / "conf.d"
    confd.mkdir(exist_ok=True)
    odd = confd / f"70-{kind}.toml"
    NOT_A_FILE[kind](odd)
    with under_load(s) as load:
        load.wait_requests(100)
        sent = time.monotonic()
        reply = s.control.request("reload", timeout=_REJECT_WITHIN_S)
        figures.notes["reply_s"] = round(time.monotonic() - sent, 3)
        s.assert_alive()
        if not reply["ok"]:
            assert odd.name in reply["error"] and "\n" not in reply["error"].strip(), reply
        load.wait_requests(100)
    assert load.failures == []
    _remove(odd)
    figures.reloads = len(s.logs.find("reload.finished"))
    s.settled()
    s.stop_within()


@pytest.mark.parametrize("kind", list(BAD_CONTENT))
def test_hostile_drop_in_fails_the_reload_in_one_line_and_the_old_generation_serves(
    subject, workdir, figures, kind
):
    s = subject()
    confd = workdir / "conf.d"
    confd.mkdir(exist_ok=True)
    bad = confd / f"70-{kind}.toml"
    BAD_CONTENT[kind](bad)
    with under_load(s) as load:
        load.wait_requests(100)
        mark = s.logs.mark()
        sent = time.monotonic()
        s.master.signal(signal.SIGHUP)
        # The master answers while (or right after) it looks at the file.
        status_seen = _answers_status_meanwhile(s, _REJECT_WITHIN_S)
        try:
            failed = s.logs.wait_for("reload.failed", since=mark, timeout=_REJECT_WITHIN_S)
        except Deadline:
            s.assert_alive()
            raise
        figures.notes["reject_s"] = round(time.monotonic() - sent, 3)
        s.assert_alive()
        assert status_seen, f"no status answer within {_REJECT_WITHIN_S} s of the SIGHUP"
        text = str(failed.get("error") or failed.get("message"))
        assert bad.name in text, failed
        assert "\n" not in text.strip() and len(text) < 2000, text
        # The same through the control socket, as `appliance reload` would see it.
        reply = s.control.request("reload", timeout=_REJECT_WITHIN_S + 5)
        assert reply["ok"] is False and bad.name in reply["error"], reply
        assert "\n" not in reply["error"].strip()
        load.wait_requests(100)
        # No worker was lost to the master's pause (heartbeats are not the workers' fault).
        assert not s.logs.find("worker.hung", since=mark)
        assert not s.logs.find("worker.spawned", since=mark)
    assert load.failures == []
    assert {b["generation"] for b in load.seen} == {1}
    _remove(bad)
    reply = s.control.request("reload", timeout=30)
    assert reply["ok"] is True, reply
    figures.reloads = len(s.logs.find("reload.finished"))
    s.settled()
    s.stop_within()


def _answers_status_meanwhile(s, within: float) -> bool:
    """A status request sent right after the SIGHUP is answered within ``within`` seconds."""
    result: list[bool] = []

    def ask() -> None:
        try:
            result.append(s.control.request("status", timeout=within).get("ok") is True)
        except (OSError, ValueError, Deadline):
            result.append(False)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(within + 1)
    return bool(result and result[0])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()
