"""Small helpers shared by the system tests that drive a unit in a box: curl the hello app,
read a unit's state, the journal, and run tests/system/load.py (a steady client loop) inside."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from box import Box, BoxError

HERE = Path(__file__).resolve().parent


def curl(box: Box, port: int = 8000, path: str = "/", timeout: float = 20) -> tuple[int, str]:
    r = box.run(["curl", "-sS", "-m", str(int(timeout)), "-o", "/dev/stdout", "-w", "\n%{http_code}",
                 f"http://127.0.0.1:{port}{path}"], check=False, timeout=timeout + 10)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), (body if r.returncode == 0 else r.stderr)


def diag(box: Box, unit: str = "appliance") -> str:
    try:
        return box.run(f"systemctl status --no-pager -l {unit}.socket {unit}.service; "
                       f"journalctl --no-pager -n 60 -u {unit} -u {unit}.socket", check=False).stdout
    except BoxError as e:
        return f"(no diagnostics: {e})"


def hello(box: Box, port: int = 8000, unit: str = "appliance") -> dict:
    code, body = curl(box, port)
    assert code == 200, f"GET / -> {code}: {body}\n{diag(box, unit)}"
    return json.loads(body)


def service(box: Box, unit: str = "appliance") -> dict[str, str]:
    return box.show(f"{unit}.service", "ActiveState", "SubState", "StatusText", "MainPID",
                    "NRestarts", "Result")


def journal(box: Box, unit: str = "appliance", *args: str) -> list[dict]:
    r = box.run(["journalctl", "--no-pager", "-o", "json", "-u", unit, *args])
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


class Load:
    """A running tests/system/load.py inside the box; see :func:`load`."""

    def __init__(self, box: Box, out: str) -> None:
        self.box, self.out = box, out

    def progress(self) -> dict:
        r = self.box.run(["cat", self.out], check=False)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout else {}

    def advance(self, what: str, n: int = 50) -> dict:
        start = self.progress().get("ok", 0)
        return self.box.wait_until(
            f"{n} more answered requests ({what})",
            lambda: (lambda p: p if p.get("ok", 0) >= start + n else None)(self.progress()),
            timeout=60)


@contextmanager
def load(box: Box, port: int = 8000, threads: int = 4, name: str = "load") -> Iterator[Load]:
    """Clients sending GET / in a loop (one connection per request) until the block ends; every
    refused, reset, timed-out or non-200 request counts as failed. The final counts are in
    ``progress()`` after the block."""
    stop, out = f"/root/{name}.stop", f"/root/{name}.json"
    box.put(HERE / "load.py", "/root/load.py")
    box.run(["rm", "-f", stop, out])
    proc = box.popen(["python3", "-I", "/root/load.py", "127.0.0.1", str(port), str(threads), stop, out])
    handle = Load(box, out)
    try:
        handle.advance("warm-up")
        yield handle
    finally:
        box.run(["touch", stop], check=False)
        try:
            proc.wait(timeout=60)
        except Exception:
            proc.kill()
            proc.wait()
