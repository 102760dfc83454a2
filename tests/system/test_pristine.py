"""Install the .deb into a pristine minimal Debian 12 root (`mmdebstrap --variant=apt bookworm`:
no Python at all), with apt and the network, then run `appliance check` and a short
`appliance serve` there and curl it.

The namespace box is an overlay of the build machine and would hide a package that only works
there (a venv pointing at a pyenv Python, a missing dependency, a pip.conf source): this root
has nothing of the build machine.

The root is built once and cached as a tarball in $APPLIANCE_TEST_CACHE (default
/var/cache/appliance-tests); APPLIANCE_TEST_REFRESH=1 rebuilds it. Each test run extracts it
into a temporary directory and works there inside private mount (and, for serving, pid and
network) namespaces, so nothing is mounted on the host and nothing listens on the host.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system]

SUITE = "bookworm"
SOURCES = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]


def cache_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/cache/appliance-tests"))


@pytest.fixture(scope="session")
def bookworm_tarball(box_support, skip_or_fail) -> Path:
    if shutil.which("mmdebstrap") is None:
        skip_or_fail("mmdebstrap is not installed (apt-get install mmdebstrap)")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{SUITE}-apt.tar"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # one build at a time, others reuse it
        if tarball.exists() and os.environ.get("APPLIANCE_TEST_REFRESH") != "1":
            return tarball
        tmp = cache / f".{SUITE}-apt.partial.tar"   # the .tar suffix tells mmdebstrap the format
        r = subprocess.run(["mmdebstrap", "--quiet", "--variant=apt", SUITE, str(tmp), *SOURCES],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            pytest.fail(f"mmdebstrap failed:\n{r.stderr[-4000:]}", pytrace=False)
        tmp.replace(tarball)
    return tarball


@pytest.fixture
def pristine_root(bookworm_tarball: Path, tmp_path_factory):
    root = Path("/tmp") / f"appliance-pristine-{os.getpid()}-{time.monotonic_ns()}"
    root.mkdir()
    try:
        subprocess.run(["tar", "-C", str(root), "-xf", str(bookworm_tarball)], check=True, timeout=300)
        yield root
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(root)], check=False)


def in_namespaces(root: Path, script: str, *, net: bool, timeout: float) -> subprocess.CompletedProcess:
    """Run `script` (sh) chrooted into root, in private mount + pid (+ net) namespaces.
    --kill-child: if unshare is killed (timeout), every process in the namespace dies too."""
    setup = (
        "set -e\n"
        f"R={root}\n"
        "mount -t proc proc $R/proc\n"
        "mount --rbind /dev $R/dev\n"
        "mount --rbind /sys $R/sys\n"
        "mount -t tmpfs tmpfs $R/run\n"
        "mount -t tmpfs tmpfs $R/tmp\n"
        "cp /etc/resolv.conf $R/etc/resolv.conf 2>/dev/null || true\n"
        + ("ip link set lo up\n" if net else "")
        + 'exec chroot $R /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 '
          'DEBIAN_FRONTEND=noninteractive /bin/sh -ec "$0"\n'
    )
    argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]
    if net:
        argv.append("--net")
    argv += ["--", "sh", "-c", setup, script]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()                      # our own child, by pid; --kill-child takes the rest
        out, _ = p.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{out[-4000:]}", pytrace=False)
    return subprocess.CompletedProcess(argv, p.returncode, out, "")


@pytest.mark.timeout(900)   # a cold run builds the root (mmdebstrap) and downloads from Debian
def test_pristine_bookworm_install_check_serve(pristine_root: Path, appliance_deb: Path) -> None:
    root = pristine_root
    assert not (root / "usr/bin/python3").exists(), "the pristine root must start without Python"
    shutil.copy(appliance_deb, root / "root" / appliance_deb.name)

    # 1. apt with the network: the .deb alone must pull everything it needs from Debian
    r = in_namespaces(root, f"""
        apt-get update -qq
        apt-get install -y --no-install-recommends /root/{appliance_deb.name}
        dpkg-query -W -f='${{Status}}\\n' appliance python3.11
        apt-get install -y -qq --no-install-recommends curl >/dev/null
    """, net=False, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:]
    assert "python3.11" in r.stdout and "Setting up appliance" in r.stdout, r.stdout[-4000:]

    # 2. no network from here on: check, serve, curl, stop
    r = in_namespaces(root, """
        appliance check
        echo "check rc=$?"
        appliance serve >/tmp/serve.log 2>&1 &
        pid=$!
        deadline=$(( $(date +%s) + 60 ))
        until curl -fsS -m 5 -o /tmp/hello.json http://127.0.0.1:8000/; do
            if ! kill -0 $pid 2>/dev/null; then echo "serve exited"; cat /tmp/serve.log; exit 1; fi
            if [ "$(date +%s)" -ge "$deadline" ]; then echo "no answer within 60s"; cat /tmp/serve.log; exit 1; fi
            sleep 0.1   # poll interval of a deadline-bounded wait, not a synchronisation
        done
        echo "hello: $(cat /tmp/hello.json)"
        curl -fsS -m 5 -o /dev/null -w 'healthz %{http_code}\\n' http://127.0.0.1:8000/healthz
        kill -TERM $pid
        wait $pid && rc=0 || rc=$?
        echo "serve exit rc=$rc"
    """, net=True, timeout=180)
    assert r.returncode == 0, r.stdout[-6000:]
    assert "check rc=0" in r.stdout
    assert '"generation"' in r.stdout and "healthz 200" in r.stdout, r.stdout
    assert "serve exit rc=0" in r.stdout, r.stdout
