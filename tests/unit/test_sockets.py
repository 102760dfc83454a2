"""Binding and adopting listeners with real sockets (port 0, unix sockets in tmp_path)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from appliance.config.schema import ListenSettings
from appliance.sockets import (
    Listener,
    ListenError,
    adopt_listener,
    bind_listener,
    close_listeners,
    remove_stale_socket,
)


def _unix(path: Path, mode: str = "0660", name: str = "api") -> ListenSettings:
    return ListenSettings(name=name, address=f"unix:{path}", mode=mode)


def test_bind_tcp_port_zero() -> None:
    listener = bind_listener(ListenSettings(name="http", address="127.0.0.1:0", backlog=16))
    try:
        sock = listener.sock
        host, port = sock.getsockname()
        assert host == "127.0.0.1"
        assert port > 0
        assert not listener.adopted
        assert listener.owned_path is None
        assert not sock.get_inheritable()
        assert not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        close_listeners([listener])


def test_bind_tcp_reuse_port() -> None:
    listener = bind_listener(ListenSettings(name="http", address="127.0.0.1:0", reuse_port=True))
    try:
        assert listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        close_listeners([listener])


def test_bind_hostname_prefers_ipv4() -> None:
    listener = bind_listener(ListenSettings(name="http", address="localhost:0"))
    try:
        assert listener.sock.family == socket.AF_INET
    finally:
        close_listeners([listener])


def test_bind_ipv6_is_v6only() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        listener = bind_listener(ListenSettings(name="v6", address="[::1]:0"))
    except ListenError as exc:
        pytest.skip(f"IPv6 loopback unavailable here: {exc}")
    try:
        assert listener.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        close_listeners([listener])


def test_address_in_use_message() -> None:
    first = bind_listener(ListenSettings(name="http", address="127.0.0.1:0"))
    port = first.sock.getsockname()[1]
    try:
        with pytest.raises(ListenError) as info:
            bind_listener(ListenSettings(name="http", address=f"127.0.0.1:{port}"))
        assert str(info.value) == f'[[listen]] "http" 127.0.0.1:{port}: address already in use'
    finally:
        close_listeners([first])


def test_unix_socket_mode_bits(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    listener = bind_listener(_unix(path, mode="0640"))
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert listener.owned_path == str(path)
        assert listener.owned_inode == (st.st_dev, st.st_ino)
        assert listener.owner_pid == os.getpid()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        close_listeners([listener])
    assert not path.exists()


def test_unix_stale_socket_replaced(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # leaves the file behind, like a crashed process
    assert path.exists()
    listener = bind_listener(_unix(path))
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        close_listeners([listener])


def test_unix_live_socket_refused(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(ListenError) as info:
            bind_listener(_unix(path))
        assert str(info.value).startswith(f'[[listen]] "api" unix:{path}: address already in use')
        assert path.exists()
    finally:
        live.close()


def test_unix_regular_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    path.write_text("precious")
    with pytest.raises(ListenError) as info:
        bind_listener(_unix(path))
    assert str(info.value) == (
        f'[[listen]] "api" unix:{path}: {path} exists and is not a socket; refusing to replace it'
    )
    assert path.read_text() == "precious"


def test_unix_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "http.sock"
    with pytest.raises(ListenError, match=f"directory {tmp_path / 'nope'} does not exist"):
        bind_listener(_unix(path))


def test_close_keeps_path_replaced_by_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    listener = bind_listener(_unix(path))
    os.unlink(path)
    path.write_text("someone else's")
    close_listeners([listener])
    assert path.read_text() == "someone else's"


def test_close_in_another_process_does_not_unlink(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    listener = bind_listener(_unix(path))
    close_listeners([listener], pid=os.getpid() + 1)  # as a forked worker would
    assert path.exists()
    remove_stale_socket(str(path))
    assert not path.exists()


def test_adopt_listening_tcp_socket() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    fd = os.dup(server.fileno())
    server.close()
    listener = adopt_listener(fd, "http")
    try:
        assert listener.adopted
        assert listener.name == "http"
        assert listener.sock.fileno() == fd
        assert listener.sock.family == socket.AF_INET
        assert not listener.sock.get_inheritable()
        assert not listener.sock.getblocking()
    finally:
        close_listeners([listener])


def test_adopt_rejects_non_listening_socket() -> None:
    left, right = socket.socketpair()
    try:
        with pytest.raises(ListenError) as info:
            adopt_listener(left.fileno(), "http")
        assert f'systemd fd {left.fileno()} named "http" is not listening' in str(info.value)
        left.send(b"x")  # the fd was left open and untouched
        assert right.recv(1) == b"x"
    finally:
        left.close()
        right.close()


def test_adopt_rejects_datagram_socket() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ListenError, match="is SOCK_DGRAM, not SOCK_STREAM"):
            adopt_listener(sock.fileno(), "metrics")
    finally:
        sock.close()


def test_adopt_rejects_non_socket(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(ListenError, match=f'systemd fd {fd} named "http": not a usable socket'):
            adopt_listener(fd, "http")
    finally:
        os.close(fd)


def test_close_never_unlinks_adopted_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "systemd.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    listener = adopt_listener(server.detach(), "http")
    assert isinstance(listener, Listener)
    close_listeners([listener])
    assert path.exists()
