"""The app's own environment: its virtualenv wins, preload reloads, bad environments fail
one operation with one line (issue 10)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import APPS, Load, base_config, cli, http_get, write_config

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def make_venv(root: Path, *, pydantic_version: str = "1.10.27") -> Path:
    """A real virtualenv (python -m venv, no pip) holding a fake package `pydantic`."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{PY}" / "site-packages"
    pkg = site / "pydantic"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'VERSION = "{pydantic_version}"\n')
    return venv


def app_dir(root: Path) -> Path:
    d = root / "app"
    d.mkdir()
    shutil.copy(APPS / "versions.py", d / "versions.py")
    return d


def reload(workdir: Path) -> subprocess.CompletedProcess[str]:
    return cli("reload", "--config", str(workdir / "appliance.toml"), "--timeout", "60")


@pytest.mark.parametrize("preload", [False, True])
@pytest.mark.parametrize("target", ["versions:app", "versions:wsgi"])
def test_the_apps_virtualenv_wins_over_appliances_packages(start_master, workdir, preload, target):
    venv = make_venv(workdir)
    cfg = base_config(
        workdir,
        app={
            "target": target,
            "interface": "wsgi" if target.endswith("wsgi") else "asgi",
            "directory": str(app_dir(workdir)),
            "virtualenv": str(venv),
            "env": {"MYAPP_SETTING": "from-config"},
            "preload": preload,
        },
    )
    m = start_master(cfg)
    m.ready()
    _, body = m.get("/")
    assert body["pydantic"] == "1.10.27"
    if target == "versions:app":
        assert body["pydantic_file"].startswith(str(venv))
        assert not body["structlog_loaded"] and not body["sdnotify_loaded"]
        assert not body["appliance_config_loaded"]
        assert body["env"] == "from-config" and body["virtual_env"] == str(venv)


def test_preload_reload_serves_new_code_by_rolling_replacement(start_master, workdir):
    appdir = app_dir(workdir)
    venv = make_venv(workdir)
    cfg = base_config(
        workdir,
        app={"target": "versions:app", "directory": str(appdir), "virtualenv": str(venv),
             "preload": True},
        workers={"count": 2},
    )
    m = start_master(cfg)
    m.ready()
    assert m.get("/")[1]["version"] == "v1"
    source = appdir / "versions.py"
    source.write_text(source.read_text().replace('VERSION = "v1"', 'VERSION = "v2"'))
    with Load(m.port) as load:
        out = reload(workdir)
        assert out.returncode == 0, out.stderr
        load.wait_requests(50)
    assert load.failures == []
    seen = {http_get(m.port, "/")[1]["version"] for _ in range(8)}
    assert seen == {"v2"}
    # Two templates were started, one per generation; the first has exited.
    started = m.logs.find("template.started")
    assert [t["generation"] for t in started] == [1, 2]
    m.logs.wait_for("template.exited", generation=1)


def test_preload_reload_of_broken_code_aborts_and_the_old_code_keeps_serving(
    start_master, workdir
):
    appdir = app_dir(workdir)
    cfg = base_config(
        workdir,
        app={"target": "versions:app", "directory": str(appdir),
             "virtualenv": str(make_venv(workdir)), "preload": True},
        workers={"count": 2},
    )
    m = start_master(cfg)
    m.ready()
    source = appdir / "versions.py"
    source.write_text(source.read_text() + "\nraise RuntimeError('new code is broken')\n")
    with Load(m.port) as load:
        out = reload(workdir)
        load.wait_requests(30)
    assert out.returncode == 1
    assert "new code is broken" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert load.failures == []
    assert {b["version"] for b in load.seen} == {"v1"}


