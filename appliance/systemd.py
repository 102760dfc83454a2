"""The systemd service protocol: inherited listen fds, sd_notify messages, the watchdog.

Everything here takes the environment and the pid as arguments instead of reading
``os.environ``/``os.getpid()``: the master parses them once at start, tests feed plain dicts,
and nothing silently changes meaning after ``fork()``.

The rule for every variable: *absent* means "not started by systemd (or not for us)" and is a
quiet no-op; *present but malformed* is a :class:`SystemdEnvError`, because a half-understood
socket-activation or watchdog setup fails later in ways that are much harder to read.

The only I/O in this module is the notify datagram (:class:`Notifier`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import sdnotify  # type: ignore[import-untyped]  # ships no stubs or py.typed

from appliance._systemd_env import SystemdEnvError

__all__ = [
    "CHILD_ENV_VARS",
    "DEFAULT_FD_NAME",
    "LISTEN_FDS_START",
    "STATUS_MAX",
    "ListenFds",
    "Notifier",
    "SystemdEnvError",
    "claim_listeners",
    "combine",
    "mainpid",
    "ready",
    "reloading",
    "scrub_env",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

LISTEN_FDS_START = 3
"""sd_listen_fds(3): passed fds always start right after stdin/stdout/stderr."""

DEFAULT_FD_NAME = "unknown"
"""The name sd_listen_fds_with_names(3) reports when LISTEN_FDNAMES is not set."""

CHILD_ENV_VARS: tuple[str, ...] = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)
"""Variables addressed to the master alone. Workers must not see them: a worker that found
NOTIFY_SOCKET could send READY=1 on the master's behalf (NotifyAccess=main would drop it, but
only after a confusing log line), and LISTEN_PID no longer matches after fork anyway."""


def _parse_int(env: Mapping[str, str], key: str, *, minimum: int) -> int:
    raw = env[key]
    try:
        value = int(raw, 10)
    except ValueError:
        raise SystemdEnvError(f"{key}={raw!r} is not an integer") from None
    if value < minimum:
        raise SystemdEnvError(f"{key}={raw!r} must be >= {minimum}")
    return value


@dataclass(frozen=True, slots=True)
class ListenFds:
    """The sockets systemd passed us, in fd order.

    ``names[i]`` belongs to fd ``LISTEN_FDS_START + i``. A name may repeat (a .socket unit with
    both ``ListenStream=0.0.0.0:80`` and ``ListenStream=[::]:80`` passes two fds under one
    ``FileDescriptorName=``), which is why :meth:`by_name` maps to lists.
    """

    names: tuple[str, ...]
    fdnames_env: str | None = None
    """LISTEN_FDNAMES as received (None when unset), quoted back in error messages."""

    @classmethod
    def from_environ(cls, env: Mapping[str, str], pid: int) -> ListenFds | None:
        """Parse LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES; None when they are not addressed to *pid*.

        LISTEN_PID exists because these variables leak into any child that does not scrub its
        environment; a mismatch means "meant for an ancestor", not an error.
        """
        if "LISTEN_PID" not in env or "LISTEN_FDS" not in env:
            return None
        listen_pid = _parse_int(env, "LISTEN_PID", minimum=1)
        if listen_pid != pid:
            return None
        count = _parse_int(env, "LISTEN_FDS", minimum=0)
        fdnames = env.get("LISTEN_FDNAMES")
        if fdnames is None:
            return cls(names=(DEFAULT_FD_NAME,) * count, fdnames_env=None)
        names = tuple(fdnames.split(":")) if fdnames else ()
        if len(names) != count:
            raise SystemdEnvError(
                f"LISTEN_FDNAMES={fdnames!r} has {len(names)} name(s) "
                f"but LISTEN_FDS={count} fd(s) were passed"
            )
        if any(not name for name in names):
            raise SystemdEnvError(f"LISTEN_FDNAMES={fdnames!r} contains an empty name")
        return cls(names=names, fdnames_env=fdnames)

    def fds(self) -> tuple[int, ...]:
        """Every passed fd, in order."""
        return tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + len(self.names)))

    def by_name(self) -> dict[str, list[int]]:
        """Name -> fds carrying that name, in fd order."""
        result: dict[str, list[int]] = {}
        for fd, name in zip(self.fds(), self.names, strict=True):
            result.setdefault(name, []).append(fd)
        return result

    def __len__(self) -> int:
        return len(self.names)


def claim_listeners(wanted_names: Sequence[str], fds: ListenFds) -> dict[str, list[int]]:
    """Match config ``[[listen]]`` names to the fds systemd passed, all or nothing.

    Both directions are errors and reported together in one message: a configured name that
    systemd did not pass (the unit and the config disagree; silently binding it ourselves would
    hide that), and a passed fd nobody claims (traffic systemd accepts for us would never be
    served). Twisted-style "drop everything on a mismatch" would only move the failure later.
    """
    available = fds.by_name()
    problems: list[str] = []
    claimed: dict[str, list[int]] = {}
    env_text = (
        f"LISTEN_FDNAMES={fds.fdnames_env}"
        if fds.fdnames_env is not None
        else f"LISTEN_FDNAMES unset, so all {len(fds)} fd(s) are named {DEFAULT_FD_NAME!r}"
    )
    for name in wanted_names:
        if name in claimed:
            problems.append(f'config [[listen]] name "{name}" appears more than once')
        elif name in available:
            claimed[name] = list(available[name])
        else:
            problems.append(
                f'config [[listen]] name "{name}" was not passed by systemd ({env_text})'
            )
    for fd, name in zip(fds.fds(), fds.names, strict=True):
        if name not in claimed:
            problems.append(f'fd {fd} named "{name}" is not claimed by any [[listen]] entry')
    if problems:
        raise SystemdEnvError("; ".join(problems))
    return claimed


def scrub_env(env: MutableMapping[str, str]) -> None:
    """Remove the master-only variables (:data:`CHILD_ENV_VARS`) from *env*, in place."""
    for key in CHILD_ENV_VARS:
        env.pop(key, None)


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when the watchdog is not ours.

    Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends: one late loop iteration must
    not be enough for systemd to kill a healthy service.
    """
    if "WATCHDOG_USEC" not in env:
        return None
    if "WATCHDOG_PID" in env and _parse_int(env, "WATCHDOG_PID", minimum=1) != pid:
        return None
    usec = _parse_int(env, "WATCHDOG_USEC", minimum=1)
    return usec / 2 / 1_000_000


