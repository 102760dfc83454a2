"""How to start each server under test on 127.0.0.1:PORT with N workers and a bench app.

Every peer serves the same two apps (bench/apps, bench/node/server.js; nginx only the hello
app, as a `return 200`). A peer is started as a process group leader so that the harness can
stop it, and only it, by its own pid.

Who is compared with whom (the report's ratios):

* ``appliance`` (ASGI) against the *best Python peer* of the same repetition among
  :data:`ASGI_PEERS` (uvicorn, gunicorn + uvicorn worker, granian), and beside that against the
  :data:`CEILINGS`: nginx ``return 200`` (what this machine does with wrk beside it) and Node
  cluster (a non-Python pre-fork server);
* ``appliance-wsgi`` (``[app] interface = "wsgi"``) against the best of :data:`WSGI_PEERS`
  (gunicorn sync and gthread, the latter with as many threads as appliance's ``[wsgi]
  threads`` default);
* ``appliance-kernel`` (``[http] accept = "kernel"``) is appliance's own escape hatch, measured
  where the accept policy matters (cpu app, new connection per request, master CPU).
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

APPLIANCE = "appliance"
APPLIANCE_KERNEL = "appliance-kernel"
APPLIANCE_WSGI = "appliance-wsgi"
APPLIANCES = (APPLIANCE, APPLIANCE_KERNEL, APPLIANCE_WSGI)
#: ASGI Python peers: "the best Python peer" is the fastest of these in each repetition.
ASGI_PEERS = ("uvicorn", "gunicorn-uvicorn", "granian")
#: WSGI peers appliance-wsgi is compared with.
WSGI_PEERS = ("gunicorn-sync", "gunicorn-gthread")
#: Not Python: what the machine can do (nginx) and another language's pre-fork server (node).
CEILINGS = ("nginx", "node")
PEERS = (APPLIANCE, APPLIANCE_KERNEL, APPLIANCE_WSGI, *ASGI_PEERS, *WSGI_PEERS, "node", "nginx")

#: Threads per gunicorn gthread worker when appliance's schema cannot be read (its default).
_WSGI_THREADS_FALLBACK = 10


@functools.cache
def wsgi_threads() -> int:
    """appliance's default ``[wsgi] threads`` (the schema is the one declaration of it; read
    lazily, so the harness itself imports no pydantic until a gthread peer starts)."""
    try:
        from appliance.config.schema import WsgiSettings

        value = WsgiSettings.model_fields["threads"].default
        return int(value) if isinstance(value, int) else _WSGI_THREADS_FALLBACK
    except Exception:  # the bench must run even if appliance cannot be imported here
        return _WSGI_THREADS_FALLBACK


DESCRIPTIONS = {
    APPLIANCE: 'appliance, ASGI hello/cpu, default [http] accept = "balanced"',
    APPLIANCE_KERNEL: 'appliance with [http] accept = "kernel" (every worker accepts, the '
    "kernel decides)",
    APPLIANCE_WSGI: 'appliance serving the WSGI apps ([app] interface = "wsgi", its bridge, '
    "default [wsgi] threads)",
    "uvicorn": "uvicorn --workers N --loop uvloop --http httptools",
    "gunicorn-uvicorn": "gunicorn -k uvicorn_worker.UvicornWorker",
    "granian": "granian (Rust HTTP core), ASGI: --http 1 --no-ws --loop uvloop --runtime-mode st "
    "(its documented choices for few processes), --respawn-failed-workers",
    "gunicorn-sync": "gunicorn -k sync (WSGI; no keep-alive by design)",
    "gunicorn-gthread": "gunicorn -k gthread --threads T, T = appliance's default [wsgi] "
    "threads (WSGI; keep-alive)",
    "node": "Node.js cluster, plain http (bench/node/server.js)",
    "nginx": "nginx `return 200` (worker_processes N, no access log): the machine's ceiling",
}

#: Milliseconds the Python cpu loop takes here (set by the harness); node's cpu app calibrates
#: its own loop to the same time (see bench/node/server.js).
NODE_CPU_TARGET_MS: float | None = None


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workers: int
    app: str
    reload_note: str = ""
    tmp: list[str] = field(default_factory=list)
    #: Seconds from spawn to the master's READY=1 (appliance only: sd_notify to our socket).
    ready_s: float | None = None
    notify: socket.socket | None = None
    t0: float = 0.0
    #: appliance's control socket (its status names the template processes).
    control: str | None = None

    @property
    def master_pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, Any] | None:
        """appliance's status document (None for other peers or when it cannot be had)."""
        return None if self.control is None else appliance_status(self.control)

    def template_pids(self) -> list[int]:
        """appliance's template processes (children of the master that serve no request)."""
        st = self.status()
        if st is None and self.control is not None and self.proc.poll() is None:
            time.sleep(0.02)  # the master may be busy for a moment (a reload step): once more
            st = self.status()
        if not st:
            return []
        return [int(t["pid"]) for t in st.get("templates", []) if isinstance(t, dict)]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the master's children, without appliance's
        templates and helpers such as multiprocessing's resource tracker."""
        return [pid for role, pid in self.processes() if role == "worker"]

    def processes(self) -> list[tuple[str, int]]:
        """(role, pid) of the master and each child: master, template, worker or helper."""
        kids = children(self.proc.pid)
        templates = set(self.template_pids()) if self.control else set()
        out = [("master", self.proc.pid)]
        for pid in kids:
            if pid in templates:
                out.append(("template", pid))
            elif "resource_tracker" in cmdline(pid):
                out.append(("helper", pid))
            else:
                out.append(("worker", pid))
        return out

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # Any worker left behind in the peer's own process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        for t in self.tmp:
            shutil.rmtree(t, ignore_errors=True)


