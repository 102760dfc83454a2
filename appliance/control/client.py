"""The CLI's half of the control socket: a blocking client with a deadline and bounded reads.

Whatever the peer sends (nothing, garbage, a line of many MiB), the client ends with a reply
object or a one-line :class:`ControlError`, never another exception.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

from appliance.control.protocol import (
    MAX_CLIENT_LINE,
    ControlError,
    decode_reply,
    encode_request,
    is_final,
)

__all__ = ["ControlClient", "ControlError", "ControlUnavailable"]

_CHUNK = 65536


class ControlUnavailable(ControlError):
    """No master to talk to (socket missing, nobody listening, or not allowed to connect).

    ``nobody_listening`` is True when the socket is missing or refuses connections (rather
    than, say, denying permission): the CLI then suggests where else the master may be.
    """

    def __init__(self, message: str, *, nobody_listening: bool = False) -> None:
        super().__init__(message)
        self.nobody_listening = nobody_listening


class ControlClient:
    """Blocking client for the CLI.

    *timeout* bounds the whole conversation (connecting, sending, and every reply line up to
    the final one), so ``appliance reload --timeout 170`` gives up before systemd's 180 s
    bound on ``ExecReload=`` kills it, however many progress lines the master sends.
    """

    __slots__ = ("path", "timeout")

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its final reply (progress lines are skipped)."""
        final: dict[str, Any] = {}
        for obj in self.stream(cmd, **args):
            final = obj
        return final

    def stream(self, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send one request; yield every reply line, the last one being the final reply.

        Raises :class:`ControlUnavailable` when there is no master to talk to and
        :class:`ControlError` when the conversation fails (timeout, hang-up, bad reply).
        """
        deadline = time.monotonic() + self.timeout
        sock = self._connect(deadline)
        try:
            try:
                sock.settimeout(self._remaining(deadline, replies=0))
                sock.sendall(encode_request(cmd, **args))
            except TimeoutError as exc:
                raise self._timed_out(0) from exc
            except OSError as exc:
                raise ControlError(f"sending to {self.path} failed: {_why(exc)}") from exc
            lines = _Lines(sock)
            replies = 0
            while True:
                line = self._read_line(lines, deadline, replies)
                try:
                    obj = decode_reply(line)
                except ValueError as exc:
                    raise ControlError(
                        f"unreadable reply from the master on {self.path}: {exc}"
                    ) from None
                replies += 1
                yield obj
                if is_final(obj):
                    return
        finally:
            sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise ControlError(f"cannot create a socket: {_why(exc)}") from exc
        try:
            sock.settimeout(self._remaining(deadline, replies=0))
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ControlUnavailable(
                f"no appliance master is listening on {self.path} (is the service running?)",
                nobody_listening=True,
            ) from exc
        except PermissionError as exc:
            sock.close()
            raise ControlUnavailable(
                f"permission denied connecting to {self.path}: the control socket is mode 0600, "
                "run as the service's user or root"
            ) from exc
        except TimeoutError as exc:
            sock.close()
            raise ControlUnavailable(
                f"connecting to {self.path} timed out (the master does not accept connections)"
            ) from exc
        except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
            sock.close()
            raise ControlUnavailable(f"cannot connect to {self.path}: {_why(exc)}") from exc
        except ControlError:
            sock.close()
            raise
        return sock

    def _read_line(self, lines: _Lines, deadline: float, replies: int) -> bytes:
        while True:
            line = lines.pop()
            if line is not None and len(line) <= MAX_CLIENT_LINE + 1:
                return line
            if line is not None or lines.pending > MAX_CLIENT_LINE:
                raise ControlError(
                    f"reply too long: the master on {self.path} sent a line of more than "
                    f"{MAX_CLIENT_LINE >> 20} MiB"
                )
            try:
                lines.sock.settimeout(self._remaining(deadline, replies=replies))
                chunk = lines.sock.recv(_CHUNK)
            except TimeoutError as exc:
                raise self._timed_out(replies) from exc
            except OSError as exc:
                raise ControlError(f"reading from {self.path} failed: {_why(exc)}") from exc
            if not chunk:
                if lines.pending:
                    raise ControlError(f"the master closed {self.path} in the middle of a reply")
                raise ControlError(f"the master closed {self.path} before replying")
            lines.feed(chunk)

    def _remaining(self, deadline: float, *, replies: int) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out(replies)
        return remaining

    def _timed_out(self, replies: int) -> ControlError:
        what = "no final reply" if replies else "no reply"
        return ControlError(f"{what} from the master on {self.path} within {self.timeout:g}s")


class _Lines:
    """Bytes received so far, split at newlines; scans each byte once (a 4 MiB line is cheap)."""

    __slots__ = ("_buf", "_scanned", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._scanned = 0

    @property
    def pending(self) -> int:
        """Bytes of the line being received."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk

    def pop(self) -> bytes | None:
        newline = self._buf.find(b"\n", self._scanned)
        if newline < 0:
            self._scanned = len(self._buf)
            return None
        line = bytes(self._buf[: newline + 1])
        del self._buf[: newline + 1]
        self._scanned = 0
        return line


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
