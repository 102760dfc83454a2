"""The HAProxy agent-check responder: the master's non-blocking half of the agent protocol.

HAProxy's ``agent-check`` connects to ``agent-addr:agent-port`` every ``agent-inter``, may send
its ``agent-send`` string, reads one ASCII line and closes. The words we send (the line itself
is :func:`appliance.master.views.agent_reply`, a pure function of the master's state):

* ``ready NN%``: the admin state is ready (this also clears a ``drain`` or ``maint`` an earlier
  reply set, which is why every normal reply says ``ready``) and the weight is NN % of the
  server's configured weight: the share of the pool that is ready to serve;
* ``drain``: no new connections, except persistent ones (``appliance drain``, the drain
  delay after SIGTERM, stopping);
* ``maint``: no traffic at all (``appliance drain --maint``).

Nothing waits on a client: each accepted connection gets whatever of its line fits into the
socket's send buffer at once (a few bytes always do) and is closed in the same wake-up, so a
client that connects and never reads, or never closes, holds nothing of the master. What a
client sent is read and dropped first (when it is already there), so that closing does not
answer it with a reset.
"""

from __future__ import annotations

import contextlib
import errno
import socket

from appliance.config.schema import TcpAddress
from appliance.sockets import bind_agent

__all__ = ["MAX_PER_WAKEUP", "RESOURCE_ERRNOS", "AgentServer", "encode_reply"]

#: Connections answered per wake-up; more stay in the backlog for the next loop iteration, so
#: a flood of agent connections cannot starve the worker pipes.
MAX_PER_WAKEUP = 64
#: accept() errors that mean "no resource now": the caller looks away for a while.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_DISCARD = 4096


def encode_reply(line: str) -> bytes:
    """One agent reply on the wire: ASCII words, ``\\n`` at the end."""
    return line.encode("ascii", "replace") + b"\n"


class AgentServer:
    """The listening socket of ``[agent] address``; every call is non-blocking."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock

    @classmethod
    def bind(cls, address: TcpAddress, text: str) -> AgentServer:
        """Bind ``address`` (``text`` as the operator wrote it, for the error line).

        Raises :class:`appliance.sockets.ListenError` (one line) when it cannot.
        """
        return cls(bind_agent(address, text))

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def address(self) -> str:
        """Where it listens, as HOST:PORT (the port the kernel chose for port 0)."""
        if self._sock is None:
            return "?"
        host, port = self._sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def answer(self, line: str) -> int:
        """Accept what is waiting (up to :data:`MAX_PER_WAKEUP`), send ``line`` to each, close.

        Returns how many were answered. Raises :class:`OSError` for an ``accept()`` that failed
        for lack of a resource (:data:`RESOURCE_ERRNOS`): the socket stays readable, so the
        caller must stop watching it for a while instead of calling again at once.
        """
        sock = self._sock
        if sock is None:
            return 0
        data = encode_reply(line)
        answered = 0
        for _ in range(MAX_PER_WAKEUP):
            try:
                conn, _peer = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    raise
                break  # that connection only (EPROTO, a firewall's EPERM)
            with conn:
                conn.setblocking(False)
                with contextlib.suppress(OSError):
                    conn.recv(_DISCARD)  # the agent-send string, if any: dropped unread
                with contextlib.suppress(OSError):
                    conn.send(data)  # what fits now; never waited for
                    conn.shutdown(socket.SHUT_WR)
            answered += 1
        return answered

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
