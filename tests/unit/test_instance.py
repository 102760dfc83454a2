"""`appliance --instance NAME`: config and control-socket defaults, name validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance import cli
from appliance.config.schema import Settings, resolve_control_path
from appliance.control.locate import SYSTEM_SOCKET, system_socket


def test_control_path_defaults_per_instance() -> None:
    s = Settings()
    inst = {"APPLIANCE_INSTANCE": "shop"}
    assert resolve_control_path(s, inst, 0) == "/run/appliance-shop/control.sock"
    assert resolve_control_path(s, {}, 0) == "/run/appliance/control.sock"
    assert resolve_control_path(s, {**inst, "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == \
        "/run/user/1000/appliance-shop/control.sock"
    assert resolve_control_path(s, inst, 1000) == "/tmp/appliance-1000/shop/control.sock"
    # the unit's RuntimeDirectory=appliance-%i wins, as for the main service
    assert resolve_control_path(s, {**inst, "RUNTIME_DIRECTORY": "/run/appliance-shop"}, 61000) == \
        "/run/appliance-shop/control.sock"
    assert system_socket(inst) == "/run/appliance-shop/control.sock"
    assert system_socket({}) == SYSTEM_SOCKET


def test_instance_selects_its_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.setenv("APPLIANCE_INSTANCE", "")  # restored (removed) at teardown
    assert cli.main(["--instance", "shop", "check"]) == 0
    assert os.environ["APPLIANCE_INSTANCE"] == "shop"
    assert cli.instance_config("shop") == Path("/etc/appliance/shop/appliance.toml")
    assert "built-in defaults" in capsys.readouterr().out  # /etc/appliance/shop/ does not exist here


@pytest.mark.parametrize("name", ["", "Shop", "-x", "a/b", "a.b", "x" * 22])
def test_bad_instance_names(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--instance", name, "check"])
    assert exc.value.code == 2
    assert "--instance" in capsys.readouterr().err
