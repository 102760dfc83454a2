"""Record one worker with py-spy and summarise where its time goes.

py-spy (``py-spy record --format raw --function --native``) samples the worker's stacks,
Python and C frames interleaved (uvloop's Cython, libuv, llhttp, the interpreter, libc), and
writes them collapsed: one line per distinct stack, ``frame;frame;...;leaf COUNT``, the root
first. In the default (blocking) mode it stops the process for each sample, so a stack is
never torn. Samples are wall-clock: a worker that waits for a CPU (the load generator shares
the two cores) is charged where it was preempted, often at a syscall's return, so the
harness also records the worker's on-CPU and run-queue time over the recording
(/proc/PID/schedstat) to read the syscall rows against.

With ``--native`` py-spy keeps samples of a thread waiting in ``epoll_wait`` and of threads
other than the main one (uvicorn's supervisor pong thread blocked in ``read``), so
:func:`summarise` takes only the main thread's stacks (those under ``<module>``), counts the
ones whose innermost frame is an event wait (:data:`IDLE_FUNCS`) as idle, and computes every
share below over the remaining *busy* samples:

* **own, innermost**: samples whose innermost frame is the function (C functions included:
  a sample inside ``write()`` counts to ``write``);
* **own, Python**: samples attributed to the innermost *Python* frame, with the C code it
  called (the interpreter, uvloop, llhttp, syscalls) counted to it: which of our Python
  functions (or uvicorn's, or the app's) a request's time is spent under;
* **total**: samples in which the (Python) function is anywhere on the stack (once per
  sample, so recursion does not count twice). Frames present in nearly every sample (the
  process entry, the event loop's ``run_forever``) are the *trunk*: listed once, left out of
  the table, and C work with no Python frame above it but the trunk's (libuv polling, a
  ``write()`` uvloop makes on its own) is the event loop's in the "own, Python" table;
* **user-space** variants of "own, Python" and "components": the same over the busy samples
  whose innermost frame is not a system call (:data:`SYSCALLS`), so the wall-clock bias at
  syscall returns drops out; perf's kernel share says what the system calls cost on a CPU;
* **components**: own time by the code it belongs to (appliance's modules one by one, uvicorn,
  httptools/llhttp, uvloop/libuv, asyncio, the app, each libc call), where interpreter-internal
  C frames (refcounting, dict and unicode work) count to the nearest frame that is not the
  interpreter's, i.e. to the code that made the interpreter do it.

Beside it, :func:`perf_record`/:func:`perf_report` give the on-CPU split by shared object and
symbol (kernel, interpreter, uvloop, llhttp), which wall-clock samples cannot.

Stdlib only; py-spy is a separate binary (PyPI ``py-spy``, in the bench venv), perf the Debian
one (/usr/bin/perf).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Frame", "parse_raw", "perf_record", "perf_report", "record", "summarise"]

#: Frames on at least this share of samples are the trunk (entry point, event loop).
TRUNK_SHARE = 0.97
#: libc functions that are (nearly) only a system call: a sample there is in the kernel, or
#: waiting for a CPU at the call's return (see the module docstring).
SYSCALLS = frozenset({"write", "writev", "read", "readv", "send", "sendto", "sendmsg", "recv",
                      "recvfrom", "recvmsg", "accept", "accept4", "close", "shutdown",
                      "epoll_ctl", "getpid", "fcntl", "ioctl", "setsockopt", "getsockopt",
                      "getpeername", "getsockname", "__libc_write", "__GI___libc_write",
                      "__libc_read", "__GI___libc_read"})
#: Innermost frames of a thread that waits for events: the event loop with nothing to do.
IDLE_FUNCS = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
                        "select", "pselect", "pselect64", "__select"})

_LABEL = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*?)(?::(?P<line>\d+))?\)$")
_HTTPTOOLS_C = {"parser.c", "llhttp.c", "api.c", "http.c", "url_parser.c"}


@dataclass(frozen=True, slots=True)
class Frame:
    """One stack frame of py-spy's output: ``func (file:line)``, ``func (libfoo.so)`` or
    ``0xADDR (libfoo.so)``."""

    func: str
    where: str

    @property
    def python(self) -> bool:
        w = self.where
        return w.endswith((".py", ".pyw")) or (
            "/" not in w and "." not in w and w not in ("?", ""))  # a console script

    @property
    def label(self) -> str:
        return f"{self.func} ({self.where})"


#: Where "own, Python" puts samples that have no Python frame above them but the trunk's.
_LOOP = Frame("(event loop: C code under no Python frame but the trunk's)", "uvloop/libuv")


def _frame(label: str) -> Frame:
    m = _LABEL.match(label.strip())
    if not m:
        return Frame(label.strip(), "?")
    return Frame(m.group("func"), m.group("where"))


def parse_raw(text: str) -> list[tuple[tuple[Frame, ...], int]]:
    """py-spy's collapsed stacks: [(frames root first, samples)]. Malformed lines are
    skipped (the file is ours, but a truncated last line must not stop the summary)."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(_frame(f) for f in stack.split(";") if f.strip())
        if frames:
            out.append((frames, int(count)))
    return out


