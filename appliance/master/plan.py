"""Pure glue between a loaded configuration and the policy: generations and reload plans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.config.schema import Reload, diff_settings
from appliance.master.events import Generation

__all__ = ["ReloadPlan", "generation_for", "plan_reload"]

#: Under ``app.preload`` the app lives in the master's memory: changing which app (or where it
#: is imported from) cannot be done by new workers, which are forks of that memory.
_PRELOAD_RESTART_KEYS = ("app.target", "app.directory", "app.preload", "app.interface")


def generation_for(loaded: Any, target: int, number: int = 1) -> Generation:
    """The policy's view of a loaded config (``loaded.settings``, ``loaded.digest``)."""
    s = loaded.settings
    w = s.workers
    return Generation(
        number=number,
        config=loaded,
        digest=loaded.digest,
        target=target,
        boot_timeout_s=w.boot_timeout_s,
        heartbeat_timeout_s=w.heartbeat_timeout_s,
        graceful_timeout_s=w.graceful_timeout_s,
        backoff_initial_s=w.backoff_initial_s,
        backoff_max_s=w.backoff_max_s,
        backoff_reset_s=w.backoff_reset_s,
        max_requests=w.max_requests,
        max_requests_jitter=w.max_requests_jitter,
        max_rss_mb=w.max_rss_mb,
        surge=s.reload.surge,
        min_healthy=s.watchdog.min_healthy,
        preload=s.app.preload,
    )


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a new configuration changes, grouped by how it can be applied."""

    live: tuple[str, ...] = ()
    rolling: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()

    @property
    def live_only(self) -> bool:
        """Only live settings changed: apply them and keep every worker.

        An unchanged config is *not* live-only: a reload is also how new application code is
        picked up (workers import the app afresh), so it rolls the pool.
        """
        return bool(self.live) and not self.rolling and not self.restart

    def restart_error(self) -> str:
        keys = ", ".join(self.restart)
        return (
            f"{keys} cannot change on reload; run `systemctl restart appliance` to apply "
            "(nothing was changed)"
        )


def plan_reload(old: Any, new: Any) -> ReloadPlan:
    """Diff two validated ``Settings`` by each setting's declared reload policy."""
    live: list[str] = []
    rolling: list[str] = []
    restart: list[str] = []
    preload = old.app.preload or new.app.preload
    for change in diff_settings(old, new):
        if change.policy is Reload.RESTART or (preload and change.key in _PRELOAD_RESTART_KEYS):
            restart.append(change.key)
        elif change.policy is Reload.ROLLING:
            rolling.append(change.key)
        else:
            live.append(change.key)
    return ReloadPlan(tuple(live), tuple(rolling), tuple(restart))
