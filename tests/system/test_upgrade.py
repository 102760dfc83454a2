"""An unattended upgrade from version N to N+1 (the same tree built twice, N+1 as VERSION.post1)
under a steady client loop, with the operator's edited /etc/appliance/appliance.toml and a
conf.d/50-site.toml in place:

* `DEBIAN_FRONTEND=noninteractive apt-get install -y` with no terminal and stdin closed
  finishes (no conffile question can stop it), and the package ends fully configured;
* not one request is refused or fails: the listening socket stays open in systemd across the
  unpack, and the postinst restarts the service once the new files are in place;
* the operator's files are byte for byte what they were, and still in effect;
* the new version serves: `appliance --version`, the new master's VERSION= journal field.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from box import Box
from helpers import diag, hello, journal, load, service

pytestmark = [pytest.mark.system]

MAIN = "/etc/appliance/appliance.toml"
SITE = "/etc/appliance/conf.d/50-site.toml"
MAIN_TEXT = "# the operator's own main file\n[workers]\ncount = 3\n"
SITE_TEXT = "[workers]\ncount = 2\n"


def version_of(deb: Path) -> str:
    import subprocess
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def python_version(debver: str) -> str:
    """0.1.1+post1~deb12u1 -> 0.1.1.post1 (what build-deb made of the PEP 440 version)."""
    return debver.split("~deb")[0].replace("+post", ".post").replace("~", "")


@pytest.mark.timeout(600)
def test_unattended_upgrade_under_load(make_box, appliance_deb: Path, appliance_deb_next: Path) -> None:
    box: Box = make_box()
    old, new = version_of(appliance_deb), version_of(appliance_deb_next)
    for deb in (appliance_deb, appliance_deb_next):
        box.put(deb, f"/root/{deb.name}")
    box.run(f"apt-get install -y /root/{shlex.quote(appliance_deb.name)}", timeout=300)
    box.write(MAIN, MAIN_TEXT)
    box.write(SITE, SITE_TEXT)
    box.run(["systemctl", "start", "appliance.socket"])
    hello(box)
    before = service(box)
    assert "2/2 workers ready" in before["StatusText"], before
    sums = box.run(["sha256sum", MAIN, SITE]).stdout

    with load(box) as clients:
        r = box.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y "
                    f"/root/{shlex.quote(appliance_deb_next.name)} </dev/null", check=False, timeout=300)
        assert r.returncode == 0, f"{r}\n{diag(box)}"
        box.wait_until("the new master running", lambda: (lambda s: s if s["SubState"] == "running"
                       and s["MainPID"] not in ("0", before["MainPID"]) else None)(service(box)))
        clients.advance("after the upgrade")
    final = clients.progress()
    assert final.get("done"), final
    assert final["failed"] == 0, f"{final['failed']} failed/refused: {final['errors'][:20]}\n{diag(box)}"
    assert final["ok"] >= 100, final

    assert "conffile" not in (r.stdout + r.stderr).lower(), r
    status = box.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "appliance"]).stdout
    assert status == f"install ok installed {new}", status
    assert box.run(["dpkg", "--audit"]).stdout.strip() == ""
    assert box.run(["sha256sum", MAIN, SITE]).stdout == sums, "the operator's files changed"
    check = box.run(["appliance", "check"]).stdout
    assert MAIN in check and SITE in check, check

    want = python_version(new)
    assert want != python_version(old)
    assert box.run(["appliance", "--version"]).stdout.strip() == f"appliance {want}"
    after = service(box)
    started = [e for e in journal(box, "appliance", "EVENT=master.started")
               if e.get("_PID") == after["MainPID"]]
    assert started and started[-1].get("VERSION") == want, started[-1:] or journal(box)[-5:]
    assert "2/2 workers ready" in after["StatusText"], after
    assert box.run(["systemctl", "is-active", "appliance.socket"]).stdout.strip() == "active"
    assert {hello(box)["pid"] for _ in range(4)} and int(after["MainPID"]) > 0
