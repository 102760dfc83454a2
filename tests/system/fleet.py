"""The fleet of tests/system/test_fleet.py: three boxes (each a booted systemd with appliance
installed) behind a real HAProxy, with a real redis-server, on a network of their own.

The network: a fourth network namespace, the *hub* (``ip netns add apl-fleet-XXXXXXXX``),
holds a bridge ``br0`` with 10.77.0.1/16 and, for each box N, one end of a veth pair
(``hN``, a port of the bridge); the other end is moved into box N's network namespace as
``fleet0`` with 10.77.0.(10+N)/16. HAProxy (frontend on 127.0.0.1:8080 of the hub), redis
(10.77.0.1:6379 plus a unix socket) and the client loop run in the hub as plain processes
(``nsenter --net=/run/netns/NAME``), so nothing of the fleet touches the host's own network;
their unix sockets and files live in the fleet's directory on the host, where the test reads
them. :meth:`Hub.down` kills what it started (by pid), deletes the namespace (which takes the
veths with it) and the directory (APPLIANCE_FLEET_KEEP_LOGS=1 keeps the directory with the
logs of haproxy, redis and the client loops); it is safe after a failed :meth:`Hub.up`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from box import Box

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "fleet_client.py"
HUB_ADDRESS = "10.77.0.1"
PREFIX_LEN = 16
FRONTEND = ("127.0.0.1", 8080)
APP_PORT = 8000
AGENT_PORT = 8099
REDIS_PORT = 6379

T = TypeVar("T")


class FleetError(RuntimeError):
    pass


def host_address(index: int) -> str:
    """Box ``index`` (1, 2, 3) is 10.77.0.11, .12, .13."""
    return f"10.77.0.{10 + index}"


def wait_until(what: str, predicate: Callable[[], T | None], timeout: float = 30.0,
               interval: float = 0.05) -> T:
    """Poll ``predicate()`` until it returns something truthy; raise at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def _run(argv: list[str], timeout: float = 30) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise FleetError(f"{shlex.join(argv)} failed (rc={r.returncode}): {r.stderr.strip()}")
    return r.stdout


# ---------------------------------------------------------------------------- HAProxy
def haproxy_cfg(servers: dict[str, str], stats_socket: str, *, proxy_v2: bool) -> str:
    """The balancer of docs/scaling.md: agent-check for admin state and weight, an HTTP check
    of the readiness path for "a worker answers", retries only where the request never left
    HAProxy (conn-failure), each retry on another server."""
    proxy = " send-proxy-v2" if proxy_v2 else ""
    lines = [
        "global",
        "    log stdout format raw local0",
        f"    stats socket {stats_socket} mode 600 level admin",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option log-health-checks",
        "    timeout connect 1s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout check 1s",
        "    retries 3",
        "    retry-on conn-failure",
        "    option redispatch 1",
        "",
        "frontend www",
        f"    bind {FRONTEND[0]}:{FRONTEND[1]}",
        "    default_backend fleet",
        "",
        "backend fleet",
        "    balance roundrobin",
        "    option httpchk",
        "    http-check send meth GET uri /-/ready ver HTTP/1.1 hdr Host fleet",
        "    http-check expect status 200,503",
        (f"    default-server weight 100 check inter 1s fall 2 rise 2 agent-check "
         f"agent-port {AGENT_PORT} agent-inter 1s pool-purge-delay 1s{proxy}"),
    ]
    lines += [f"    server {name} {addr}:{APP_PORT} agent-addr {addr}"
              for name, addr in servers.items()]
    return "\n".join(lines) + "\n"


class HAProxy:
    """The runtime API on the stats socket (``show stat``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def command(self, line: str, timeout: float = 5.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self, backend: str = "fleet") -> dict[str, dict[str, str]]:
        """``show stat`` rows of the backend's servers, by server name."""
        text = self.command("show stat")
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r for r in rows
                if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")}

    def backend(self, backend: str = "fleet") -> dict[str, str]:
        """The ``show stat`` row of the backend itself (its counters sum its servers')."""
        text = self.command("show stat")
        for r in csv.DictReader(io.StringIO(text.lstrip("# "))):
            if r["pxname"] == backend and r["svname"] == "BACKEND":
                return r
        raise FleetError(f"no backend {backend} in show stat:\n{text[:2000]}")

    def server(self, name: str) -> dict[str, str]:
        return self.servers()[name]

    @staticmethod
    def routable(row: dict[str, str]) -> bool:
        """HAProxy sends this server new requests: UP at full weight."""
        return row["status"] == "UP" and row["weight"] == "100"

    @staticmethod
    def excluded(row: dict[str, str]) -> bool:
        """HAProxy sends this server no new requests: weight 0 (agent ``drain`` or ``ready
        0%``), or a state other than UP ("UP 1/2" is still UP, on its way down)."""
        return row["weight"] == "0" or not row["status"].startswith("UP")

    @staticmethod
    def brief(row: dict[str, str]) -> str:
        return (f"{row['svname']}: {row['status']} weight {row['weight']}, check "
                f"{row['check_status']} {row['last_chk']!r}, agent {row['agent_status']} "
                f"{row['last_agt']!r}")


