"""A real systemd (PID 1) booted in Linux namespaces over an overlay of the host root.

Used by the system tests as a throw-away machine: install the .deb with apt, drive the units
with systemctl, read the journal, without touching the host. Not a security boundary: the
payload runs as real root (no user namespace); it prevents accidents, not attacks.

How (all state lives in the box directory, under /tmp so the box's own tmpfs /tmp hides it):

* a cgroup2 subtree of its own, ``<cgroup2 root>/appliance-box-<hash>/{monitor,payload,exec}``;
* ``unshare --pid --fork --kill-child --mount --net --uts --ipc --cgroup`` started from inside
  ``payload/``, so that cgroup is the root of the box's cgroup namespace and the box's systemd
  manages only it (pure unified mode); ``--kill-child`` takes the box down when unshare dies;
* ``box_stage2.sh`` (PID 1 of the new pid namespace) builds the overlay root and execs systemd
  with a boot target that starts nothing but sysinit and sockets;
* commands run through ``nsenter -t <pid 1> -a -r -w`` with a clean environment, from the
  ``exec/`` cgroup so that ``down`` finds every one of them;
* ``down``: kill what ``exec`` started (inner halves first), SIGRTMIN+4 (= poweroff) to the
  box's PID 1 and wait with a deadline, SIGKILL it if it hangs (the kernel then kills the whole
  pid namespace), SIGKILL whatever is still in our cgroup subtree (by pid, re-checking each
  pid's cgroup), remove the cgroups and the directory.

Processes are only ever killed by pid after checking they live in this box's cgroup subtree.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGE2 = HERE / "box_stage2.sh"
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BoxError(RuntimeError):
    pass


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout

    def __str__(self) -> str:
        return (
            f"$ {shlex.join(self.args)}\n[rc={self.returncode}]\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def cgroup2_root() -> Path:
    """The host's cgroup2 mount (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    raise BoxError("no cgroup2 hierarchy is mounted on the host")


def now() -> float:
    return time.monotonic()