def component(f: Frame) -> str | None:
    """The code a frame belongs to; None for the interpreter's own C code."""
    w, func = f.where, f.func
    base = w.rsplit("/", 1)[-1]
    if f.python:
        if w.startswith("bench/apps/"):
            return "app (bench/apps)"
        if w.startswith("appliance/"):
            return f"appliance {w.removeprefix('appliance/')}"
        if w.startswith("uvicorn/"):
            return f"uvicorn {base}"
        if w.startswith(("gunicorn/", "uvicorn_worker/")):
            return "gunicorn"
        if w.startswith("asyncio/"):
            return "asyncio (Python)"
        if "/" not in w and "." not in w:
            return "process entry"
        return f"stdlib/other {w.split('/', 1)[0]}"
    if "libc.so" in w or w.startswith("libpthread"):
        return f"libc {func if not func.startswith('0x') else '?'}()"
    if w == "[vdso]":
        return "vdso (clock reads)"
    if base == "loop.c" or "uvloop/" in w or func.startswith(("uv_", "uv__")):
        return "uvloop/libuv"
    if base in _HTTPTOOLS_C or "httptools/" in w or func.startswith("llhttp"):
        return "httptools/llhttp"
    if base.startswith("_asynciomodule"):
        return "asyncio (C)"
    return None


def _in_syscall(f: Frame) -> bool:
    return (not f.python and ("libc.so" in f.where or f.where == "[vdso]")
            and f.func in SYSCALLS)


def _attributed(frames: tuple[Frame, ...]) -> str:
    for f in reversed(frames):
        c = component(f)
        if c is not None:
            return c
    return "interpreter"


def _main_thread(frames: tuple[Frame, ...]) -> bool:
    return any(f.python and f.func == "<module>" for f in frames)


def summarise(stacks: list[tuple[tuple[Frame, ...], int]], *, rate_hz: float,
              seconds: float, top: int = 15) -> dict[str, Any]:
    """The tables described in the module docstring, as shares of the main thread's busy
    samples; the idle (event-loop wait) and other threads' samples are counted beside."""
    everything = sum(n for _, n in stacks)
    main = [(fr, n) for fr, n in stacks if _main_thread(fr)] or stacks
    main_ids = {id(fr) for fr, _ in main}
    others = [(fr, n) for fr, n in stacks if id(fr) not in main_ids]
    idle = [(fr, n) for fr, n in main if fr[-1].func in IDLE_FUNCS]
    busy = [(fr, n) for fr, n in main if fr[-1].func not in IDLE_FUNCS]
    total = sum(n for _, n in busy)
    incl: Counter[Frame] = Counter()
    for frames, n in busy:
        for f in set(frames):
            incl[f] += n
    trunk = [f for f, c in incl.most_common() if total and c / total >= TRUNK_SHARE]
    trunk_set = set(trunk)
    own_leaf: Counter[Frame] = Counter()
    own_py: Counter[Frame] = Counter()
    own_py_user: Counter[Frame] = Counter()
    comps: Counter[str] = Counter()
    comps_user: Counter[str] = Counter()
    for frames, n in busy:
        own_leaf[frames[-1]] += n
        py = next((f for f in reversed(frames) if f.python), None)
        # C work with no Python frame above it but the trunk's (libuv polling, a write()
        # uvloop makes on its own) belongs to the event loop, not to asyncio.Runner.run.
        key = _LOOP if py is None or py in trunk_set else py
        own_py[key] += n
        comp = _attributed(frames)
        comps[comp] += n
        if not _in_syscall(frames[-1]):
            own_py_user[key] += n
            comps_user[comp] += n
    user_total = sum(comps_user.values())

    def share(x: int) -> float:
        return x / total if total else 0.0

    def ushare(x: int) -> float:
        return x / user_total if user_total else 0.0

    def rows(counter: Counter[Frame], skip: set[Frame] | None = None,
             of: Callable[[int], float] = share) -> list[dict[str, Any]]:
        """Top entries of counter; ``share`` is of ``of``'s denominator (busy samples, or for
        the user-space table the busy samples not inside a system call)."""
        out = []
        for f, n in counter.most_common():
            if skip and f in skip:
                continue
            out.append({"func": f.func, "where": f.where, "python": f.python or f == _LOOP,
                        "samples": n, "share": round(of(n), 4),
                        "own_share": round(share(own_leaf.get(f, 0)), 4),
                        "own_python_share": round(share(own_py.get(f, 0)), 4),
                        "own_python_user_share": round(ushare(own_py_user.get(f, 0)), 4),
                        "total_share": round(share(incl.get(f, 0)), 4)})
            if len(out) >= top:
                break
        return out

    other_py: Counter[str] = Counter()
    for frames, n in others:
        py = next((f for f in reversed(frames) if f.python), None)
        other_py[py.label if py else frames[-1].label] += n
    expected = rate_hz * seconds
    idle_n = sum(n for _, n in idle)
    return {
        "samples_all_threads": everything, "samples": total, "idle_samples": idle_n,
        "other_thread_samples": sum(n for _, n in others),
        "other_threads_top": [{"frame": k, "samples": v} for k, v in other_py.most_common(3)],
        "expected_samples": round(expected),
        "busy_share": round(total / expected, 3) if expected else None,
        "idle_share": round(idle_n / expected, 3) if expected else None,
        "user_samples": user_total,
        "own_innermost": rows(own_leaf), "own_python": rows(own_py),
        "own_python_user": rows(own_py_user, of=ushare),
        "total": rows(Counter({f: n for f, n in incl.items() if f.python}), trunk_set),
        "trunk": [f.label for f in trunk],
        "components": [{"component": c, "samples": n, "share": round(share(n), 4)}
                       for c, n in comps.most_common()],
        "components_user": [{"component": c, "samples": n, "share": round(ushare(n), 4)}
                            for c, n in comps_user.most_common()],
    }


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, out: Path, rate_hz: int = 200) -> tuple[bool, str]:
    """Run ``py-spy record`` on pid for ``seconds`` into ``out``; (ok, py-spy's last words).

    Needs ptrace rights on pid (root, or the same user with kernel.yama.ptrace_scope 0)."""
    exe = py_spy()
    if exe is None:
        return False, "py-spy not installed (bench/requirements.txt)"
    argv = [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
            str(rate_hz), "--format", "raw", "--function", "--native", "--output", str(out)]
    try:
        p = subprocess.run(argv, check=False, capture_output=True, text=True,
                           timeout=seconds + 30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, repr(e)
    said = " ".join((p.stderr + p.stdout).split())[-400:]
    return p.returncode == 0 and out.exists() and out.stat().st_size > 0, said


# -- perf: on-CPU time, C and kernel frames only ---------------------------------------------
#
# py-spy's samples are wall-clock; perf's ``cpu-clock`` samples fire only while the worker is on
# a CPU, so they split its CPU time exactly (the kernel's share is the TCP/loopback work of
# read/write/epoll; libpython's is the interpreter running Python code). Python 3.11 has no
# perf trampoline (3.12's ``-X perf``), so perf sees no Python function names: the two views
# complement each other.

_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)(?:\s+\[(.)\]\s+(.*?))?\s*$")