def children(pid: int) -> list[int]:
    """Direct children of pid (from /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


def appliance_status(path: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """``{"cmd": "status"}`` over appliance's control socket (newline-delimited JSON, see
    appliance/control/protocol.py); None when the master does not answer in time."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(path)
            s.sendall(b'{"cmd": "status"}\n')
            buf = b""
            while b"\n" not in buf and len(buf) < (4 << 20):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf.split(b"\n", 1)[0])
    except (OSError, ValueError):
        return None
    st = reply.get("status") if isinstance(reply, dict) and reply.get("ok") else None
    return st if isinstance(st, dict) else None


def available(name: str) -> str | None:
    """None when the peer can run here, else the reason it can't."""
    if name == "node":
        return None if shutil.which("node") else "node not installed"
    if name == "nginx":
        return None if _nginx() else "nginx not installed (Debian package nginx-light)"
    need = {APPLIANCE: "appliance", APPLIANCE_KERNEL: "appliance", APPLIANCE_WSGI: "appliance",
            "uvicorn": "uvicorn", "gunicorn-uvicorn": "gunicorn", "granian": "granian",
            "gunicorn-sync": "gunicorn", "gunicorn-gthread": "gunicorn"}
    exe = need[name]
    if not (BIN / exe).exists() and not shutil.which(exe):
        return f"{exe} not installed in {BIN}"
    if name == "gunicorn-uvicorn":
        try:
            import uvicorn_worker  # noqa: F401
        except ImportError:
            return "uvicorn-worker not installed"
    return None


def _exe(name: str) -> str:
    p = BIN / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def _nginx() -> str | None:
    for p in ("/usr/sbin/nginx", shutil.which("nginx")):
        if p and os.access(p, os.X_OK):
            return p
    return None


def _appliance_config(d: str, name: str, addr: str, workers: int, app: str,
                      log_level: str) -> Path:
    wsgi = name == APPLIANCE_WSGI
    cfg = Path(d) / "appliance.toml"
    cfg.write_text(
        "[app]\n"
        f'target = "bench.apps.{"wsgi" if wsgi else "asgi"}:{app}"\n'
        f'directory = "{ROOT}"\n'
        f'interface = "{"wsgi" if wsgi else "asgi"}"\n'
        "[workers]\n"
        f"count = {workers}\n"
        "[[listen]]\n"
        'name = "http"\n'
        f'address = "{addr}"\n'
        "[log]\n"
        f'level = "{log_level}"\n'
        # JSON lines: the workerboot scenario reads the master's events from stderr.
        'format = "json"\n'
        # Own control socket: several appliance peers run side by side.
        "[control]\n"
        f'path = "{d}/control.sock"\n'
        + ('[http]\naccept = "kernel"\n' if name == APPLIANCE_KERNEL else ""))
    return cfg