@pytest.mark.parametrize(
    ("venv_kind", "message"),
    [
        ("missing", "does not exist"),
        ("not_a_venv", "is not a virtualenv (no pyvenv.cfg)"),
        ("other_python", "was made with Python 3.7"),
    ],
)
def test_a_bad_virtualenv_is_one_line_at_check_start_and_reload(
    start_master, workdir, venv_kind, message
):
    venv = workdir / "bad-venv"
    if venv_kind != "missing":
        venv.mkdir()
    if venv_kind == "other_python":
        (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.7.3\n")
    bad = base_config(workdir, app={"virtualenv": str(venv)})
    path = write_config(workdir, bad)
    checked = cli("check", "--config", str(path))
    assert checked.returncode == 1 and message in checked.stderr
    assert "Traceback" not in checked.stderr
    # At start: one line, exit 1.
    served = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=60, env=__import__("harness").clean_env(),
    )
    assert served.returncode == 1 and message in served.stderr
    assert len(served.stderr.strip().splitlines()) == 1
    # On reload: refused, and the running workers keep serving.
    m = start_master(base_config(workdir))
    m.ready()
    write_config(workdir, bad)
    out = reload(workdir)
    assert out.returncode == 1 and message in out.stderr
    assert m.get("/")[0] == 200


def test_check_app_imports_the_app_in_its_environment(workdir):
    appdir = app_dir(workdir)
    ok = write_config(workdir, base_config(
        workdir, app={"target": "versions:app", "directory": str(appdir),
                      "virtualenv": str(make_venv(workdir))}))
    out = cli("check", "--app", "--config", str(ok))
    assert out.returncode == 0, out.stderr
    assert "versions:app imports" in out.stdout
    # Without the venv the app's `import pydantic` finds appliance's: still imports. A module
    # that is missing everywhere fails with one line.
    (appdir / "versions.py").write_text("import no_such_dependency_xyz\napp = None\n")
    out = cli("check", "--app", "--config", str(ok))
    assert out.returncode == 1
    assert "no_such_dependency_xyz" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_system_site_packages_and_sys_executable_follow_the_venv(start_master, workdir):
    venv = workdir / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        check=True,
    )
    appdir = workdir / "app"
    appdir.mkdir()
    (appdir / "sysapp.py").write_text(
        "import json, sys, site\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    body = json.dumps({'exe': sys.executable, 'path': sys.path}).encode()\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': body})\n"
    )
    cfg = base_config(
        workdir, app={"target": "sysapp:app", "directory": str(appdir), "virtualenv": str(venv)}
    )
    m = start_master(cfg)
    m.ready()
    _, body = m.get("/")
    assert body["exe"] == str(venv / "bin" / "python")
    venv_site = str(venv / "lib" / f"python{PY}" / "site-packages")
    base_site = [p for p in body["path"] if p.startswith(sys.base_prefix) and "-packages" in p]
    assert venv_site in body["path"] and base_site
    assert body["path"].index(venv_site) < body["path"].index(base_site[0])


def test_a_venv_with_the_same_click_as_appliance_is_not_reported(start_master, workdir):
    from importlib import metadata

    venv = make_venv(workdir)
    site = venv / "lib" / f"python{PY}" / "site-packages"
    same = metadata.version("click")
    (site / f"click-{same}.dist-info").mkdir()
    (site / "uvicorn-0.1.0.dist-info").mkdir()
    cfg = base_config(workdir, app={"virtualenv": str(venv)})
    m = start_master(cfg)
    m.ready()
    (shadowed,) = m.logs.find("template.engine_shadowed")
    assert shadowed["packages"] == {"uvicorn": "0.1.0"}


@pytest.mark.parametrize("preload", [False, True])
def test_the_engine_is_appliances_even_when_the_venv_has_its_own(start_master, workdir, preload):
    # A venv whose uvicorn cannot even be imported: the engine is loaded before the app's
    # paths are in front, so workers serve with appliance's copy (and the app shares it).
    venv = make_venv(workdir)
    site = venv / "lib" / f"python{PY}" / "site-packages"
    (site / "uvicorn").mkdir()
    (site / "uvicorn" / "__init__.py").write_text('raise ImportError("the venv\'s uvicorn")\n')
    (site / "uvicorn-0.1.0.dist-info").mkdir()
    cfg = base_config(
        workdir,
        app={
            "target": "versions:app",
            "directory": str(app_dir(workdir)),
            "virtualenv": str(venv),
            "preload": preload,
        },
    )
    m = start_master(cfg)
    m.ready()
    _, body = m.get("/")
    assert body["pydantic"] == "1.10.27"