def perf() -> str | None:
    for p in ("/usr/bin/perf", shutil.which("perf")):
        if p and Path(p).exists():
            return p
    return None


def perf_record(pid: int, seconds: int, data: Path, freq_hz: int = 499) -> tuple[bool, str]:
    """``perf record -e cpu-clock`` on pid for ``seconds`` (root, or perf_event_paranoid <= 1
    for the kernel's share)."""
    exe = perf()
    if exe is None:
        return False, "perf not installed (Debian package linux-perf)"
    argv = [exe, "record", "-e", "cpu-clock", "-F", str(freq_hz), "-p", str(pid), "-o",
            str(data), "--", "sleep", str(seconds)]
    try:
        p = subprocess.run(argv, check=False, capture_output=True, text=True,
                           timeout=seconds + 30)
    except (OSError, subprocess.SubprocessError) as e:
        return False, repr(e)
    said = " ".join((p.stderr + p.stdout).split())[-300:]
    return p.returncode == 0 and data.exists(), said


def perf_report(data: Path, top: int = 15) -> dict[str, Any]:
    """On-CPU shares by shared object (the kernel, libpython, uvloop's loop.so, ...) and the
    top symbols by self time, from ``perf report --stdio``."""
    exe = perf()
    out: dict[str, Any] = {"samples": None, "dso": [], "symbols": [], "text": ""}
    if exe is None:
        return out
    texts = []
    for sort in ("dso", "dso,sym"):
        try:
            p = subprocess.run([exe, "report", "-i", str(data), "--stdio", "--no-children",
                                "--sort", sort, "--percent-limit", "0.3"],
                               check=False, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            continue
        texts.append(p.stdout)
        for line in p.stdout.splitlines():
            m = re.match(r"^# Samples: (\d+)", line)
            if m:
                out["samples"] = int(m.group(1))
            if line.startswith("#") or not line.strip():
                continue
            m = _PERF_LINE.match(line)
            if not m:
                continue
            share = float(m.group(1)) / 100
            if sort == "dso":
                out["dso"].append({"dso": m.group(2), "share": round(share, 4)})
            elif len(out["symbols"]) < top and m.group(4):
                out["symbols"].append({"dso": m.group(2), "kernel": m.group(3) == "k",
                                       "symbol": m.group(4), "share": round(share, 4)})
    out["text"] = "\n".join(texts)
    return out