def _nginx_config(d: str, port: int, workers: int) -> Path:
    """nginx as the ceiling: N worker processes answering ``return 200`` with the same short
    body as the hello apps. Everything it writes (pid, error log, temp dirs) is in ``d``, so
    it touches none of the system nginx's paths; keep-alive is unlimited like the other
    peers' (nginx's default closes a connection after 1000 requests)."""
    conf = Path(d) / "nginx.conf"
    conf.write_text(
        f"worker_processes {workers};\n"
        "daemon off;\n"
        "master_process on;\n"
        f"pid {d}/nginx.pid;\n"
        f"error_log {d}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n"
        f"    client_body_temp_path {d}/body;\n"
        f"    proxy_temp_path {d}/proxy;\n"
        f"    fastcgi_temp_path {d}/fastcgi;\n"
        f"    uwsgi_temp_path {d}/uwsgi;\n"
        f"    scgi_temp_path {d}/scgi;\n"
        "    keepalive_requests 1000000;\n"
        "    default_type text/plain;\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        '        location / { return 200 "hello from pid=$pid\\n"; }\n'
        "    }\n"
        "}\n")
    return conf


def command(name: str, port: int, workers: int, app: str, *, log_level: str = "warning",
            ) -> tuple[list[str], dict[str, str], list[str]]:
    """(argv, extra environment, temp dirs to remove)."""
    addr = f"127.0.0.1:{port}"
    env: dict[str, str] = {}
    tmp: list[str] = []
    if name in APPLIANCES:
        d = tempfile.mkdtemp(prefix="bench-appliance-")
        tmp.append(d)
        cfg = _appliance_config(d, name, addr, workers, app, log_level)
        return [_exe("appliance"), "serve", "--config", str(cfg)], env, tmp
    if name == "uvicorn":
        return [_exe("uvicorn"), f"bench.apps.asgi:{app}", "--host", "127.0.0.1", "--port",
                str(port), "--workers", str(workers), "--loop", "uvloop", "--http",
                "httptools", "--no-access-log", "--log-level", "warning"], env, tmp
    if name == "gunicorn-uvicorn":
        return [_exe("gunicorn"), "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers),
                "-b", addr, "--log-level", "warning", f"bench.apps.asgi:{app}"], env, tmp
    if name == "granian":
        # granian's README: st runtimes are "more efficient with a small amount of
        # processes"; uvloop is its fastest loop in its own asyncio benchmarks; HTTP/1 only and
        # no WebSockets skip its protocol detection. The Rust task implementation is marked
        # experimental (and measured slower here), so the default asyncio one is kept.
        # Respawning failed workers is off by default; on, the kill scenario can measure it.
        return [_exe("granian"), "--interface", "asgi", "--host", "127.0.0.1", "--port",
                str(port), "--workers", str(workers), "--http", "1", "--no-ws", "--loop",
                "uvloop", "--runtime-mode", "st", "--log-level", "warning",
                "--respawn-failed-workers", f"bench.apps.asgi:{app}"], env, tmp
    if name == "gunicorn-sync":
        return [_exe("gunicorn"), "-k", "sync", "-w", str(workers), "-b", addr,
                "--log-level", "warning", f"bench.apps.wsgi:{app}"], env, tmp
    if name == "gunicorn-gthread":
        return [_exe("gunicorn"), "-k", "gthread", "--threads", str(wsgi_threads()), "-w",
                str(workers), "-b", addr, "--log-level", "warning",
                f"bench.apps.wsgi:{app}"], env, tmp
    if name == "node":
        env = {"PORT": str(port), "WORKERS": str(workers), "APP": app, "HOST": "127.0.0.1"}
        if NODE_CPU_TARGET_MS:
            env["JS_CPU_TARGET_MS"] = f"{NODE_CPU_TARGET_MS:.3f}"
        return ["node", str(ROOT / "bench" / "node" / "server.js")], env, tmp
    if name == "nginx":
        if app != "hello":
            raise ValueError("nginx serves only the hello app (return 200)")
        d = tempfile.mkdtemp(prefix="bench-nginx-")
        tmp.append(d)
        conf = _nginx_config(d, port, workers)
        return [_nginx() or "nginx", "-p", d, "-c", str(conf), "-e", f"{d}/error.log"], env, tmp
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


