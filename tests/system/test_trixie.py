"""The Debian 13 package (`scripts/build-deb --release trixie`, built in a trixie build root on a
bookworm machine) in a booted pristine trixie: a real trixie systemd (257) as PID 1 in a box
whose root is `mmdebstrap --variant=apt --include=systemd,...  trixie` and nothing of the build
machine (SDBOX_LOWER-style lower layer, see box.py). The basic scenario: install with apt,
socket enabled and listening, the first request gets 200 from a worker, the journal has the
structured fields, `systemctl reload appliance` succeeds and the new generation serves.

The root is built once and cached as a tarball in $APPLIANCE_TEST_CACHE (default
/var/cache/appliance-tests, named by a hash of its package list); APPLIANCE_TEST_REFRESH=1
rebuilds it. Each run extracts it into a temporary directory, lets apt download the package's
dependencies there (chroot with the host's network, private mount and pid namespaces), then
boots the box on it: the box has no network, apt inside installs from that download.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from box import Box
from helpers import diag, hello, journal, service
from test_pristine import cache_dir, in_namespaces

pytestmark = [pytest.mark.system]

SUITE = "trixie"
INCLUDE = "systemd,systemd-sysv,dbus,curl,procps,iproute2"
SOURCES = [
    "deb http://deb.debian.org/debian trixie main",
    "deb http://deb.debian.org/debian trixie-updates main",
    "deb http://deb.debian.org/debian-security trixie-security main",
]


@pytest.fixture(scope="session")
def trixie_tarball(box_support, skip_or_fail) -> Path:
    if shutil.which("mmdebstrap") is None:
        skip_or_fail("mmdebstrap is not installed (apt-get install mmdebstrap)")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256("\n".join([SUITE, "apt", INCLUDE, *SOURCES]).encode()).hexdigest()[:12]
    tarball = cache / f"{SUITE}-systemd-{key}.tar"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # one build at a time, others reuse it
        if tarball.exists() and os.environ.get("APPLIANCE_TEST_REFRESH") != "1":
            return tarball
        tmp = cache / f".{SUITE}-systemd-{key}.partial.tar"   # .tar: mmdebstrap's format
        r = subprocess.run(["mmdebstrap", "--quiet", "--variant=apt", f"--include={INCLUDE}", SUITE,
                            str(tmp), *SOURCES],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            pytest.fail(f"mmdebstrap failed:\n{r.stderr[-4000:]}", pytrace=False)
        tmp.replace(tarball)
    return tarball


@pytest.fixture
def trixie_root(trixie_tarball: Path, appliance_deb_trixie: Path):
    """An extracted pristine trixie with the .deb in /root and its dependencies downloaded
    (apt lists and /var/cache/apt/archives), to be the lower layer of a box."""
    # no ',', ':' or whitespace: it becomes an overlay lowerdir
    root = Path("/tmp") / f"appliance-trixie-{os.getpid()}-{time.monotonic_ns()}"
    root.mkdir()
    try:
        subprocess.run(["tar", "-C", str(root), "-xf", str(trixie_tarball)], check=True, timeout=300)
        assert not (root / "usr/bin/python3.13").exists(), "the pristine root must start without Python"
        shutil.copy(appliance_deb_trixie, root / "root" / appliance_deb_trixie.name)
        r = in_namespaces(root, f"""
            apt-get update -qq
            apt-get install -y -qq --download-only --no-install-recommends /root/{appliance_deb_trixie.name}
        """, net=False, timeout=600)
        assert r.returncode == 0, r.stdout[-6000:]
        yield root
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(root)], check=False)


@pytest.mark.timeout(900)   # a cold run builds two roots (mmdebstrap) and the package
def test_trixie_booted_install_serve_reload(trixie_root: Path, appliance_deb_trixie: Path,
                                            make_box) -> None:
    deb = appliance_deb_trixie
    box: Box = make_box(lower=str(trixie_root))
    assert "13 (trixie)" in box.run(["cat", "/etc/os-release"]).stdout

    # install offline from the downloaded archives; the postinst enables and starts the socket
    r = box.run(f"apt-get install -y --no-install-recommends /root/{shlex.quote(deb.name)}", timeout=300)
    assert "Setting up appliance" in r.stdout, r.stdout[-4000:]
    assert box.run(["dpkg-query", "-W", "-f=${Version}", "appliance"]).stdout.endswith("~deb13u1")
    assert box.run(["readlink", "-f", "/usr/lib/appliance/bin/python"]).stdout.strip() == "/usr/bin/python3.13"
    assert box.run(["dpkg-query", "-S", "/usr/lib/systemd/system/appliance.socket"]).returncode == 0
    assert box.run(["systemctl", "is-enabled", "appliance.socket"]).stdout.strip() == "enabled"

    # socket start; nothing runs until the first connection, which a worker answers
    box.run(["systemctl", "start", "appliance.socket"])
    assert box.run(["systemctl", "is-active", "appliance.socket"]).stdout.strip() == "active"
    s = service(box)
    assert s["ActiveState"] == "inactive" and s["MainPID"] == "0", s
    info = hello(box)
    s = service(box)
    assert s["ActiveState"] == "active" and s["SubState"] == "running", f"{s}\n{diag(box)}"
    main0 = s["MainPID"]
    assert str(info["pid"]) != main0, "the answer must come from a worker, not the master"

    # the journal has the structured fields (native journal entries)
    entries = box.wait_until("worker.ready entries in the journal",
                             lambda: [e for e in journal(box) if e.get("EVENT") == "worker.ready"],
                             timeout=20)
    e = entries[-1]
    for field in ("EVENT", "WORKER_ID", "WORKER_PID", "GENERATION", "MESSAGE", "PRIORITY"):
        assert field in e, f"{field} missing in {e}"
    assert e["_TRANSPORT"] == "journal"
    # a field match (the master logs master.ready once every worker has reported ready)
    by_field = box.wait_until("a journal match on EVENT=master.ready",
                              lambda: journal(box, "appliance", "EVENT=master.ready"), timeout=20)
    assert all(x["EVENT"] == "master.ready" for x in by_field)

    # reload with a changed drop-in: exit 0, same master, the new generation serves
    gen0 = info["generation"]
    box.write("/etc/appliance/conf.d/50-site.toml", "[workers]\ncount = 3\n")
    r = box.run(["systemctl", "reload", "appliance"], check=False, timeout=200)
    assert r.returncode == 0, f"{r}\n{diag(box)}"
    box.wait_until("3 workers of the new generation",
                   lambda: f"3/3 workers ready, generation {gen0 + 1}" in service(box)["StatusText"],
                   timeout=30)
    assert service(box)["MainPID"] == main0, "a reload must not restart the master"
    assert {hello(box)["generation"] for _ in range(4)} == {gen0 + 1}
