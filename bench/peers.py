"""How to start each server under test on 127.0.0.1:PORT with N workers and a bench app.

Every peer serves the same two apps (bench/apps, bench/node/server.js). A peer is started as
a process group leader so that the harness can stop it, and only it, by its own pid.
"""

from __future__ import annotations

import os
import shutil
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PEERS = ("appliance", "appliance-kernel", "uvicorn", "gunicorn-uvicorn", "gunicorn-sync",
         "node")
#: Peers that are a variant of another, measured only where the variant matters (the cpu app
#: of the throughput scenario and the master-CPU scenario): appliance with ``[http] accept =
#: "kernel"`` (every worker accepts as fast as it can), beside the default "balanced".
VARIANTS = ("appliance-kernel",)
#: Python peers an appliance ratio is computed against ("best Python peer").
PYTHON_PEERS = ("uvicorn", "gunicorn-uvicorn", "gunicorn-sync")
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

    @property
    def master_pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid)

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


def available(name: str) -> str | None:
    """None when the peer can run here, else the reason it can't."""
    need = {"appliance": "appliance", "appliance-kernel": "appliance", "uvicorn": "uvicorn",
            "gunicorn-uvicorn": "gunicorn",
            "gunicorn-sync": "gunicorn"}
    if name == "node":
        return None if shutil.which("node") else "node not installed"
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


def command(name: str, port: int, workers: int, app: str) -> tuple[list[str], dict[str, str],
                                                                    list[str]]:
    """(argv, extra environment, temp dirs to remove)."""
    addr = f"127.0.0.1:{port}"
    env: dict[str, str] = {}
    tmp: list[str] = []
    if name in ("appliance", "appliance-kernel"):
        d = tempfile.mkdtemp(prefix="bench-appliance-")
        tmp.append(d)
        cfg = Path(d) / "appliance.toml"
        cfg.write_text(
            "[app]\n"
            f'target = "bench.apps.asgi:{app}"\n'
            f'directory = "{ROOT}"\n'
            'interface = "asgi"\n'
            "[workers]\n"
            f"count = {workers}\n"
            "[[listen]]\n"
            'name = "http"\n'
            f'address = "{addr}"\n'
            "[log]\n"
            'level = "warning"\n'
            # Own control socket: several appliance peers run side by side.
            "[control]\n"
            f'path = "{d}/control.sock"\n'
            + ('[http]\naccept = "kernel"\n' if name == "appliance-kernel" else ""))
        return [_exe("appliance"), "serve", "--config", str(cfg)], env, tmp
    if name == "uvicorn":
        return [_exe("uvicorn"), f"bench.apps.asgi:{app}", "--host", "127.0.0.1", "--port",
                str(port), "--workers", str(workers), "--loop", "uvloop", "--http",
                "httptools", "--no-access-log", "--log-level", "warning"], env, tmp
    if name == "gunicorn-uvicorn":
        return [_exe("gunicorn"), "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers),
                "-b", addr, "--log-level", "warning", f"bench.apps.asgi:{app}"], env, tmp
    if name == "gunicorn-sync":
        return [_exe("gunicorn"), "-k", "sync", "-w", str(workers), "-b", addr,
                "--log-level", "warning", f"bench.apps.wsgi:{app}"], env, tmp
    if name == "node":
        env = {"PORT": str(port), "WORKERS": str(workers), "APP": app, "HOST": "127.0.0.1"}
        if NODE_CPU_TARGET_MS:
            env["JS_CPU_TARGET_MS"] = f"{NODE_CPU_TARGET_MS:.3f}"
        return ["node", str(ROOT / "bench" / "node" / "server.js")], env, tmp
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


RELOAD_NOTES = {
    "appliance": "kill -HUP master (appliance's rolling reload)",
    "appliance-kernel": "kill -HUP master (appliance's rolling reload)",
    "uvicorn": "kill -HUP master (uvicorn restarts its workers)",
    "gunicorn-uvicorn": "kill -HUP arbiter (gunicorn graceful reload)",
    "gunicorn-sync": "kill -HUP arbiter (gunicorn graceful reload)",
    "node": "kill -HUP primary (bench rolling restart)",
}


def start(name: str, port: int, workers: int, app: str, *, log: Path | None = None,
          ready_timeout_s: float = 20.0) -> tuple[Running, float]:
    """Start a peer and wait until every worker answers; return it and the seconds from
    spawn to its first 200 response."""
    argv, extra, tmp = command(name, port, workers, app)
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    notify = None
    if name.startswith("appliance") and tmp:
        # Our own NOTIFY_SOCKET, so the bench sees when the master says READY=1.
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        path = os.path.join(tmp[0], "notify")
        notify.bind(path)
        notify.setblocking(False)
        env["NOTIFY_SOCKET"] = path
    out = open(log, "ab") if log else subprocess.DEVNULL
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    run = Running(name, proc, port, workers, app, RELOAD_NOTES[name], tmp, notify=notify,
                  t0=t0)
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
