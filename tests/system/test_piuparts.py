"""piuparts' install and purge test of the .deb in a pristine minimal Debian 12 chroot (made from
the same cached mmdebstrap root as test_pristine.py): install with its dependencies from Debian's
archive, remove, purge, and fail on any file left behind or any file of another package touched.
(With /opt/venvs/appliance up to 0.1.0 it failed: the package owned /opt.) The upgrade between two
builds of ours is tested in a booted box by test_upgrade.py, with the services running; piuparts'
own upgrade test needs the older version in an archive and is skipped (--no-upgrade-test).
"""

from __future__ import annotations

import fcntl
import gzip
import shutil
import subprocess
from pathlib import Path

import pytest
from test_pristine import SUITE, bookworm_tarball, cache_dir  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.system]
MIRROR = "http://deb.debian.org/debian"


@pytest.fixture(scope="session")
def bookworm_tgz(bookworm_tarball: Path) -> Path:  # noqa: F811
    """piuparts reads a gzip'ed tarball only."""
    tgz = cache_dir() / f"{SUITE}-apt.tgz"
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tgz.exists() or tgz.stat().st_mtime < bookworm_tarball.stat().st_mtime:
            tmp = tgz.with_suffix(".partial")
            with open(bookworm_tarball, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(tgz)
    return tgz


@pytest.mark.timeout(900)
def test_piuparts_install_purge(bookworm_tgz: Path, appliance_deb: Path, tmp_path: Path,
                                skip_or_fail) -> None:
    if shutil.which("piuparts") is None:
        skip_or_fail("piuparts is not installed (apt-get install piuparts)")
    tmpdir = tmp_path / "piuparts"
    tmpdir.mkdir()
    r = subprocess.run(["piuparts", "--basetgz", str(bookworm_tgz), "--mirror", MIRROR,
                        "--distribution", SUITE, "--no-upgrade-test", "--tmpdir", str(tmpdir),
                        str(appliance_deb)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=880)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-60:])
    assert r.returncode == 0, f"piuparts failed:\n{tail}"
    assert "PASS: All tests." in r.stdout + r.stderr, tail
