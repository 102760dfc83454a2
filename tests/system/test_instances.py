"""Two instances side by side (appliance@a, appliance@b from the template units), each with its
own configuration in /etc/appliance/NAME/, dynamic user, runtime directory, control socket and
journal identity; `appliance --instance NAME` reaches each; reloading one leaves the other's
workers untouched."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from box import Box
from helpers import diag, hello, journal, service

pytestmark = [pytest.mark.system]

PORTS = {"a": 8001, "b": 8002}


def workers(box: Box, name: str) -> set[int]:
    main = service(box, f"appliance@{name}")["MainPID"]
    out = box.run(["ps", "-o", "pid=,args=", "--ppid", main]).stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.strip()}


@pytest.mark.timeout(600)
def test_two_instances_side_by_side(make_box, appliance_deb: Path) -> None:
    box: Box = make_box()
    box.put(appliance_deb, f"/root/{appliance_deb.name}")
    box.run(f"apt-get install -y /root/{shlex.quote(appliance_deb.name)}", timeout=300)
    for name, port in PORTS.items():
        box.write(f"/etc/systemd/system/appliance@{name}.socket.d/listen.conf",
                  f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
        box.write(f"/etc/appliance/{name}/conf.d/50-site.toml", "[workers]\ncount = 2\n")
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "enable", "--now", "appliance@a.socket", "appliance@b.socket"])

    for name, port in PORTS.items():
        unit = f"appliance@{name}"
        info = hello(box, port, unit)
        def running(unit: str = unit) -> dict[str, str] | None:
            s = service(box, unit)
            return s if "2/2 workers ready" in s["StatusText"] else None

        s = box.wait_until(f"{unit} running", running)
        main = s["MainPID"]
        assert info["pid"] in workers(box, name)
        assert box.run(["ps", "-o", "user=", "-p", main]).stdout.strip() == f"appliance-{name}"
        assert box.run(["test", "-S", f"/run/appliance-{name}/control.sock"], check=False).returncode == 0
        status = json.loads(box.run(["appliance", "--instance", name, "status", "--json"]).stdout)
        assert str(status.get("pid", main)) == main, status
        check = box.run(["appliance", "--instance", name, "check"]).stdout
        assert f"/etc/appliance/{name}/conf.d/50-site.toml" in check, check
        cfg = box.run(["appliance", "--instance", name, "config", "--origin"]).stdout
        assert f"/etc/appliance/{name}/conf.d/50-site.toml" in cfg, cfg
        ready = [e for e in journal(box, unit, "EVENT=master.ready")]
        assert ready and {e["SYSLOG_IDENTIFIER"] for e in ready} == {unit}, ready
    # the default service is not involved
    assert service(box)["ActiveState"] == "inactive"

    a_main, b_main = service(box, "appliance@a")["MainPID"], service(box, "appliance@b")["MainPID"]
    b_workers = workers(box, "b")
    gen_a = hello(box, PORTS["a"])["generation"]
    r = box.run(["appliance", "--instance", "a", "reload"], check=False, timeout=200)
    assert r.returncode == 0, f"{r}\n{diag(box, 'appliance@a')}"
    r = box.run(["systemctl", "reload", "appliance@a"], check=False, timeout=200)
    assert r.returncode == 0, f"{r}\n{diag(box, 'appliance@a')}"
    s = box.wait_until("a reloaded twice", lambda: (lambda s: s if re.search(
        rf"2/2 workers ready, generation {gen_a + 2}\b", s["StatusText"]) else None)(service(box, "appliance@a")))
    assert s["MainPID"] == a_main
    assert hello(box, PORTS["a"])["generation"] == gen_a + 2
    assert workers(box, "b") == b_workers, "reloading a touched b's workers"
    assert service(box, "appliance@b")["MainPID"] == b_main
    assert hello(box, PORTS["b"])["pid"] in b_workers

    # removal stops every instance
    box.run("apt-get remove -y appliance", timeout=300)
    for name in PORTS:
        assert box.run(["systemctl", "is-active", f"appliance@{name}.service"],
                       check=False).stdout.strip() in ("inactive", "unknown", "failed")
