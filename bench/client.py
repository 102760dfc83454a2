"""A small HTTP/1.1 load client for the bench: stdlib only, asyncio.

It counts every failed attempt by kind (refused, reset, timeout, eof, non200, other) and
which worker answered (the first ``pid=NNN`` in the body), and records when each pid was
first seen on ``time.monotonic()`` (system-wide on Linux, so the harness can compare it with
the moment it killed a worker).

Modes:
  keepalive  each of the ``concurrency`` loops opens one connection and reuses it; on any
             failure it counts one failure, waits ``retry_pause_s`` and opens a new one.
  close      every request on a new connection (``Connection: close``).

Failures are counted per attempt. A request whose keep-alive connection was closed by the
server before any byte of the response arrived counts as ``eof`` (browsers would retry it
silently; we count it, strictly).

Usage: python3 bench/client.py --url http://127.0.0.1:8000/ -c 4 -d 3 [--mode close] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

FAILURE_KINDS = ("refused", "reset", "timeout", "eof", "non200", "other")
_PID_RE = re.compile(rb"pid[=: ](\d+)")


@dataclass
class Result:
    """Counts of one client run; ``to_dict()`` is what the harness stores."""

    concurrency: int
    mode: str
    duration_s: float = 0.0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    pids: Counter[int] = field(default_factory=Counter)
    first_seen: dict[int, float] = field(default_factory=dict)
    conn_pids: Counter[int] = field(default_factory=Counter)
    failure_times: list[float] = field(default_factory=list)
    failure_log: list[tuple[float, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def busiest_share(self) -> float | None:
        total = sum(self.pids.values())
        return max(self.pids.values()) / total if total else None

    def busiest_conn_share(self) -> float | None:
        total = sum(self.conn_pids.values())
        return max(self.conn_pids.values()) / total if total else None

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    def to_dict(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        return {
            "concurrency": self.concurrency,
            "mode": self.mode,
            "duration_s": round(self.duration_s, 4),
            "ok": self.ok,
            "failed": self.failed,
            "failures": {k: self.failures.get(k, 0) for k in FAILURE_KINDS},
            "rps": round(self.ok / self.duration_s, 1) if self.duration_s else 0.0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "pids": {str(k): v for k, v in self.pids.most_common()},
            "busiest_share": self.busiest_share(),
            "conn_pids": {str(k): v for k, v in self.conn_pids.most_common()},
            "busiest_conn_share": self.busiest_conn_share(),
            "first_seen": {str(k): v for k, v in self.first_seen.items()},
            "failure_times": self.failure_times[:10000],
        }


class _Fail(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _classify(exc: BaseException) -> str:
    if isinstance(exc, _Fail):
        return exc.kind
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "eof"
    return "other"


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Return (status, body, server_wants_close)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise _Fail("eof" if not e.partial else "reset") from None
    except asyncio.LimitOverrunError:
        raise _Fail("other") from None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _Fail("other")
    status = int(parts[1])
    length: int | None = None
    chunked = False
    close = parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            close = value == b"close"
    try:
        if chunked:
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(data[:-2])
            body = b"".join(chunks)
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body = await reader.read()
            close = True
    except asyncio.IncompleteReadError:
        raise _Fail("reset") from None
    return status, body, close


class _Load:
    def __init__(self, host: str, port: int, path: str, res: Result, deadline: float,
                 timeout_s: float, retry_pause_s: float, max_requests: int | None,
                 stop: threading.Event | None = None) -> None:
        self.host, self.port, self.res = host, port, res
        self.deadline, self.timeout_s, self.retry_pause_s = deadline, timeout_s, retry_pause_s
        self.remaining = max_requests
        self.stop = stop
        ka = res.mode == "keepalive"
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Connection: {'keep-alive' if ka else 'close'}\r\n\r\n"
        ).encode()

    def _take(self) -> bool:
        if time.monotonic() >= self.deadline or (self.stop is not None and self.stop.is_set()):
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True

    def _record_ok(self, body: bytes, t0: float, first_on_conn: bool) -> None:
        now = time.monotonic()
        self.res.ok += 1
        self.res.latencies.append(now - t0)
        m = _PID_RE.search(body)
        if m:
            pid = int(m.group(1))
            self.res.pids[pid] += 1
            self.res.first_seen.setdefault(pid, now)
            if first_on_conn:
                self.res.conn_pids[pid] += 1

    async def _fail(self, kind: str) -> None:
        self.res.failures[kind] += 1
        now = time.monotonic()
        self.res.failure_times.append(now)
        self.res.failure_log.append((now, kind))
        await asyncio.sleep(self.retry_pause_s)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout_s)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def loop(self) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        keepalive = self.res.mode == "keepalive"
        while self._take():
            t0 = time.monotonic()
            fresh = conn is None
            try:
                if conn is None:
                    conn = await self._connect()
                reader, writer = conn
                writer.write(self.request)
                status, body, close = await asyncio.wait_for(
                    _read_response(reader), self.timeout_s)
                if status != 200:
                    raise _Fail("non200")
                self._record_ok(body, t0, fresh)
                if close or not keepalive:
                    writer.close()
                    conn = None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, _Fail) as e:
                if conn is not None:
                    conn[1].close()
                    conn = None
                await self._fail(_classify(e))
            except ValueError:
                if conn is not None:
                    conn[1].close()
                    conn = None
                await self._fail("other")
        if conn is not None:
            conn[1].close()


async def run_async(url: str, concurrency: int, duration_s: float, mode: str = "keepalive",
                    timeout_s: float = 5.0, retry_pause_s: float = 0.01,
                    max_requests: int | None = None,
                    stop: threading.Event | None = None) -> Result:
    """Load ``url`` until ``duration_s`` passed, ``max_requests`` were started or ``stop``
    was set (from another thread)."""
    if mode not in ("keepalive", "close"):
        raise ValueError(f"mode must be keepalive or close, got {mode!r}")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    res = Result(concurrency=concurrency, mode=mode)
    start = time.monotonic()
    load = _Load(host, port, path, res, start + duration_s, timeout_s, retry_pause_s,
                 max_requests, stop)
    tasks = [asyncio.ensure_future(load.loop()) for _ in range(concurrency)]
    # Requests in flight at the deadline may finish within the timeout; the run is bounded.
    done, pending = await asyncio.wait(tasks, timeout=duration_s + timeout_s + 1.0)
    for t in pending:
        t.cancel()
    res.duration_s = min(time.monotonic(), start + duration_s + timeout_s) - start
    return res


def run(url: str, concurrency: int, duration_s: float, mode: str = "keepalive",
        timeout_s: float = 5.0, retry_pause_s: float = 0.01,
        max_requests: int | None = None, stop: threading.Event | None = None) -> Result:
    """Run load in a fresh event loop (safe to call from a thread)."""
    return asyncio.run(run_async(url, concurrency, duration_s, mode, timeout_s, retry_pause_s,
                                 max_requests, stop))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/")
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("-d", "--duration", type=float, default=3.0)
    ap.add_argument("--mode", choices=("keepalive", "close"), default="keepalive")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--max-requests", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = ap.parse_args(argv)
    if not (1 <= a.concurrency <= 1024) or not (0 < a.duration <= 600):
        ap.error("concurrency must be 1..1024 and duration 0..600 s")
    res = run(a.url, a.concurrency, a.duration, a.mode, a.timeout, max_requests=a.max_requests)
    d = res.to_dict()
    if a.json:
        json.dump(d, sys.stdout)
        sys.stdout.write("\n")
    else:
        share = d["busiest_share"]
        print(f"{d['rps']:.0f} req/s ok={d['ok']} failed={d['failed']} {d['failures']} "
              f"p99={d['p99_ms']} ms busiest={'-' if share is None else f'{share:.0%}'} "
              f"pids={d['pids']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
