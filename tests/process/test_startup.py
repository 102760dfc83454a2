"""What the master has loaded when it sends READY=1: start-up imports only what it needs.

The engine is the template's (the master never imports it); what only a worker, another command
or a broken config needs is not loaded to start; and the loop runs with the collector on,
start-up's objects frozen out of its walks (``appliance serve`` starts with it paused).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from harness import LogStream, base_config, clean_env, write_config

# `appliance serve`, with a spy on the master's sd_notify that writes down, at READY=1, the
# modules the master has loaded and the collector's state. It changes nothing it watches.
_SPY = r"""
import gc, json, sys
from appliance import systemd

_send = systemd.Notifier.send

def _spy(self, message):
    if "READY=1" in message.split("\n"):
        with open(sys.argv[1], "w") as f:
            json.dump({"modules": sorted(sys.modules), "gc_enabled": gc.isenabled(),
                       "frozen": gc.get_freeze_count()}, f)
    return _send(self, message)

systemd.Notifier.send = _spy
from appliance.cli import main
sys.exit(main(sys.argv[2:]))
"""

#: The serving engine: the template and the workers import it, never the master.
ENGINE = {
    "asyncio",
    "uvicorn",
    "uvloop",
    "httptools",
    "appliance.engines.asgi",
    "appliance.engines.h1",
    "appliance.engines.wsgi",
}
#: What the master needs later or never: `appliance config` (tomli_w), a config with an
#: unknown key (difflib), a worker (its main and the app importer, loaded by the template).
DEFERRED = {"tomli_w", "difflib", "appliance.worker.main", "appliance.importer"}


def test_at_ready_the_master_has_no_engine_nor_what_only_other_commands_need(workdir, notify):
    config = write_config(workdir, base_config(workdir))
    out = workdir / "at-ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPY, str(out), "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(NOTIFY_SOCKET=notify.path),
        start_new_session=True,
    )
    logs = LogStream(proc.stderr)
    try:
        notify.wait_for(lambda m: "READY=1" in m.split("\n"))
        logs.wait_for("master.ready")
        seen = json.loads(out.read_text())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    modules = set(seen["modules"])
    assert "appliance.master.runtime" in modules  # the spy saw the master itself
    assert modules & ENGINE == set()
    assert modules & DEFERRED == set()
    assert seen["gc_enabled"] is True
    assert seen["frozen"] > 0
