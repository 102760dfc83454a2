"""Listening sockets: adopt the ones systemd passed, or bind our own.

Ownership is the point of this module. A socket systemd passed belongs to systemd: it keeps
its copy open across our restarts (that is what makes ``systemctl restart`` refuse nothing),
and its unix path must never be unlinked by us. A unix socket we bound ourselves is ours to
unlink, but only by the process that bound it and only while the path is still the inode we
created; a worker closing its inherited copy, or a second instance that replaced the path,
must not make the socket disappear under someone else.

Choices made here, for the operator guide:

* TCP sockets get SO_REUSEADDR (restart without waiting out TIME_WAIT) and SO_REUSEPORT
  only when asked.
* ``[::]`` / any IPv6 address is bound with IPV6_V6ONLY=1, regardless of the
  ``net.ipv6.bindv6only`` sysctl: one ``[[listen]]`` entry is one address family, so a config
  that lists both ``0.0.0.0:8000`` and ``[::]:8000`` works everywhere (nginx made the same
  choice). List ``0.0.0.0:PORT`` as well to serve IPv4.
* A hostname resolves through getaddrinfo and binds one address, IPv4 preferred:
  ``localhost:8000`` should answer ``curl http://127.0.0.1:8000``.
* Every listener is non-blocking (workers serve them from an asyncio loop) and
  non-inheritable: workers get them by fork, and nothing we exec should.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from appliance.config.schema import TcpAddress, UnixAddress

__all__ = [
    "ListenError",
    "ListenLike",
    "Listener",
    "adopt_listener",
    "bind_agent",
    "bind_listener",
    "close_listeners",
    "remove_stale_socket",
]


class ListenError(Exception):
    """A listener could not be bound or adopted; the message is one line for the operator."""


class ListenLike(Protocol):
    """What :func:`bind_listener` needs from a ``[[listen]]`` entry (``ListenSettings``)."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def backlog(self) -> int: ...

    @property
    def mode(self) -> str: ...

    @property
    def reuse_port(self) -> bool: ...

    def parsed(self) -> TcpAddress | UnixAddress: ...


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening socket and who owns it.

    ``owned_path``/``owned_inode``/``owner_pid`` are set only for a unix socket we created:
    they are what :func:`close_listeners` checks before unlinking.
    """

    name: str
    sock: socket.socket
    adopted: bool = False
    """True for a socket systemd passed us: never unlinked, never re-bound."""
    owned_path: str | None = None
    owned_inode: tuple[int, int] | None = None
    """(st_dev, st_ino) of ``owned_path`` right after we bound it."""
    owner_pid: int | None = None
    """The pid that bound it; only that process may unlink ``owned_path``."""

    def fileno(self) -> int:
        return self.sock.fileno()


def _reason(exc: OSError, *, tcp_port: int | None = None) -> str:
    """One short human reason for a bind/listen failure."""
    code = exc.errno
    if code == errno.EADDRINUSE:
        return "address already in use"
    if code == errno.EACCES:
        if tcp_port is not None and 0 < tcp_port < 1024:
            return f"permission denied (port {tcp_port} < 1024 needs CAP_NET_BIND_SERVICE)"
        return "permission denied"
    if code == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    return exc.strerror or str(exc)


def _fail(listen: ListenLike, reason: str) -> ListenError:
    return ListenError(f'[[listen]] "{listen.name}" {listen.address}: {reason}')


def bind_listener(listen: ListenLike) -> Listener:
    """Create, bind and listen on the socket a ``[[listen]]`` entry describes.

    Raises :class:`ListenError` with a one-line message naming the entry and its address.
    """
    address = listen.parsed()
    if isinstance(address, UnixAddress):
        return _bind_unix(listen, address.path)
    return _bind_tcp(listen, address)


def _resolve(address: TcpAddress) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    if address.family != socket.AF_UNSPEC:
        return address.family, (address.host, address.port)
    infos = socket.getaddrinfo(
        address.host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # stable: IPv4 first
    family, _type, _proto, _canon, sockaddr = infos[0]
    return family, sockaddr


def _bind_tcp(listen: ListenLike, address: TcpAddress) -> Listener:
    try:
        family, sockaddr = _resolve(address)
    except OSError as exc:
        raise _fail(listen, _reason(exc)) from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(listen.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _fail(listen, _reason(exc, tcp_port=address.port)) from exc
    return Listener(name=listen.name, sock=sock)


def bind_agent(address: TcpAddress, text: str, backlog: int = 64) -> socket.socket:
    """Bind the ``[agent]`` responder's TCP socket (non-blocking, SO_REUSEADDR).

    Raises :class:`ListenError` with one line naming the setting, its value and the reason.
    """
    try:
        family, sockaddr = _resolve(address)
    except OSError as exc:
        raise ListenError(f"[agent] address {text}: {_reason(exc)}") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"[agent] address {text}: {_reason(exc, tcp_port=address.port)}") from exc
    return sock


def remove_stale_socket(path: str) -> None:
    """Make *path* free for ``bind()``: unlink it only if it is a dead unix socket.

    A socket file whose server is gone (connect refused) is left over from a crash and safe to
    remove. Anything else is refused with :class:`FileExistsError` (a live server: binding over
    it would steal its address; a regular file: not ours to delete). Missing path: nothing to do.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nobody listening: stale
    except FileNotFoundError:
        return  # removed meanwhile
    else:
        raise FileExistsError(
            errno.EADDRINUSE, f"address already in use (a process is listening on {path})"
        )
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bind_unix(listen: ListenLike, path: str) -> Listener:
    mode = listen.mode if isinstance(listen.mode, int) else int(listen.mode, 8)
    try:
        remove_stale_socket(path)
    except FileExistsError as exc:
        raise _fail(listen, exc.strerror or str(exc)) from exc
    except OSError as exc:
        raise _fail(listen, _reason(exc)) from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    created = False
    try:
        sock.bind(path)
        created = True
        # chmod before listen(): until listen() nobody can connect, so the moment the file
        # exists with umask-derived permissions does not matter.
        os.chmod(path, mode)
        st = os.stat(path)
        sock.listen(listen.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if created:
            _unlink_quietly(path)
        if exc.errno == errno.ENOENT:
            reason = f"directory {os.path.dirname(path) or '.'} does not exist"
        else:
            reason = _reason(exc)
        raise _fail(listen, reason) from exc
    return Listener(
        name=listen.name,
        sock=sock,
        owned_path=path,
        owned_inode=(st.st_dev, st.st_ino),
        owner_pid=os.getpid(),
    )


def adopt_listener(fd: int, name: str) -> Listener:
    """Wrap a listening fd systemd passed us (``socket.socket(fileno=fd)``).

    The kernel tells us the family and type; we insist on a listening SOCK_STREAM socket so
    that a datagram or not-yet-listening socket in the unit file is a startup error, not a
    worker that spins on accept(). On failure the fd is left open and untouched.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenError(
            f'systemd fd {fd} named "{name}": not a usable socket ({_reason(exc)})'
        ) from exc
    try:
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise ListenError(f'systemd fd {fd} named "{name}": {_reason(exc)}') from exc
    problem = None
    if sock.type != socket.SOCK_STREAM:
        problem = f"is {sock.type.name}, not SOCK_STREAM"
    elif not accepting:
        problem = "is not listening"
    if problem is not None:
        sock.detach()
        raise ListenError(
            f'systemd fd {fd} named "{name}" {problem}; appliance needs a listening '
            "SOCK_STREAM socket (ListenStream= in the .socket unit, Accept=no)"
        )
    sock.set_inheritable(False)
    sock.setblocking(False)
    return Listener(name=name, sock=sock, adopted=True)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def close_listeners(listeners: Iterable[Listener], *, pid: int | None = None) -> None:
    """Close every socket; unlink a unix path only if this process created it and it is unchanged.

    *pid* defaults to ``os.getpid()``: a worker that closes its inherited copies therefore never
    unlinks the master's socket, and an adopted (systemd) socket is never unlinked at all.
    """
    me = os.getpid() if pid is None else pid
    for listener in listeners:
        listener.sock.close()
        if listener.owned_path is None or listener.owner_pid != me:
            continue
        try:
            st = os.lstat(listener.owned_path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == listener.owned_inode:
            _unlink_quietly(listener.owned_path)