RELOAD_NOTES = {
    APPLIANCE: "kill -HUP master (appliance's rolling reload)",
    APPLIANCE_KERNEL: "kill -HUP master (appliance's rolling reload)",
    APPLIANCE_WSGI: "kill -HUP master (appliance's rolling reload)",
    "uvicorn": "kill -HUP master (uvicorn restarts its workers)",
    "gunicorn-uvicorn": "kill -HUP arbiter (gunicorn graceful reload)",
    "granian": "kill -HUP main (granian respawns its workers one by one)",
    "gunicorn-sync": "kill -HUP arbiter (gunicorn graceful reload)",
    "gunicorn-gthread": "kill -HUP arbiter (gunicorn graceful reload)",
    "node": "kill -HUP primary (bench rolling restart)",
    "nginx": "kill -HUP master (nginx reload)",
}


def start(name: str, port: int, workers: int, app: str, *, log: Path | None = None,
          log_level: str = "warning", ready_timeout_s: float = 20.0,
          ) -> tuple[Running, float]:
    """Start a peer and wait until every worker answers; return it and the seconds from
    spawn to its first 200 response."""
    argv, extra, tmp = command(name, port, workers, app, log_level=log_level)
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    notify = None
    control = None
    if name in APPLIANCES:
        # Our own NOTIFY_SOCKET, so the bench sees when the master says READY=1.
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        path = os.path.join(tmp[0], "notify")
        notify.bind(path)
        notify.setblocking(False)
        env["NOTIFY_SOCKET"] = path
        control = os.path.join(tmp[0], "control.sock")
    out = open(log, "ab") if log else subprocess.DEVNULL
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]  # the child has its own copy
    run = Running(name, proc, port, workers, app, RELOAD_NOTES[name], tmp, notify=notify,
                  t0=t0, control=control)
    if notify is not None:
        threading.Thread(target=_drain_notify, args=(run,), daemon=True).start()
    first = wait_first_response(port, t0 + ready_timeout_s, proc)
    if first is None:
        run.stop()
        raise RuntimeError(f"{name} did not answer on port {port} within {ready_timeout_s}s"
                           + (f" (log: {log})" if log else ""))
    if notify is not None:
        until = min(first + 5.0, t0 + ready_timeout_s)
        while run.ready_s is None and time.monotonic() < until:
            time.sleep(0.005)
    # Wait until all workers exist (a pool may answer before the last worker is up).
    # (uvicorn --workers 1 serves from the main process: no children to wait for.)
    want = 0 if name == "uvicorn" and workers == 1 else workers
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline and len(run.worker_pids()) < want:
        time.sleep(0.05)
    time.sleep(0.3)
    return run, first - t0


def _drain_notify(run: Running) -> None:
    """Read the master's sd_notify datagrams for as long as it runs (as systemd would: an
    unread queue of net.unix.max_dgram_qlen datagrams blocks the sender) and note the first
    READY=1 as seconds since spawn."""
    sock = run.notify
    while sock is not None and run.proc.poll() is None and run.notify is sock:
        try:
            if not select.select([sock], [], [], 0.2)[0]:
                continue
            data = sock.recv(4096)
        except BlockingIOError:
            continue
        except (OSError, ValueError):  # closed by stop()
            return
        if run.ready_s is None and b"READY=1" in data.split(b"\n"):
            run.ready_s = time.monotonic() - run.t0


def wait_first_response(port: int, deadline: float, proc: subprocess.Popen[bytes] | None = None,
                        ) -> float | None:
    """Poll GET / every 5 ms; monotonic time of the first 200, or None."""
    import http.client

    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return None
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/")
            if c.getresponse().status == 200:
                t = time.monotonic()
                c.close()
                return t
            c.close()
        except OSError:
            pass
        time.sleep(0.005)
    return None
