"""systemd env parsing, message building and the notify socket (a real datagram socket)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import systemd
from appliance.systemd import ListenFds, Notifier, SystemdEnvError, claim_listeners

PID = 4242


# --- LISTEN_* ----------------------------------------------------------------------------------


def test_listen_fds_absent_is_none() -> None:
    assert ListenFds.from_environ({}, PID) is None
    assert ListenFds.from_environ({"LISTEN_FDS": "1"}, PID) is None
    assert ListenFds.from_environ({"LISTEN_PID": str(PID)}, PID) is None


def test_listen_fds_for_another_pid_is_none() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
    assert ListenFds.from_environ(env, PID) is None


def test_listen_fds_named() -> None:
    env = {"LISTEN_PID": str(PID), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "http:admin:http"}
    fds = ListenFds.from_environ(env, PID)
    assert fds is not None
    assert fds.fds() == (3, 4, 5)
    assert fds.by_name() == {"http": [3, 5], "admin": [4]}
    assert len(fds) == 3


def test_listen_fds_unnamed_get_default_name() -> None:
    fds = ListenFds.from_environ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2"}, PID)
    assert fds is not None
    assert fds.by_name() == {"unknown": [3, 4]}


def test_listen_fds_zero() -> None:
    fds = ListenFds.from_environ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, PID)
    assert fds is not None
    assert fds.by_name() == {}


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID='abc' is not an integer"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "x"}, "LISTEN_FDS='x' is not an integer"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' must be >= 0"),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http"},
            "LISTEN_FDNAMES='http' has 1 name(s) but LISTEN_FDS=2 fd(s)",
        ),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:"},
            "contains an empty name",
        ),
    ],
)
def test_listen_fds_malformed(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SystemdEnvError) as info:
        ListenFds.from_environ(env, PID)
    assert needle in str(info.value)


def _fds(names: str) -> ListenFds:
    env = {
        "LISTEN_PID": str(PID),
        "LISTEN_FDS": str(len(names.split(":"))),
        "LISTEN_FDNAMES": names,
    }
    fds = ListenFds.from_environ(env, PID)
    assert fds is not None
    return fds


def test_claim_listeners_exact_match() -> None:
    assert claim_listeners(["admin", "http"], _fds("http:admin:http")) == {
        "admin": [4],
        "http": [3, 5],
    }


def test_claim_listeners_reports_both_sides_in_one_message() -> None:
    with pytest.raises(SystemdEnvError) as info:
        claim_listeners(["http", "api"], _fds("http:admin"))
    assert str(info.value) == (
        'config [[listen]] name "api" was not passed by systemd (LISTEN_FDNAMES=http:admin); '
        'fd 4 named "admin" is not claimed by any [[listen]] entry'
    )


def test_claim_listeners_unnamed_fds_explain_default() -> None:
    fds = ListenFds.from_environ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}, PID)
    assert fds is not None
    with pytest.raises(SystemdEnvError) as info:
        claim_listeners(["http"], fds)
    message = str(info.value)
    assert "LISTEN_FDNAMES unset" in message
    assert 'fd 3 named "unknown" is not claimed' in message


def test_claim_listeners_duplicate_config_name() -> None:
    with pytest.raises(SystemdEnvError, match="appears more than once"):
        claim_listeners(["http", "http"], _fds("http"))


def test_scrub_env() -> None:
    env = {key: "1" for key in systemd.CHILD_ENV_VARS} | {"PATH": "/bin"}
    systemd.scrub_env(env)
    assert env == {"PATH": "/bin"}
    systemd.scrub_env(env)  # idempotent on absent keys


# --- watchdog --------------------------------------------------------------------------------


def test_watchdog_interval_cases() -> None:
    assert systemd.watchdog_interval({}, PID) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}, PID) == 15.0
    same = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(PID)}
    assert systemd.watchdog_interval(same, PID) == 0.5
    other = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert systemd.watchdog_interval(other, PID) is None
    # WATCHDOG_PID alone (no USEC) still means no watchdog.
    assert systemd.watchdog_interval({"WATCHDOG_PID": str(PID)}, PID) is None


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"},
    ],
)
def test_watchdog_interval_malformed(env: dict[str, str]) -> None:
    with pytest.raises(SystemdEnvError):
        systemd.watchdog_interval(env, PID)


# --- messages --------------------------------------------------------------------------------


def test_message_builders() -> None:
    assert systemd.ready() == "READY=1"
    assert systemd.reloading(123456) == "RELOADING=1\nMONOTONIC_USEC=123456"
    assert systemd.stopping() == "STOPPING=1"
    assert systemd.watchdog() == "WATCHDOG=1"
    assert systemd.mainpid(77) == "MAINPID=77"
    assert systemd.status("2/2 workers ready, generation 3") == (
        "STATUS=2/2 workers ready, generation 3"
    )
    assert systemd.status("reload failed:\nbad key") == "STATUS=reload failed: bad key"
    assert systemd.combine(systemd.ready(), systemd.status("ok")) == "READY=1\nSTATUS=ok"


# --- the notify socket -----------------------------------------------------------------------


@pytest.fixture
def notify_sock(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notifier_disabled_without_env() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.send(systemd.ready()) is False
    assert not Notifier.from_environ({"NOTIFY_SOCKET": ""}).enabled


@pytest.mark.parametrize("value", ["relative/path", "@"])
def test_notifier_malformed_env(value: str) -> None:
    with pytest.raises(SystemdEnvError, match="NOTIFY_SOCKET"):
        Notifier.from_environ({"NOTIFY_SOCKET": value})


def test_notifier_sends_datagrams(notify_sock: tuple[str, socket.socket]) -> None:
    path, server = notify_sock
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.address == path
    assert notifier.send(systemd.ready())
    assert notifier.send(
        systemd.combine(systemd.status("1/2 workers ready ≥ ½"), systemd.watchdog())
    )
    assert server.recv(4096) == b"READY=1"
    assert server.recv(4096) == "STATUS=1/2 workers ready ≥ ½\nWATCHDOG=1".encode()
    notifier.close()


def test_notifier_abstract_socket() -> None:
    name = f"appliance-test-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    server.settimeout(5)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send(systemd.stopping())
        assert server.recv(4096) == b"STOPPING=1"
        notifier.close()
    finally:
        server.close()


def test_notifier_returns_false_when_socket_gone(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert notifier.enabled
    assert notifier.send(systemd.ready()) is False


def test_notifier_reconnects_after_socket_recreated(
    notify_sock: tuple[str, socket.socket],
) -> None:
    path, server = notify_sock
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.send("READY=1")
    assert server.recv(4096) == b"READY=1"
    server.close()
    os.unlink(path)
    assert notifier.send("WATCHDOG=1") is False
    again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    again.bind(path)
    again.settimeout(5)
    try:
        assert notifier.send("WATCHDOG=1")
        assert again.recv(4096) == b"WATCHDOG=1"
    finally:
        again.close()
        notifier.close()


def test_notifier_type_error_surfaces(notify_sock: tuple[str, socket.socket]) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_sock[0]})
    with pytest.raises(TypeError):
        notifier.send(b"READY=1")  # type: ignore[arg-type]
    notifier.close()


def test_notifier_close_is_permanent(notify_sock: tuple[str, socket.socket]) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_sock[0]})
    assert notifier.send("READY=1")
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_notify_never_wedges_the_master_when_nobody_reads(tmp_path) -> None:
    """A full notify queue (nobody reading) costs a dropped message, not a blocked master."""
    import socket as _socket

    from appliance.systemd import Notifier

    path = tmp_path / "n.sock"
    receiver = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        results = []
        for i in range(2000):  # the queue holds net.unix.max_dgram_qlen datagrams (10 here)
            results.append(notifier.send(f"STATUS={i}"))
            if not results[-1]:
                break
        assert results[0] is True
        assert results[-1] is False, "the queue filled up and the send gave up instead of blocking"
        receiver.recv(65536)
        assert notifier.send("READY=1") is True, "it recovers once there is room again"
    finally:
        receiver.close()