# --- message builders -----------------------------------------------------------------------
# Pure strings so the policy layer can emit Notify(message) actions and tests compare text.
# They are the only writers of the sd_notify format in appliance.

#: Longest STATUS= text sent (characters).
STATUS_MAX = 1024


def ready() -> str:
    """The service finished starting (or reloading)."""
    return "READY=1"


def reloading(monotonic_usec: int) -> str:
    """A reload started. systemd >= 253 requires MONOTONIC_USEC (CLOCK_MONOTONIC, i.e.
    ``time.monotonic_ns() // 1000``) next to RELOADING=1; older versions ignore it."""
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}"


def stopping() -> str:
    """The service is shutting down."""
    return "STOPPING=1"


def status(text: str) -> str:
    """Free-form status for ``systemctl status``.

    Newlines are folded to spaces: the protocol is newline-separated assignments, so a newline
    inside the text would end STATUS= early and could smuggle in another assignment. The text
    is cut at :data:`STATUS_MAX` characters: ``systemctl status`` shows one line, and a
    datagram must stay far below the socket's size limit whatever an app's error says.
    """
    line = " ".join(text.splitlines())
    if len(line) > STATUS_MAX:
        line = line[: STATUS_MAX - 1] + "…"
    return "STATUS=" + line


def watchdog() -> str:
    """Keep-alive ping; see :func:`watchdog_interval`."""
    return "WATCHDOG=1"


