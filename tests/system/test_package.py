"""Static checks of the built .deb (no box needed, but the same session-built package):
metadata, conffiles, layout, no build paths, bytecode, the venv's interpreter."""

from __future__ import annotations

import marshal
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
PREFIX = "opt/venvs/appliance"


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def unpacked(appliance_deb: Path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-R", str(appliance_deb), str(d)], check=True)
    return d


def test_metadata(appliance_deb: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    assert appliance_deb.name == f"appliance_{field(appliance_deb, 'Version')}_{arch}.deb"
    if re.fullmatch(r"[0-9.]+", version):     # plain release: the Debian version is the same
        assert field(appliance_deb, "Version") == version
    assert field(appliance_deb, "Architecture") == arch
    depends = field(appliance_deb, "Depends")
    assert re.search(r"(^|, )python3\.11(,|$| )", depends), depends
    assert "libc6" in depends, depends


def test_conffiles_and_layout(unpacked: Path) -> None:
    conffiles = (unpacked / "DEBIAN" / "conffiles").read_text().split()
    assert sorted(conffiles) == ["/etc/appliance/appliance.toml", "/etc/appliance/conf.d/00-example.toml"]
    for path in ("lib/systemd/system/appliance.socket", "lib/systemd/system/appliance.service",
                 "usr/share/man/man1/appliance.1.gz", "usr/share/doc/appliance/operating.md",
                 "usr/share/doc/appliance/copyright", f"{PREFIX}/bin/appliance"):
        assert (unpacked / path).exists(), path
    assert (unpacked / "usr/bin/appliance").is_symlink()
    assert str((unpacked / "usr/bin/appliance").readlink()) == f"/{PREFIX}/bin/appliance"
    site = unpacked / PREFIX / "lib/python3.11/site-packages"
    names = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert not names & {"pip", "setuptools", "wheel", "_distutils_hack"}, names
    assert {"pydantic", "uvicorn", "uvloop", "httptools", "structlog", "sdnotify", "appliance"} <= names
    assert "websockets" not in names and "watchfiles" not in names, "uvicorn[standard] extras crept in"


def test_venv_is_relocated_and_isolated(unpacked: Path) -> None:
    venv = unpacked / PREFIX
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg and "command" not in cfg, cfg
    assert str((venv / "bin/python3.11").readlink()) == "/usr/bin/python3.11"
    assert (venv / "bin/appliance").read_text().splitlines()[0] == f"#!/{PREFIX}/bin/python -I"
    assert not list(venv.rglob("direct_url.json"))
    leaks = subprocess.run(["grep", "-rl", "-e", "/tmp/appliance-build", "-e", "/root/.pyenv",
                            "-e", "/opt/wheels", str(unpacked)], capture_output=True, text=True).stdout
    assert leaks == "", leaks


def test_bytecode_checked_hash_with_final_prefix(unpacked: Path) -> None:
    pycs = list((unpacked / PREFIX).rglob("*.pyc"))
    assert len(pycs) > 100
    for pyc in pycs[:: max(1, len(pycs) // 50)] + list((unpacked / PREFIX).rglob("cli.cpython-311.pyc")):
        data = pyc.read_bytes()
        assert int.from_bytes(data[4:8], "little") == 3, f"{pyc}: not checked-hash"
        code = marshal.loads(data[16:])
        assert code.co_filename.startswith(f"/{PREFIX}/"), code.co_filename
