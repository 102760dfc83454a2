"""The reload planner: a pure diff of two validated configs by each setting's reload policy."""

from __future__ import annotations

from appliance.config.schema import Settings
from appliance.master.plan import Accepted, decide_reload, generation_for, plan_reload


def s(**sections: dict) -> Settings:
    return Settings.model_validate(sections)


def test_unchanged_config_rolls_the_pool_to_pick_up_new_code() -> None:
    plan = plan_reload(s(), s())
    assert plan.live == plan.rolling == plan.restart == ()
    assert not plan.live_only


def test_log_level_only_is_live() -> None:
    plan = plan_reload(s(), s(log={"level": "debug"}))
    assert plan.live == ("log.level",) and plan.live_only


def test_worker_settings_roll() -> None:
    plan = plan_reload(s(), s(workers={"count": 3}, log={"level": "debug"}))
    assert plan.rolling == ("workers.count",) and plan.live == ("log.level",)
    assert not plan.live_only and not plan.restart


def test_listen_and_control_need_restart_with_a_clear_message() -> None:
    new = s(listen=[{"name": "api", "address": "127.0.0.1:9000"}], control={"path": "/run/x.sock"})
    plan = plan_reload(s(), new)
    assert set(plan.restart) == {"listen", "control.path"}
    assert "systemctl restart appliance" in plan.restart_error()
    assert "nothing was changed" in plan.restart_error()


def test_app_change_under_preload_rolls_a_new_generation() -> None:
    old = s(app={"preload": True})
    plan = plan_reload(old, s(app={"preload": True, "target": "other:app"}))
    assert plan.rolling == ("app.target",) and not plan.restart
    assert plan_reload(s(), s(app={"preload": True})).rolling == ("app.preload",)


def test_generation_carries_the_typed_settings() -> None:
    class Loaded:
        settings = s(workers={"graceful_timeout_s": 7, "max_requests": 10}, reload={"surge": 2})
        digest = "abc"

    g = generation_for(Loaded(), target=4, number=3)  # type: ignore[arg-type]
    assert (g.number, g.target, g.digest) == (3, 4, "abc")
    assert g.settings.workers.graceful_timeout_s == 7.0 and g.settings.reload.surge == 2


def test_decide_reload_refuses_a_restart_setting_and_keeps_live_only_with_the_pool_size() -> None:
    class Loaded:
        def __init__(self, settings: Settings) -> None:
            self.settings, self.digest = settings, "new"

    running = generation_for(Loaded(s()), target=2)  # type: ignore[arg-type]
    refused = decide_reload(running, 2, Loaded(s(control={"path": "/run/x.sock"})), 2)  # type: ignore[arg-type]
    assert isinstance(refused, str) and "control.path" in refused
    live = decide_reload(running, 2, Loaded(s(log={"level": "debug"})), 2)  # type: ignore[arg-type]
    assert isinstance(live, Accepted) and live.live_only
    # Scaled at run time to 3: the same config rolls back to the configured size.
    resized = decide_reload(running, 3, Loaded(s(log={"level": "debug"})), 2)  # type: ignore[arg-type]
    assert isinstance(resized, Accepted) and not resized.live_only
