"""The app's own environment (issue 10) against a real systemd: the installed .deb serves a
Flask app from its own virtualenv, through the socket unit, and reloads its code.

One box, the .deb installed by apt. On the box:

* ``/srv/myapp/.venv``: made with Debian's ``/usr/bin/python3.11 -m venv`` (the interpreter of
  ``/usr/lib/appliance``) and filled offline from wheels downloaded from PyPI on the host
  (``flask`` and ``pydantic<2``; the box has no network). The wheels are cached in
  $APPLIANCE_TEST_CACHE (default /var/cache/appliance-tests), keyed by the requirement list;
  APPLIANCE_TEST_REFRESH=1 downloads them again.
* ``/srv/myapp/myapp/wsgi.py``: a Flask view answering with its code revision and the
  pydantic it imported: 1.10.x from the app's venv, while appliance itself runs pydantic 2.
* ``/etc/appliance/conf.d/50-site.toml``: ``[app]`` target, interface, directory, virtualenv.

For ``preload = false`` and then ``preload = true``, each from a socket-activated start:

1. the first request gets 200 from Flask, with pydantic 1.10.x from /srv/myapp/.venv;
2. code v1 -> v2, ``systemctl reload appliance`` -> exit 0, every answer is v2;
3. code that raises at import, ``systemctl reload`` -> non-zero, v2 still answers, the
   status and the journal name the import error;
4. ``appliance check --app`` (as root): one line with that import error, exit 1; ok, exit 0,
   for the good code.

Every wait polls an observable state with a deadline; there are no sleeps as synchronisation.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from box import Box, BoxError
from helpers import diag, journal, service

pytestmark = [pytest.mark.system]

PYTHON = "/usr/bin/python3.11"   # the interpreter of the package's /usr/lib/appliance
REQUIREMENTS = ("flask", "pydantic<2")
APP = "/srv/myapp"
VENV = f"{APP}/.venv"
MODULE = f"{APP}/myapp/wsgi.py"
DROPIN = "/etc/appliance/conf.d/50-site.toml"
WHEELS_IN_BOX = "/root/app-wheels"

VIEW = '''\
"""The test's Flask app: answers with its code revision and the versions it imported."""
import os
import sys

import flask
import pydantic
{broken}
REVISION = "{revision}"

app = flask.Flask(__name__)


@app.get("/")
def index():
    return flask.jsonify(
        revision=REVISION,
        pydantic=str(pydantic.VERSION),
        pydantic_file=pydantic.__file__,
        flask_file=flask.__file__,
        pid=os.getpid(),
        executable=sys.executable,
    )
