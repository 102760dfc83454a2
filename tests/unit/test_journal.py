"""journald native protocol: encoding, a fake journal socket, the memfd path for big entries."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.journal import JournalSender, encode_entry, field_name, stderr_is_journal
from appliance.systemd import SystemdEnvError


def decode_entry(data: bytes) -> list[tuple[str, bytes]]:
    """Test-side parser for the native protocol (both field forms)."""
    fields: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields.append((key.decode(), value))
            pos = newline + 1
        else:
            (size,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
            start = newline + 9
            fields.append((line.decode(), data[start : start + size]))
            assert data[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
    return fields


class FakeJournal:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(5)

    def receive(self) -> dict[str, str]:
        """One entry, as journald would read it (inline or from a passed memfd)."""
        fd_size = array.array("i").itemsize
        data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fd_size))
        if ancdata:
            level, kind, payload = ancdata[0]
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            assert data == b""
            fd = array.array("i", payload[:fd_size])[0]
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_WRITE
                size = os.fstat(fd).st_size
                data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
        return {key: value.decode() for key, value in decode_entry(data)}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(tmp_path / "journal.sock")
    yield fake
    fake.close()


def test_field_names_are_sanitized() -> None:
    assert field_name("worker_id") == "WORKER_ID"
    assert field_name("exit-code") == "EXIT_CODE"
    assert field_name("_pid") == "PID"
    assert field_name("__") == "F_"
    assert field_name("2xx") == "F_2XX"
    assert field_name("héllo.world") == "H_LLO_WORLD"
    assert len(field_name("x" * 100)) == 64


def test_encode_simple_and_binary_forms() -> None:
    data = encode_entry(
        {
            "MESSAGE": "line one\nline two",
            "exit_code": 3,
            "ok": True,
            "ratio": 0.5,
            "raw": b"\x00\x01",
            "skipped": None,
        }
    )
    assert data == (
        b"MESSAGE\n" + struct.pack("<Q", 17) + b"line one\nline two\n"
        b"EXIT_CODE=3\n"
        b"OK=true\n"
        b"RATIO=0.5\n"
        b"RAW=\x00\x01\n"
    )
    assert decode_entry(data)[0] == ("MESSAGE", b"line one\nline two")


def test_stderr_is_journal(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        fd = stream.fileno()
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd)
        assert not stderr_is_journal({}, fd)
        with pytest.raises(SystemdEnvError, match="JOURNAL_STREAM='junk'"):
            stderr_is_journal({"JOURNAL_STREAM": "junk"}, fd)


def test_send_to_fake_journal(journal: FakeJournal) -> None:
    sender = JournalSender(journal.path)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        tb = traceback.format_exc()
    assert sender.send({"MESSAGE": "boom\n" + tb, "PRIORITY": 3, "EVENT": "worker.crashed"})
    entry = journal.receive()
    assert entry["PRIORITY"] == "3"
    assert entry["EVENT"] == "worker.crashed"
    assert entry["MESSAGE"].startswith("boom\nTraceback (most recent call last):\n")
    assert entry["MESSAGE"].rstrip().endswith("ZeroDivisionError: division by zero")
    sender.close()
    sender.close()


def test_oversized_entry_goes_through_memfd(journal: FakeJournal) -> None:
    sender = JournalSender(journal.path)
    big = "x" * (4 << 20)
    assert sender.send({"MESSAGE": big, "EVENT": "worker.stack_dump"})
    entry = journal.receive()
    assert entry["EVENT"] == "worker.stack_dump"
    assert entry["MESSAGE"] == big
    sender.close()


def test_send_without_journal_returns_false(tmp_path: Path) -> None:
    sender = JournalSender(str(tmp_path / "absent.sock"))
    assert sender.send({"MESSAGE": "hello"}) is False
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(stale))
    dead.close()
    assert JournalSender(str(stale)).send({"MESSAGE": "hello"}) is False


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_sender_survives_journald_restart(tmp_path: Path) -> None:
    first = FakeJournal(tmp_path / "j.sock")
    sender = JournalSender(first.path)
    assert sender.send({"MESSAGE": "one"})
    assert first.receive()["MESSAGE"] == "one"
    first.close()
    os.unlink(first.path)
    second = FakeJournal(tmp_path / "j.sock")
    try:
        assert sender.send({"MESSAGE": "two"})
        assert second.receive()["MESSAGE"] == "two"
    finally:
        second.close()
        sender.close()
