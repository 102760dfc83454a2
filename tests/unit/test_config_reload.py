"""Reload rules declared on the fields: policies, the preload condition, and the diff."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.config.reload import Change, Reload, RestartWhile, diff_settings, reload_policy
from appliance.config.schema import AppSettings, Settings, WorkerSettings, iter_settings

PRELOAD_BOUND = ("app.target", "app.interface", "app.directory")


def s(**sections: Any) -> Settings:
    return Settings.model_validate(sections)


_NEW_VALUES = {"app.target": "other.web:app", "app.interface": "wsgi", "app.directory": "/srv"}


def _changed(key: str, **app: Any) -> Settings:
    """Defaults plus ``app``, with ``key`` changed."""
    return s(app={**app, key.removeprefix("app."): _NEW_VALUES[key]})


@pytest.mark.parametrize("key", PRELOAD_BOUND)
def test_app_keys_roll_without_preload(key: str) -> None:
    (change,) = diff_settings(s(), _changed(key))
    assert change.key == key
    assert change.policy is Reload.ROLLING
    assert change.reason is None


@pytest.mark.parametrize("key", PRELOAD_BOUND)
@pytest.mark.parametrize(
    ("old_preload", "new_preload"), [(True, True), (True, False), (False, True)]
)
def test_app_keys_roll_under_preload_too(key: str, old_preload: bool, new_preload: bool) -> None:
    """Each generation imports the app in a template process of its own, so which app (and
    from where) can change by rolling replacement whether or not it is preloaded."""
    old = s(app={"preload": old_preload})
    new = _changed(key, preload=new_preload)
    changes = {change.key: change for change in diff_settings(old, new)}
    assert changes[key].policy is Reload.ROLLING
    assert changes[key].reason is None
    if old_preload != new_preload:
        assert changes["app.preload"] == Change(
            "app.preload", old_preload, new_preload, Reload.ROLLING
        )


def test_no_setting_declares_a_condition_today() -> None:
    assert [info.key for info in iter_settings() if info.restart_while] == []


def test_every_condition_names_a_boolean_setting() -> None:
    for info in iter_settings():
        if info.restart_while is not None:
            section, name = info.restart_while.split(".")
            assert isinstance(getattr(getattr(Settings(), section), name), bool), info.key


def test_a_condition_on_a_non_boolean_is_a_schema_bug() -> None:
    with pytest.raises(TypeError, match="not a boolean"):
        RestartWhile("workers.count", why="x").holds(Settings(), Settings())


def test_section_policies_are_the_strictest_of_their_settings() -> None:
    assert reload_policy(Settings, "app") is Reload.ROLLING
    assert reload_policy(Settings, "workers") is Reload.ROLLING
    assert reload_policy(WorkerSettings, "start_attempts") is Reload.ROLLING