'''
BROKEN = 'raise RuntimeError("myapp is broken on purpose")\n'


def cache_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_TEST_CACHE", "/var/cache/appliance-tests"))


def _pip_env() -> dict[str, str]:
    """The environment without the build machine's pip settings (PIP_FIND_LINKS=/opt/wheels…):
    what lands in the app's venv comes from PyPI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.fixture(scope="session")
def app_wheels(box_support, skip_or_fail) -> Path:
    """Wheels for REQUIREMENTS from PyPI, for Debian's python3.11, downloaded once and cached."""
    if not Path(PYTHON).exists():
        skip_or_fail(f"{PYTHON} is not installed (scripts/system-deps)")
    key = hashlib.sha256("\n".join((PYTHON, *REQUIREMENTS)).encode()).hexdigest()[:16]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / f"app-wheels-{key}"
    with open(cache / ".app-wheels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one download at a time, others reuse it
        if wheels.is_dir() and os.environ.get("APPLIANCE_TEST_REFRESH") != "1":
            return wheels
        with tempfile.TemporaryDirectory(dir=cache, prefix=".app-wheels.") as tmp:
            # pip from a throwaway venv of the same interpreter: the wheels match its tags,
            # and only python3.11-venv is needed (as for the app's venv itself)
            r = subprocess.run([PYTHON, "-m", "venv", f"{tmp}/pip"], check=False, capture_output=True,
                               text=True, timeout=120)
            if r.returncode != 0:
                skip_or_fail(f"{PYTHON} -m venv failed (python3.11-venv missing?): {r.stderr.strip()}")
            r = subprocess.run(
                [f"{tmp}/pip/bin/pip", "download", "--isolated", "--disable-pip-version-check",
                 "--no-input", "--only-binary=:all:", "--index-url", "https://pypi.org/simple",
                 "-d", f"{tmp}/wheels", *REQUIREMENTS],
                check=False, capture_output=True, text=True, timeout=300, env=_pip_env())
            if r.returncode != 0:
                skip_or_fail(f"cannot download {' '.join(REQUIREMENTS)} from PyPI: "
                             f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
            if wheels.exists():
                shutil.rmtree(wheels)
            os.replace(f"{tmp}/wheels", wheels)
    return wheels


@pytest.fixture(scope="module")
def app_box(installed_box: Box, app_wheels: Path) -> Box:
    """The module's box with the .deb installed, the app's venv built offline from the wheels
    and no app code yet. The socket is listening; the service has not started."""
    b = installed_box
    b.run(f"apt-get install -y {shlex.quote(b.deb_path)}", timeout=300)
    b.put(app_wheels, WHEELS_IN_BOX)
    reqs = " ".join(shlex.quote(r) for r in REQUIREMENTS)
    # --isolated: the overlay carries the build machine's /etc/pip.conf (find-links, extra
    # indexes); offline, only the wheels from PyPI may be used
    b.run(f"{PYTHON} -m venv {VENV} && {VENV}/bin/pip install --isolated --no-index "
          f"--disable-pip-version-check --find-links {WHEELS_IN_BOX} {reqs}", timeout=180)
    b.run(["mkdir", "-p", f"{APP}/myapp"])
    b.write(f"{APP}/myapp/__init__.py", "")
    b.run(["systemctl", "start", "appliance.socket"])
    return b


def write_app(box: Box, revision: str, *, broken: bool = False) -> None:
    # __pycache__ goes too: `appliance check --app` (root) writes bytecode there, and CPython
    # reuses a .pyc whose recorded source size and mtime (whole seconds) still match: v1 -> v2
    # within one second would leave v1 answering after a successful reload
    box.write(MODULE, VIEW.format(revision=revision, broken=BROKEN if broken else ""))
    box.run(["rm", "-rf", f"{APP}/myapp/__pycache__"])
    box.run(["chmod", "-R", "a+rX", APP])


def get(box: Box, *, retry: bool = False) -> dict:
    """GET / -> the app's JSON. One request must do once the service runs; ``retry`` (for the
    start by socket activation) tries again until a deadline."""
    def once() -> dict | None:
        r = box.run(["curl", "-sS", "-m", "20", "-w", "\n%{http_code}", "http://127.0.0.1:8000/"],
                    check=False, timeout=30)
        body, _, code = r.stdout.rpartition("\n")
        if r.returncode == 0 and code == "200":
            return json.loads(body)
        if not retry:
            raise AssertionError(f"GET / -> {code or r.returncode}: {body or r.stderr}\n{diag(box)}")
        return None
    try:
        return box.wait_until("200 from the app", once, timeout=60, interval=0.2)
    except BoxError as e:
        raise AssertionError(f"{e}\n{diag(box)}") from None


def running(box: Box) -> dict[str, str] | None:
    s = service(box)
    return s if s["ActiveState"] == "active" and s["SubState"] == "running" else None


def reload(box: Box):
    return box.run(["systemctl", "reload", "appliance"], check=False, timeout=200)


def check_app(box: Box):
    return box.run(["appliance", "check", "--app"], check=False, timeout=120)


def journal_since(box: Box, cursor: str) -> list[dict]:
    return journal(box, "appliance", f"--after-cursor={cursor}") if cursor else journal(box)


def cursor(box: Box) -> str:
    r = box.run(["journalctl", "--no-pager", "-n", "0", "--show-cursor", "-u", "appliance"], check=False)
    line = [x for x in r.stdout.splitlines() if x.startswith("-- cursor: ")]
    return line[-1].removeprefix("-- cursor: ") if line else ""


@pytest.mark.parametrize("preload", [False, True], ids=["preload-off", "preload-on"])
def test_flask_app_in_its_own_venv(app_box: Box, preload: bool) -> None:
    box = app_box
    # appliance runs on pydantic 2, from its own venv
    ours = box.run(["/usr/lib/appliance/bin/python", "-I", "-c",
                    "import pydantic; print(pydantic.VERSION, pydantic.__file__)"]).stdout.split()
    assert ours[0].startswith("2."), ours
    assert ours[1].startswith("/usr/lib/appliance/"), ours

    box.run(["systemctl", "stop", "appliance.service"])
    write_app(box, "v1")
    box.write(DROPIN, f'[app]\ntarget = "myapp.wsgi:app"\ninterface = "wsgi"\ndirectory = "{APP}"\n'
                      f'virtualenv = "{VENV}"\npreload = {str(preload).lower()}\n\n'
                      "[workers]\ncount = 2\n")
    assert service(box)["ActiveState"] == "inactive"

    # 1. socket activation: the first request starts the service and gets Flask's answer, with
    #    the app's own pydantic
    info = get(box, retry=True)
    assert info["revision"] == "v1", info
    assert info["pydantic"].startswith("1.10."), info
    assert info["pydantic_file"].startswith(f"{VENV}/lib/python3.11/site-packages/pydantic/"), info
    assert info["flask_file"].startswith(f"{VENV}/lib/python3.11/site-packages/flask/"), info
    # What the app starts with sys.executable (multiprocessing's spawn) gets its own venv.
    assert info["executable"] == f"{VENV}/bin/python", info
    # the first ready worker answers while the others still boot; then READY=1
    s = box.wait_until("the service active", lambda: running(box), timeout=60)
    main = s["MainPID"]
    # ...while the master runs on appliance's pydantic 2 (its compiled core is mapped)
    maps = box.run(["cat", f"/proc/{main}/maps"]).stdout
    assert "/usr/lib/appliance/lib/python3.11/site-packages/pydantic_core/" in maps
    assert f"{VENV}/" not in maps, "the master must never import from the app's venv"
    print(f"preload={preload}: appliance pydantic {ours[0]}, app pydantic {info['pydantic']}")

    # 4 (good code). check --app imports it in a throwaway child: ok, one line
    r = check_app(box)
    assert r.returncode == 0, r
    assert "; app myapp.wsgi:app imports" in r.stdout and r.stdout.count("\n") == 1, r

    # 2. new code + reload: exit 0, only the new code answers (with preload: a new template)
    write_app(box, "v2")
    r = reload(box)
    assert r.returncode == 0, f"{r}\n{diag(box)}"
    seen = {get(box)["revision"] for _ in range(6)}
    assert seen == {"v2"}, f"after the reload: {seen}\n{diag(box)}"
    assert service(box)["MainPID"] == main, "a reload must not restart the master"

    # 3. code that fails at import + reload: non-zero, the old code keeps answering, the status
    #    and the journal say why
    mark = cursor(box)
    write_app(box, "v3", broken=True)
    r = reload(box)
    assert r.returncode != 0, f"systemctl reload must fail when the new code cannot import\n{r}\n{diag(box)}"
    s = service(box)
    assert s["ActiveState"] == "active" and s["MainPID"] == main, s
    seen = {get(box)["revision"] for _ in range(6)}
    assert seen == {"v2"}, f"after the failed reload: {seen}\n{diag(box)}"
    st = box.run(["systemctl", "status", "--no-pager", "-l", "appliance"], check=False).stdout
    assert "myapp is broken on purpose" in st, st
    # with preload the new template's import fails; without, its first worker's
    where = "template.boot_failed" if preload else "worker.boot_failed"
    said = {e.get("EVENT") for e in journal_since(box, mark)
            if "RuntimeError: myapp is broken on purpose" in json.dumps(e)}
    assert {where, "reload.failed"} <= said, f"{said}\n{diag(box)}"

    # 4 (broken code). check --app: one line naming the import error, exit 1
    r = check_app(box)
    assert r.returncode == 1, r
    assert r.stdout == "", r
    assert r.stderr.strip() == ('appliance: app.target "myapp.wsgi:app": importing myapp.wsgi raised '
                                "RuntimeError: myapp is broken on purpose"), r
