"""The first template is pre-forked: it imports the engine while the master reads the config,
and takes its spec by hand-over; when it cannot, the master forks one as usual."""

from __future__ import annotations

import os
import signal
import socket

from harness import base_config, cli

from appliance.worker import template


def test_the_first_template_is_the_preforked_one_and_later_ones_are_forked(start_master, workdir):
    m = start_master(base_config(workdir))
    m.ready()
    (first,) = m.logs.find("template.started")
    assert first["preforked"] is True and first["generation"] == 1
    assert m.get("/")[0] == 200
    assert cli("reload", "--config", str(workdir / "appliance.toml"), "--timeout", "60").returncode == 0
    second = m.logs.wait_for("template.started", count=2)
    assert second["generation"] == 2 and "preforked" not in second
    assert not m.logs.find("template.prefork_unused")


def test_a_pretemplate_that_is_gone_cannot_take_a_spec():
    pre = template.prefork()
    assert pre is not None
    os.kill(pre.pid, signal.SIGKILL)
    os.waitpid(pre.pid, 0)
    a, b = socket.socketpair()
    spec = template.TemplateSpec(
        generation=1,
        config_digest="x",
        app_target="m:app",
        app_directory=None,
        preload=False,
        environment=template.appenv.AppEnvironment(),
        sockets=(a,),
        engine=None,  # type: ignore[arg-type]  # pickled, never used here
        log_level="info",
        log_format="json",
        log_stream="stderr",
        alive_fd=b.fileno(),
        board=None,
        channel=None,  # type: ignore[arg-type]
        close_fds=(),
    )
    try:
        assert template.hand_over(pre, spec, {}) is False
    finally:
        for s in (a, b, pre.sock):
            s.close()


def test_a_pretemplate_the_master_never_needed_exits_at_eof():
    pre = template.prefork()
    assert pre is not None
    pre.sock.close()
    _, status = os.waitpid(pre.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
