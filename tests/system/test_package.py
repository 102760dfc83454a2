"""Static checks of the built .deb (no box needed, but the same session-built package):
metadata and the version's one source, no conffiles, layout, no build paths, bytecode, the
venv's interpreter, the template units."""

from __future__ import annotations

import ast
import marshal
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
PREFIX = "usr/lib/appliance"
PY = "python3.11"          # bookworm's; the build machine is Debian 12
UNITDIR = "lib/systemd/system"


def tree_version() -> str:
    """``__version__`` in appliance/__init__.py: the one place the version is written."""
    for node in ast.parse((REPO / "appliance" / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError("no __version__ in appliance/__init__.py")


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def unpacked(appliance_deb: Path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-R", str(appliance_deb), str(d)], check=True)
    return d


def test_metadata(appliance_deb: Path) -> None:
    version = tree_version()
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    assert appliance_deb.name == f"appliance_{field(appliance_deb, 'Version')}_{arch}.deb"
    if re.fullmatch(r"[0-9.]+", version):     # plain release: the version plus the release's suffix
        assert field(appliance_deb, "Version") == f"{version}~deb12u1"
    assert field(appliance_deb, "Architecture") == arch
    depends = field(appliance_deb, "Depends")
    assert re.search(r"(^|, )python3\.11(,|$| )", depends), depends
    assert "libc6" in depends, depends
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], \
        "pyproject.toml must read the version from appliance/__init__.py (dynamic)"


def test_version_is_the_trees(unpacked: Path) -> None:
    init = next((unpacked / PREFIX).rglob("site-packages/appliance/__init__.py")).read_text()
    assert f'__version__ = "{tree_version()}"' in init
    meta = next((unpacked / PREFIX).rglob("site-packages/appliance-*.dist-info/METADATA")).read_text()
    assert f"\nVersion: {tree_version()}\n" in meta


def test_no_conffiles_and_layout(unpacked: Path) -> None:
    # nothing in /etc is dpkg's: an upgrade can never stop at a conffile question
    assert not (unpacked / "DEBIAN" / "conffiles").exists()
    assert [p.relative_to(unpacked).as_posix() for p in sorted((unpacked / "etc").rglob("*"))] == \
        ["etc/appliance", "etc/appliance/conf.d"]
    assert not (unpacked / "DEBIAN" / "preinst").exists(), "nothing may be stopped before the unpack"
    for path in (f"{UNITDIR}/appliance.socket", f"{UNITDIR}/appliance.service",
                 f"{UNITDIR}/appliance@.socket", f"{UNITDIR}/appliance@.service",
                 "usr/share/appliance/appliance.toml", "usr/share/appliance/00-example.toml",
                 "usr/share/man/man1/appliance.1.gz", "usr/share/doc/appliance/operating.md",
                 "usr/share/doc/appliance/copyright", f"{PREFIX}/bin/appliance"):
        assert (unpacked / path).exists(), path
    assert not (unpacked / "opt").exists()
    assert (unpacked / "usr/bin/appliance").is_symlink()
    assert str((unpacked / "usr/bin/appliance").readlink()) == "../lib/appliance/bin/appliance"
    site = unpacked / PREFIX / f"lib/{PY}/site-packages"
    names = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert not names & {"pip", "setuptools", "wheel", "_distutils_hack"}, names
    assert {"pydantic", "uvicorn", "uvloop", "httptools", "sdnotify", "appliance"} <= names
    assert "structlog" not in names, "appliance logs with the stdlib only (the app's versions win)"
    assert not names & {"watchfiles", "pyyaml", "python_dotenv"}, "uvicorn[standard] extras crept in"


def test_venv_is_relocated_and_isolated(unpacked: Path) -> None:
    venv = unpacked / PREFIX
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg and "command" not in cfg, cfg
    link = venv / f"bin/{PY}"        # relative under /usr (dh_link): ../../../bin/python3.X
    assert (link.parent / link.readlink()).resolve() == (unpacked / f"usr/bin/{PY}").resolve()
    assert (venv / "bin/appliance").read_text().splitlines()[0] == f"#!/{PREFIX}/bin/python -I"
    assert not list(venv.rglob("direct_url.json"))
    leaks = subprocess.run(["grep", "-rl", "-e", "/tmp/appliance-build", "-e", "/root/.pyenv",
                            "-e", "/opt/wheels", str(unpacked)], capture_output=True, text=True).stdout
    assert leaks == "", leaks


def test_upgrade_keeps_the_socket_and_restarts_after(unpacked: Path) -> None:
    prerm = (unpacked / "DEBIAN" / "prerm").read_text()
    postinst = (unpacked / "DEBIAN" / "postinst").read_text()
    # stops happen on removal only; never a stop or restart of a socket on upgrade
    for line in prerm.splitlines():
        if "stop" in line and "deb-systemd-invoke" in line:
            assert "remove" in prerm[: prerm.index(line)].rsplit("if ", 1)[-1], line
    assert "try-restart" in postinst
    assert not re.search(r"restart\S* '?appliance(@\S*)?\.socket", postinst), postinst


def test_template_units_match_the_main_units() -> None:
    """appliance@.service is appliance.service but for the lines that name the instance."""
    def service_lines(name: str) -> list[str]:
        text = (REPO / "units" / name).read_text()
        body = text[text.index("[Service]"):]
        return [ln for ln in body.splitlines() if ln and not ln.startswith("#")]

    main, inst = service_lines("appliance.service"), service_lines("appliance@.service")
    assert [ln for ln in inst if "%i" not in ln] == [ln for ln in main if not re.search(
        r"^(ExecStartPre|ExecStart|ExecReload|RuntimeDirectory|Also)=", ln)]
    assert "User=appliance-%i" in inst and "RuntimeDirectory=appliance-%i" in inst
    assert "ExecStart=/usr/bin/appliance --instance %i serve" in inst


def test_bytecode_checked_hash_with_final_prefix(unpacked: Path) -> None:
    pycs = list((unpacked / PREFIX).rglob("*.pyc"))
    assert len(pycs) > 100
    for pyc in pycs[:: max(1, len(pycs) // 50)] + list((unpacked / PREFIX).rglob(f"cli.cpython-{PY[6:].replace('.', '')}.pyc")):
        data = pyc.read_bytes()
        assert int.from_bytes(data[4:8], "little") == 3, f"{pyc}: not checked-hash"
        code = marshal.loads(data[16:])
        assert code.co_filename.startswith(f"/{PREFIX}/"), code.co_filename
