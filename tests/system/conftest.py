"""Fixtures of the system tests: the .deb (built once per session) and test boxes (a real
systemd booted as PID 1 in namespaces, see box.py).

Skips, with the reason printed, when not root or when namespaces/overlayfs/cgroup2 are not
usable here. APPLIANCE_REQUIRE_SYSTEM_TESTS=1 turns those skips into failures (for CI, where
they must run). APPLIANCE_DEB=/path/to/appliance_X_arch.deb reuses a built package instead
of running scripts/build-deb; APPLIANCE_DEB_NEXT=... likewise for the upgrade test's N+1 (the
same tree built as version VERSION.post1); APPLIANCE_DEB_TRIXIE=... for the Debian 13 build
(test_trixie.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from box import Box, BoxError, probe  # noqa: E402

REPO = HERE.parent.parent


def _say(config: pytest.Config, msg: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:
        print(f"system tests: {msg}", file=sys.stderr)
        return
    with capman.global_and_fixture_disabled():   # visible even with output capturing on
        tr.write_line("")
        tr.write_line(f"system tests: {msg}", yellow=True)


def _skip_or_fail(config: pytest.Config, reason: str) -> None:
    if os.environ.get("APPLIANCE_REQUIRE_SYSTEM_TESTS") == "1":
        pytest.fail(f"system tests are required here but cannot run: {reason}", pytrace=False)
    _say(config, f"skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def skip_or_fail(pytestconfig: pytest.Config):
    """skip_or_fail(reason): skip with the reason printed (fail under APPLIANCE_REQUIRE_SYSTEM_TESTS=1)."""
    return lambda reason: _skip_or_fail(pytestconfig, reason)


@pytest.fixture(scope="session")
def box_support(pytestconfig: pytest.Config) -> None:
    """Skip (with the reason printed) unless boxes can run on this machine."""
    why = probe()
    if why:
        _skip_or_fail(pytestconfig, why)


@pytest.fixture(scope="session")
def appliance_deb(pytestconfig: pytest.Config, box_support, tmp_path_factory) -> Path:
    """The package under test: $APPLIANCE_DEB, or scripts/build-deb once per session."""
    given = os.environ.get("APPLIANCE_DEB")
    if given:
        p = Path(given).resolve()
        assert p.is_file(), f"APPLIANCE_DEB={given} does not exist"
        return p
    return build_deb(pytestconfig, tmp_path_factory.mktemp("deb"))


def build_deb(config: pytest.Config, out: Path, *args: str, lintian: bool = True) -> Path:
    env = dict(os.environ)
    if not lintian:
        env["APPLIANCE_NO_LINTIAN"] = "1"
    _say(config, f"building the .deb with scripts/build-deb {' '.join(args)} into {out}")
    r = subprocess.run([str(REPO / "scripts" / "build-deb"), *args, str(out)], capture_output=True,
                       text=True, timeout=900, env=env)
    if r.returncode != 0:
        pytest.fail(f"scripts/build-deb failed (rc={r.returncode}):\n{r.stderr[-6000:]}", pytrace=False)
    deb = Path(r.stdout.strip().splitlines()[-1])
    assert deb.is_file(), r.stdout
    return deb


def deb_version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="session")
def appliance_deb_next(pytestconfig: pytest.Config, appliance_deb: Path, tmp_path_factory) -> Path:
    """Version N+1 of the package under test: the same tree as VERSION.post1 ($APPLIANCE_DEB_NEXT
    reuses one). lintian already ran on the same files for N."""
    given = os.environ.get("APPLIANCE_DEB_NEXT")
    if given:
        p = Path(given).resolve()
        assert p.is_file(), f"APPLIANCE_DEB_NEXT={given} does not exist"
        return p
    import ast
    init = (REPO / "appliance" / "__init__.py").read_text()
    version = next(ast.literal_eval(n.value) for n in ast.parse(init).body if isinstance(n, ast.Assign)
                   and [getattr(t, "id", None) for t in n.targets] == ["__version__"])
    deb = build_deb(pytestconfig, tmp_path_factory.mktemp("deb-next"), "--version", f"{version}.post1",
                    lintian=False)
    check = subprocess.run(["dpkg", "--compare-versions", deb_version(deb), "gt", deb_version(appliance_deb)])
    assert check.returncode == 0, f"{deb.name} is not newer than {appliance_deb.name}"
    return deb


@pytest.fixture(scope="session")
def appliance_deb_trixie(pytestconfig: pytest.Config, box_support, tmp_path_factory) -> Path:
    """The package built for Debian 13: $APPLIANCE_DEB_TRIXIE, or `scripts/build-deb --release
    trixie` once per session (on another release it builds in a cached trixie build root)."""
    given = os.environ.get("APPLIANCE_DEB_TRIXIE")
    if given:
        p = Path(given).resolve()
        assert p.is_file(), f"APPLIANCE_DEB_TRIXIE={given} does not exist"
        return p
    return build_deb(pytestconfig, tmp_path_factory.mktemp("deb-trixie"), "--release", "trixie")


def new_box_dir() -> Path:
    # under /tmp: the box mounts its own tmpfs on /tmp, which hides the box dir from itself
    return Path("/tmp") / f"appliance-box-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_box(box_support):
    """Factory for boxes; every box is powered off and removed at teardown, also on failure."""
    boxes: list[Box] = []

    def make(**kw) -> Box:
        b = Box(new_box_dir(), **kw)
        boxes.append(b)
        return b.up()

    yield make
    for b in reversed(boxes):
        b.down()


@pytest.fixture(scope="module")
def installed_box(box_support, appliance_deb: Path):
    """One box for a module's ordered scenario, with the .deb copied to /root (not installed)."""
    b = Box(new_box_dir())
    try:
        b.up()
        b.put(appliance_deb, f"/root/{appliance_deb.name}")
        b.deb_path = f"/root/{appliance_deb.name}"  # type: ignore[attr-defined]
        yield b
    finally:
        b.down()


__all__ = ["Box", "BoxError"]