class Box:
    def __init__(self, directory: str | os.PathLike[str], lower: str | None = None,
                 mask: str = "", boot_timeout: float = 60.0, down_timeout: float = 20.0):
        self.dir = Path(directory).resolve()
        if any(c in str(self.dir) for c in ",: \t\n"):
            raise BoxError(f"box dir must not contain ',', ':' or whitespace: {self.dir}")
        self.lower = lower
        self.mask = mask
        self.boot_timeout = boot_timeout
        self.down_timeout = down_timeout
        self.name = "appliance-box-" + hashlib.sha1(str(self.dir).encode()).hexdigest()[:12]
        self.cg = cgroup2_root() / self.name
        self.pid: int | None = None          # host pid of the box's systemd
        self.pidns: str | None = None
        self.unshare_pid: int | None = None
        self._launcher: subprocess.Popen[bytes] | None = None
        self._console = None

    # ------------------------------------------------------------------ helpers
    def _cg_of(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                for line in f:
                    if line.startswith("0::"):
                        return line[3:].strip()
        except OSError:
            return None
        return None

    def _ours(self, pid: int) -> bool:
        c = self._cg_of(pid)
        return c is not None and (c == "/" + self.name or c.startswith("/" + self.name + "/"))

    def _pids(self, sub: str = "") -> list[int]:
        root = self.cg / sub if sub else self.cg
        pids: set[int] = set()
        if not root.is_dir():
            return []
        for procs in root.rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split())
            except OSError:
                pass
        return sorted(pids)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            return state != "Z"
        except (OSError, IndexError):
            return False

    def _wait_gone(self, pids: list[int], timeout: float) -> bool:
        deadline = now() + timeout
        while True:
            if not any(self._alive(p) for p in pids):
                return True
            if now() > deadline:
                return False
            time.sleep(0.05)

    def live(self) -> bool:
        if self.pid is None:
            return False
        try:
            ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        except OSError:
            return False
        return ns == self.pidns and self._ours(self.pid) and self._alive(self.pid)

    def console_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.dir / "console.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no console.log)"

    # ------------------------------------------------------------------ up
    def up(self) -> "Box":
        if self.dir.exists() and any(self.dir.iterdir()):
            raise BoxError(f"{self.dir} exists and is not empty")
        if self.cg.exists():
            self._sweep_cgroup()
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("monitor", "payload", "exec"):
            (self.cg / sub).mkdir(parents=True, exist_ok=True)
        t0 = now()
        self._console = open(self.dir / "console.log", "ab")
        env = {
            "PATH": INNER_PATH,
            "BOX_LOWER": self.lower or "",
            "BOX_MASK": self.mask,
        }
        # The launcher puts itself into payload/ before unshare, so that cgroup becomes the
        # root of the box's cgroup namespace; then unshare moves to monitor/ (below).
        launcher = (
            f"echo $$ > {shlex.quote(str(self.cg / 'payload' / 'cgroup.procs'))} && "
            "exec unshare --pid --fork --kill-child --mount --propagation private "
            f"--net --uts --ipc --cgroup -- bash {shlex.quote(str(STAGE2))} {shlex.quote(str(self.dir))}"
        )
        self._launcher = subprocess.Popen(
            ["sh", "-c", launcher], stdin=subprocess.DEVNULL, stdout=self._console,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        self.unshare_pid = self._launcher.pid
        deadline = t0 + self.boot_timeout
        try:
            child = None
            while child is None:
                if self._launcher.poll() is not None:
                    raise BoxError("the box exited during boot")
                try:
                    kids = Path(f"/proc/{self.unshare_pid}/task/{self.unshare_pid}/children").read_text().split()
                except OSError:
                    kids = []
                if kids and os.readlink(f"/proc/{kids[0]}/ns/pid") != os.readlink("/proc/self/ns/pid"):
                    child = int(kids[0])
                    break
                if now() > deadline:
                    raise BoxError("unshare did not start its child")
                time.sleep(0.02)
            self.pid = child
            self.pidns = os.readlink(f"/proc/{child}/ns/pid")
            (self.dir / "pid").write_text(f"{child}\n")
            try:
                (self.cg / "monitor" / "cgroup.procs").write_text(str(self.unshare_pid))
            except OSError:
                pass
            state = ""
            while True:
                if self._launcher.poll() is not None:
                    raise BoxError("the box exited during boot")
                comm = ""
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    pass
                if comm == "systemd":
                    r = self.run(["systemctl", "is-system-running"], timeout=10, check=False)
                    state = r.stdout.strip()
                    if state in ("running", "degraded"):
                        break
                if now() > deadline:
                    raise BoxError(f"boot timeout after {self.boot_timeout}s (state: {state or 'unknown'})")
                time.sleep(0.1)
        except BaseException as e:
            tail = self.console_tail()
            self.down()
            if isinstance(e, BoxError):
                raise BoxError(f"{e}\n--- console.log\n{tail}") from None
            raise
        self.boot_seconds = now() - t0
        return self

    # ------------------------------------------------------------------ exec
    def _nsenter_argv(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        if not self.live():
            raise BoxError(f"box {self.dir} is not running")
        inner_env = {
            "PATH": INNER_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
            "SHELL": "/bin/bash", "TERM": "dumb", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "cat",
            "SYSTEMD_COLORS": "0", "DEBIAN_FRONTEND": "noninteractive",
        }
        inner_env.update(env or {})
        procs = shlex.quote(str(self.cg / "exec" / "cgroup.procs"))
        # the wrapper shell joins exec/ first, so down() finds everything started here
        return [
            "sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh",
            "nsenter", "-t", str(self.pid), "-a", "-r", "-w",
            "env", "-i", *[f"{k}={v}" for k, v in inner_env.items()], *argv,
        ]

    def run(self, argv: list[str] | str, *, input: str | bytes | None = None,
            timeout: float = 120, check: bool = True, env: dict[str, str] | None = None) -> Result:
        """Run a command inside the box and wait for it (with a deadline)."""
        if isinstance(argv, str):
            argv = ["bash", "-c", argv]
        full = self._nsenter_argv(argv, env)
        text = not isinstance(input, bytes)
        proc = subprocess.Popen(full, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_exec_tree()
            out, err = proc.communicate()
            raise BoxError(f"timeout after {timeout}s: {shlex.join(argv)}\n{out}\n{err}") from None
        if not text:
            out, err = out.decode(errors="replace"), err.decode(errors="replace")
        res = Result(list(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise BoxError(f"command failed in the box:\n{res}")
        return res

    def sh(self, script: str, **kw) -> Result:
        return self.run(["bash", "-c", script], **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a command inside the box without waiting (stopped by down() at the latest)."""
        return subprocess.Popen(self._nsenter_argv(argv), **kw)

    def put(self, src: str | os.PathLike[str], dest: str) -> None:
        """Copy a host file into the box (streamed through tar; the overlay is not touched)."""
        src = Path(src)
        destp = Path(dest)
        tar = subprocess.Popen(["tar", "-C", str(src.parent), "-cf", "-", src.name],
                               stdout=subprocess.PIPE)
        try:
            self.run(["mkdir", "-p", str(destp.parent)])
            self.run(["bash", "-c", f"cd {shlex.quote(str(destp.parent))} && tar -xf - && "
                      f"{{ [ {shlex.quote(src.name)} = {shlex.quote(destp.name)} ] || "
                      f"mv -f {shlex.quote(src.name)} {shlex.quote(destp.name)}; }}"],
                     input=tar.stdout.read(), timeout=120)
        finally:
            tar.wait()

    def write(self, path: str, content: str, mode: str = "0644") -> None:
        self.run(["bash", "-c", f"mkdir -p \"$(dirname {shlex.quote(path)})\" && cat > {shlex.quote(path)} "
                  f"&& chmod {mode} {shlex.quote(path)}"], input=content)

    def wait_until(self, what: str, predicate, timeout: float = 30.0, interval: float = 0.1):
        """Poll predicate() until it returns a truthy value; raise with `what` at the deadline."""
        deadline = now() + timeout
        last = None
        while True:
            try:
                last = predicate()
            except BoxError as e:
                last = e
            else:
                if last:
                    return last
            if now() > deadline:
                raise BoxError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
            time.sleep(interval)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.run(["systemctl", "show", unit, *[f"--property={p}" for p in props]])
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            k, _, v = line.partition("=")
            out[k] = v
        return out

    # ------------------------------------------------------------------ down
    def _kill_exec_tree(self) -> None:
        """End processes started through exec: inner halves (box pid ns) first, then let the
        nsenter parents reap them; an nsenter stopped by job control would otherwise keep a
        zombie that blocks the box's shutdown."""
        inner, outer = [], []
        for p in self._pids("exec"):
            if not self._ours(p):
                continue
            try:
                ns = os.readlink(f"/proc/{p}/ns/pid")
            except OSError:
                continue
            (inner if ns == self.pidns else outer).append(p)
        for p in inner:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in outer:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        deadline = now() + 2
        while self._pids("exec") and now() < deadline:
            time.sleep(0.05)
        for p in self._pids("exec"):
            if self._ours(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _sweep_cgroup(self) -> None:
        for _ in range(100):
            pids = [p for p in self._pids() if self._ours(p)]
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for _ in range(50):
            if not self.cg.exists():
                break
            for d in sorted((p for p in self.cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                self.cg.rmdir()
            except OSError:
                time.sleep(0.05)

    def down(self) -> None:
        """Power off and remove everything; safe to call more than once, also after a failed up."""
        self._kill_exec_tree()
        if self.live():
            assert self.pid is not None
            os.kill(self.pid, signal.SIGRTMIN + 4)   # systemd: start poweroff.target
            if not self._wait_gone([self.pid], self.down_timeout):
                os.kill(self.pid, signal.SIGKILL)   # pid-namespace init: takes all with it
                self._kill_exec_tree()
                self._wait_gone([self.pid], 10)
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                if self._ours(self._launcher.pid):
                    self._launcher.kill()
                self._launcher.wait(timeout=5)
        self._sweep_cgroup()
        if self._console is not None:
            self._console.close()
            self._console = None
        self.pid = None
        if self.dir.exists():
            # nothing is mounted on the host side; --one-file-system as a guard anyway
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(self.dir)], check=False)


def probe() -> str | None:
    """Why a box cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "system tests need root (they boot systemd in namespaces and install a .deb)"
    for tool in ("unshare", "nsenter", "setpriv", "systemd-id128", "ip", "tar"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "/lib/systemd/systemd is not installed"
    try:
        root = cgroup2_root()
    except BoxError as e:
        return str(e)
    test_cg = root / f"appliance-box-probe-{os.getpid()}"
    try:
        test_cg.mkdir()
        test_cg.rmdir()
    except OSError as e:
        return f"cannot create a cgroup under {root}: {e}"
    # overlay with the host root as lower layer, inside a private mount namespace
    tmp = Path(f"/tmp/appliance-box-probe-{os.getpid()}")
    try:
        for d in ("u", "w", "m"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--", "sh", "-c",
             f"mount -t overlay probe -o lowerdir=/,upperdir={tmp}/u,workdir={tmp}/w {tmp}/m "
             f"&& test -x {tmp}/m/lib/systemd/systemd"],
            capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"unshare/overlayfs over / is not available: {(r.stderr or r.stdout).strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare is not usable: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None