# ---------------------------------------------------------------------------- Redis
def resp(path: Path, *args: str, timeout: float = 5.0) -> Any:
    """One command to redis over its unix socket (integers, strings, nil and flat arrays)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        s.sendall(payload.encode())
        f = s.makefile("rb")

        def one() -> Any:
            line = f.readline()
            kind, rest = line[:1], line[1:-2]
            if kind == b":":
                return int(rest)
            if kind == b"+":
                return rest.decode()
            if kind == b"-":
                raise FleetError(f"redis: {rest.decode(errors='replace')}")
            if kind == b"$":
                n = int(rest)
                return None if n < 0 else f.read(n + 2)[:-2].decode()
            if kind == b"*":
                return [one() for _ in range(int(rest))]
            raise FleetError(f"redis: unexpected reply {line[:40]!r}")

        return one()


# ---------------------------------------------------------------------------- client loop
class Clients:
    """A running fleet_client.py in the hub; see :meth:`Hub.clients`."""

    def __init__(self, proc: subprocess.Popen[bytes], stop: Path, out: Path) -> None:
        self.proc, self.stop_file, self.out = proc, stop, out

    def progress(self) -> dict[str, Any]:
        try:
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return {}

    def advance(self, what: str, n: int = 50, timeout: float = 60) -> dict[str, Any]:
        """Wait until ``n`` more requests were answered."""
        start = self.progress().get("ok", 0)

        def advanced() -> dict[str, Any] | None:
            p = self.progress()
            return p if p.get("ok", 0) >= start + n else None

        return wait_until(f"{n} more answered requests ({what})", advanced, timeout)

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        """Stop the loop (each user finishes its request) and return the final counts."""
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        final = self.progress()
        if not final.get("done"):
            raise FleetError(f"the client loop did not finish: {final}")
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------- the hub
class Hub:
    """The fleet's network namespace with its bridge, redis, HAProxy and client loops."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.name = f"apl-fleet-{uuid.uuid4().hex[:8]}"
        self.netns = Path("/run/netns") / self.name
        self.haproxy = HAProxy(directory / "haproxy.sock")
        self.redis_socket = directory / "redis.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self._links = 0

    def nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.netns}", *argv]

    def up(self) -> Hub:
        self.dir.mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", self.name])
        ip = ["ip", "-n", self.name]
        _run([*ip, "link", "set", "lo", "up"])
        _run([*ip, "link", "add", "br0", "type", "bridge"])
        _run([*ip, "addr", "add", f"{HUB_ADDRESS}/{PREFIX_LEN}", "dev", "br0"])
        _run([*ip, "link", "set", "br0", "up"])
        return self

    def attach(self, box: Box, index: int) -> str:
        """A veth from the hub's bridge into the box, as ``fleet0`` with its address."""
        assert box.pid is not None
        port = f"h{index}"
        _run(["ip", "-n", self.name, "link", "add", port, "type", "veth",
              "peer", "name", "fleet0", "netns", str(box.pid)])
        self._links += 1
        _run(["ip", "-n", self.name, "link", "set", port, "master", "br0", "up"])
        address = host_address(index)
        box.run(["ip", "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "fleet0"])
        box.run(["ip", "link", "set", "fleet0", "up"])
        # the path the app needs: box -> redis on the hub (started before any box)
        probe = ("import socket; socket.create_connection"
                 f"(('{HUB_ADDRESS}', {REDIS_PORT}), timeout=1).close()")
        wait_until(f"redis on {HUB_ADDRESS} reachable from {address}", lambda: box.run(
            ["python3", "-I", "-c", probe], check=False).returncode == 0, timeout=20)
        return address

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed by down()
        self._logs.append(log)
        proc = subprocess.Popen(self.nsenter(argv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, n: int = 40) -> str:
        try:
            lines = (self.dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return f"(no {name}.log)"
        return "\n".join(lines[-n:])

    def start_redis(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        proc = self.spawn("redis", [exe, "--bind", HUB_ADDRESS, "--port", str(REDIS_PORT),
                                    "--unixsocket", str(self.redis_socket), "--unixsocketperm",
                                    "700", "--save", "", "--appendonly", "no",
                                    "--protected-mode", "no", "--daemonize", "no"])

        def pong() -> bool:
            if proc.poll() is not None:
                raise FleetError(f"redis-server exited:\n{self.log_tail('redis')}")
            try:
                return resp(self.redis_socket, "PING") == "PONG"
            except OSError:
                return False

        wait_until("redis answering PING", pong, timeout=20)

    def start_haproxy(self, config: str) -> None:
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(config)
        check = subprocess.run([exe, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True,
                               check=False)
        if check.returncode != 0:
            raise FleetError(f"haproxy -c refused the config:\n{check.stdout}{check.stderr}")
        proc = self.spawn("haproxy", [exe, "-db", "-f", str(cfg)])

        def listening() -> bool:
            if proc.poll() is not None:
                raise FleetError(f"haproxy exited:\n{self.log_tail('haproxy')}")
            try:
                return bool(self.haproxy.servers())
            except OSError:
                return False

        wait_until("haproxy's stats socket", listening, timeout=20)

    def clients(self, prefix: str, users: int = 6, rate: float = 0, max_seconds: float = 600
                ) -> Clients:
        """Start the client loop (users PREFIX0..PREFIX{users-1}, each at most ``rate``
        requests per second, 0 = unpaced) through the frontend."""
        stop, out = self.dir / f"{prefix}.stop", self.dir / f"{prefix}.json"
        stop.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        proc = self.spawn(f"client-{prefix}", [sys.executable, "-I", str(CLIENT), FRONTEND[0],
                                               str(FRONTEND[1]), str(users), prefix, str(stop),
                                               str(out), str(max_seconds), str(rate)])
        return Clients(proc, stop, out)

    def counters(self, users: list[str]) -> dict[str, int]:
        if not users:
            return {}
        values = resp(self.redis_socket, "MGET", *[f"fleet:count:{u}" for u in users])
        return {u: int(v) if v is not None else 0 for u, v in zip(users, values)}

    def down(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in self._logs:
            log.close()
        if self.netns.exists():
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        if self.dir.exists() and not os.environ.get("APPLIANCE_FLEET_KEEP_LOGS"):
            shutil.rmtree(self.dir, ignore_errors=True)