def mainpid(pid: int) -> str:
    """Tell systemd which process is the main one."""
    return f"MAINPID={pid}"


def combine(*messages: str) -> str:
    """Join messages into one datagram, e.g. ``combine(ready(), status("2/2 ready"))``.

    One datagram is applied atomically by systemd, so READY and its STATUS never disagree.
    """
    return "\n".join(messages)


# --- the notify socket ----------------------------------------------------------------------

#: Longest the master waits for room on the notify socket before dropping a message.
SEND_TIMEOUT_S = 0.25


class _Transport(sdnotify.SystemdNotifier):  # type: ignore[misc]  # sdnotify is untyped
    """sdnotify's notifier with the address injected and errors never swallowed.

    ``SystemdNotifier.__init__`` reads ``os.environ`` itself and hides every exception unless
    ``debug`` is true; we do the connect ourselves and set ``debug`` so that its ``notify()``
    re-raises whatever happens (callers catch OSError only).
    """

    def __init__(self, address: str | bytes) -> None:  # deliberately no super().__init__()
        self.debug = True
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.socket.connect(address)
        except BaseException:
            self.socket.close()
            raise
        # A datagram socket blocks when the receiver's queue is full (net.unix.max_dgram_qlen,
        # as low as 10): a busy or absent reader must cost the master a bounded moment and a
        # lost message, never a wedged event loop.
        self.socket.settimeout(SEND_TIMEOUT_S)


class Notifier:
    """Sends sd_notify datagrams from the master.

    Built from an injected environment; without NOTIFY_SOCKET it is a disabled no-op
    (``enabled`` False). The socket is connected lazily on the first send and dropped on any
    OSError, so a stale connection heals on the next message instead of failing forever.
    Workers never send: after fork the runtime scrubs the env and calls :meth:`close`, which
    closes the inherited fd and disables the notifier.
    """

    __slots__ = ("_address", "_display", "_transport")

    def __init__(self, address: str | bytes | None, display: str = "") -> None:
        self._address = address
        self._display = display
        self._transport: _Transport | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> Notifier:
        """NOTIFY_SOCKET is an absolute path or ``@name`` for the abstract namespace.

        An empty value counts as absent (``NOTIFY_SOCKET=`` is the usual way to switch
        notification off by hand); anything else that is not a path is malformed.
        """
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls(None)
        if raw.startswith("@"):
            if len(raw) == 1:
                raise SystemdEnvError("NOTIFY_SOCKET='@' names no abstract socket")
            return cls(b"\0" + raw[1:].encode(), raw)
        if raw.startswith("/"):
            return cls(raw, raw)
        raise SystemdEnvError(
            f"NOTIFY_SOCKET={raw!r} is neither an absolute path nor an @abstract name"
        )

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def address(self) -> str:
        """NOTIFY_SOCKET as given (for log lines); empty when disabled."""
        return self._display

    def send(self, message: str) -> bool:
        """Send *message* as one datagram; True if it left, False if disabled or on OSError.

        Only OSError is caught (systemd gone, socket removed): a caller passing a non-str is a
        bug and its TypeError surfaces. sdnotify encodes with latin-1; we hand it the UTF-8
        bytes spelled as latin-1 so that a STATUS= with any character goes out as UTF-8, which
        is what systemd expects, instead of raising UnicodeEncodeError.
        """
        if not isinstance(message, str):
            raise TypeError(f"sd_notify message must be str, got {type(message).__name__}")
        if self._address is None:
            return False
        wire = message.encode("utf-8").decode("latin-1")
        try:
            if self._transport is None:
                self._transport = _Transport(self._address)
            self._transport.notify(wire)
        except OSError:
            self._drop_transport()
            return False
        return True

    def close(self) -> None:
        """Close the socket and disable the notifier for good (idempotent).

        Permanent on purpose: a worker calls this right after fork, and a stray send from
        worker code must stay a no-op rather than quietly reconnect to the master's systemd.
        """
        self._drop_transport()
        self._address = None
        self._display = ""

    def _drop_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.socket.close()
