"""The settings schema: defaults, strictness, limits, cross-field rules, introspection."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from appliance.config.schema import (
    AppSettings,
    Change,
    ListenSettings,
    LogSettings,
    Reload,
    Settings,
    TcpAddress,
    UnixAddress,
    WorkerSettings,
    diff_settings,
    iter_settings,
    reload_policy,
    resolve_control_path,
    strictest,
)


def _errors(data: dict[str, Any]) -> list[ErrorDetails]:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate(data)
    return info.value.errors(include_url=False)


def test_defaults_are_what_the_lead_codes_against() -> None:
    settings = Settings()
    assert settings.app.target == "appliance.apps.hello:app"
    assert settings.app.interface == "asgi"
    assert settings.app.lifespan == "auto"
    assert settings.workers.count == "auto"
    assert (settings.workers.min, settings.workers.max) == (1, 64)
    assert settings.reload.surge == 1
    assert [(entry.name, entry.address) for entry in settings.listen] == [
        ("http", "127.0.0.1:8000")
    ]
    assert settings.listen[0].backlog == 2048
    assert settings.http.limit_concurrency is None
    assert settings.watchdog.min_healthy == 1
    assert settings.control.path is None
    assert (settings.log.level, settings.log.format) == ("info", "auto")


def test_models_are_frozen_and_reject_unknown_keys() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.workers.min = 3
    assert _errors({"workers": {"cuont": 3}})[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("app", "preload", "true"),
        ("app", "preload", 1),
        ("workers", "min", "2"),
        ("workers", "min", 2.0),
        ("workers", "min", True),
        ("workers", "boot_timeout_s", "30"),
        ("workers", "boot_timeout_s", True),
        ("workers", "count", True),
        ("workers", "count", "4"),
        ("workers", "count", 4.0),
        ("http", "access_log", "yes"),
        ("app", "target", 5),
    ],
)
def test_no_lenient_coercion(section: str, key: str, value: object) -> None:
    errors = _errors({section: {key: value}})
    assert [error["loc"] for error in errors] == [(section, key)]


def test_float_settings_accept_integers_and_store_floats() -> None:
    workers = WorkerSettings.model_validate({"boot_timeout_s": 5})
    assert workers.boot_timeout_s == 5.0
    assert isinstance(workers.boot_timeout_s, float)
    # Defaults are floats too, so the digest of "30" and "30.0" configs is the same.
    assert all(isinstance(WorkerSettings().graceful_timeout_s, float) for _ in [0])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"workers": {"count": 0}}, "Input should be greater than or equal to 1"),
        ({"workers": {"count": 2000, "max": 1024}}, "Input should be less than or equal to 1024"),
        ({"workers": {"count": "sixteen"}}, 'Input should be "auto" or an integer'),
        ({"workers": {"max": 2000}}, "Input should be less than or equal to 1024"),
        ({"workers": {"boot_timeout_s": 0}}, "Input should be greater than 0"),
        ({"reload": {"surge": 65}}, "Input should be less than or equal to 64"),
    ],
)
def test_limits_give_one_clear_error(data: dict[str, Any], message: str) -> None:
    errors = _errors(data)
    assert len(errors) == 1
    assert errors[0]["msg"] == message


@pytest.mark.parametrize(
    ("workers", "blamed"),
    [
        ({"min": 8, "max": 4}, ("min", "max")),
        ({"heartbeat_interval_s": 30, "heartbeat_timeout_s": 30}, ("heartbeat_interval_s",)),
        ({"backoff_initial_s": 20, "backoff_max_s": 10}, ("backoff_initial_s",)),
    ],
)
def test_cross_field_rules_name_both_keys(workers: dict[str, Any], blamed: tuple[str]) -> None:
    (error,) = _errors({"workers": workers})
    assert error["type"] == "cross_field"
    assert error["loc"] == ("workers",)
    names = [name for name, _, _ in error["ctx"]["relation"]]
    assert names[0] == blamed[0]
    assert all(f"workers.{name}" in error["msg"] for name in names)


def test_int_count_outside_min_max_names_both() -> None:
    (error,) = _errors({"workers": {"count": 8, "min": 2, "max": 4}})
    assert error["msg"] == "must be between workers.min (2) and workers.max (4)"
    assert error["ctx"]["at"] == ("count",)


def test_app_target_form() -> None:
    assert AppSettings(target="pkg.mod:factory.app").target == "pkg.mod:factory.app"
    (error,) = _errors({"app": {"target": "pkg.mod"}})
    assert error["msg"] == 'expected MODULE:ATTRIBUTE, for example "myapp.web:app"'


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:8000", TcpAddress("127.0.0.1", 8000, socket.AF_INET)),
        ("0.0.0.0:0", TcpAddress("0.0.0.0", 0, socket.AF_INET)),
        ("localhost:65535", TcpAddress("localhost", 65535, socket.AF_UNSPEC)),
        ("web-1.example.org:80", TcpAddress("web-1.example.org", 80, socket.AF_UNSPEC)),
        ("[::1]:8000", TcpAddress("::1", 8000, socket.AF_INET6)),
        ("[::]:443", TcpAddress("::", 443, socket.AF_INET6)),
        ("unix:/run/appliance/http.sock", UnixAddress("/run/appliance/http.sock")),
    ],
)
def test_listen_address_forms(address: str, parsed: TcpAddress | UnixAddress) -> None:
    assert ListenSettings(name="x", address=address).parsed() == parsed


@pytest.mark.parametrize(
    "address",
    [
        "localhost",
        "127.0.0.1",
        ":8000",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "256.1.1.1:80",
        "::1:8000",
        "[::1]8000",
        "[nope]:80",
        "bad_host:80",
        "unix:relative.sock",
        "unix:/" + "x" * 200,
    ],
)
def test_listen_address_rejects(address: str) -> None:
    with pytest.raises(ValidationError):
        ListenSettings(name="x", address=address)


@pytest.mark.parametrize("name", ["http", "api:v1", "", "x" * 256, "tab\there"])
def test_listen_name_follows_systemd_fdname_rule(name: str) -> None:
    valid = name == "http"
    if valid:
        assert ListenSettings(name=name, address="127.0.0.1:1").name == name
    else:
        with pytest.raises(ValidationError):
            ListenSettings(name=name, address="127.0.0.1:1")


def test_listen_mode_only_for_unix_and_octal() -> None:
    unix = ListenSettings(name="u", address="unix:/run/a.sock", mode="600")
    assert unix.mode_bits == 0o600
    with pytest.raises(ValidationError, match="only applies to unix"):
        ListenSettings(name="t", address="127.0.0.1:80", mode="0600")
    with pytest.raises(ValidationError, match="octal"):
        ListenSettings(name="u", address="unix:/run/a.sock", mode="0999")
    # The default mode on a TCP listener is fine, even spelt out (the effective config
    # printed by `appliance config` lists it and must load again).
    assert ListenSettings(name="t", address="127.0.0.1:80").mode == "0660"
    assert ListenSettings(name="t", address="127.0.0.1:80", mode="0660").mode == "0660"


def test_listen_names_unique_and_at_least_one() -> None:
    entries = [
        {"name": "http", "address": "127.0.0.1:1"},
        {"name": "http", "address": "127.0.0.1:2"},
    ]
    (error,) = _errors({"listen": entries})
    assert error["ctx"]["at"] == (1, "name")
    assert "listen[0]" in error["msg"]
    (error,) = _errors({"listen": []})
    assert error["type"] == "too_short"


def test_json_schema_works() -> None:
    schema = Settings.model_json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert "workers" in schema["properties"]


def test_reload_policy_per_field_and_section() -> None:
    assert reload_policy(WorkerSettings, "count") is Reload.ROLLING
    assert reload_policy(LogSettings, "level") is Reload.LIVE
    assert reload_policy(Settings, "listen") is Reload.RESTART
    assert reload_policy(Settings, "log") is Reload.LIVE
    assert reload_policy(Settings, "workers") is Reload.ROLLING
    assert strictest([Reload.LIVE, Reload.RESTART, Reload.ROLLING]) is Reload.RESTART
    assert strictest([]) is Reload.LIVE


def test_every_setting_is_documented_and_has_a_policy() -> None:
    infos = list(iter_settings())
    keys = [info.key for info in infos]
    assert len(keys) == len(set(keys))
    assert "workers.count" in keys
    assert "listen[].address" in keys
    for info in infos:
        assert info.description.endswith("."), info.key
        assert isinstance(info.policy, Reload)
    by_key = {info.key: info for info in infos}
    assert by_key["workers.count"].type == '"auto" | integer'
    assert by_key["workers.count"].limits == "≥ 1, ≤ 1024"
    assert by_key["workers.boot_timeout_s"].limits == "> 0, ≤ 3600"
    assert by_key["listen[].name"].required
    assert by_key["http.limit_concurrency"].default is None
    assert not by_key["http.limit_concurrency"].required


def test_diff_settings() -> None:
    old = Settings()
    new = Settings.model_validate(
        {
            "workers": {"count": 4},
            "log": {"level": "debug"},
            "listen": [{"name": "http", "address": "127.0.0.1:9000"}],
        }
    )
    changes = diff_settings(old, new)
    assert [change.key for change in changes] == ["workers.count", "listen", "log.level"]
    assert changes[0] == Change("workers.count", "auto", 4, Reload.ROLLING)
    assert changes[1].policy is Reload.RESTART
    assert changes[1].new == new.listen
    assert changes[2] == Change("log.level", "info", "debug", Reload.LIVE)
    assert diff_settings(old, Settings()) == []


def test_resolve_control_path() -> None:
    default = Settings()
    explicit = Settings.model_validate({"control": {"path": "/srv/ctl.sock"}})
    assert resolve_control_path(explicit, {"RUNTIME_DIRECTORY": "/run/x"}, 0) == "/srv/ctl.sock"
    env = {"RUNTIME_DIRECTORY": "/run/appliance:/run/other", "XDG_RUNTIME_DIR": "/run/user/1"}
    assert resolve_control_path(default, env, 1000) == "/run/appliance/control.sock"
    assert resolve_control_path(default, {}, 0) == "/run/appliance/control.sock"
    assert (
        resolve_control_path(default, {"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000)
        == "/run/user/1000/appliance/control.sock"
    )
    assert resolve_control_path(default, {}, 1000) == "/tmp/appliance-1000/control.sock"
    with pytest.raises(ValidationError, match="absolute"):
        Settings.model_validate({"control": {"path": "ctl.sock"}})
