"""The worker -> master report pipe: one JSON object per line, each under PIPE_BUF.

Messages: ``{"t": "ready"}``, ``{"t": "hb", "req": N, "inflight": M, "conns": C, "rss": MiB}``,
``{"t": "draining"}`` (listening sockets closed: no new connections from here on) and
``{"t": "boot_error", "error": "..."}``. Lines under PIPE_BUF (4096 bytes) are written
atomically, so a line is never interleaved or torn; a worker that cannot write because the
master is not reading drops the heartbeat rather than block its event loop.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["MAX_LINE", "MessageReader", "encode", "send"]

MAX_LINE = 4096


def encode(kind: str, **fields: Any) -> bytes:
    line = json.dumps({"t": kind, **fields}, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        if "error" in fields:
            fields["error"] = str(fields["error"])[: MAX_LINE // 2] + "..."
            return encode(kind, **fields)
        raise ValueError(f"report message too long ({len(line)} bytes)")
    return line


def send(fd: int, kind: str, **fields: Any) -> bool:
    """Write one message; ``False`` if the pipe is full or the master is gone."""
    try:
        os.write(fd, encode(kind, **fields))
    except (BlockingIOError, BrokenPipeError):
        return False
    return True


class MessageReader:
    """Reassembles lines from a non-blocking pipe; malformed lines are returned as errors."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_LINE:
            self._buf = b""
            lines.append(b"")
        out: list[dict[str, Any]] = []
        for line in lines:
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise TypeError("not an object")
            except (ValueError, TypeError):
                msg = {"t": "invalid", "line": line[:200].decode("utf-8", "replace")}
            out.append(msg)
        return out
