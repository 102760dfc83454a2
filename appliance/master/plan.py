"""Pure glue between a loaded configuration and the policy: generations and reload verdicts.

Every rule about *whether* a new configuration can be rolled out lives here or in the schema
(each setting declares its reload policy, including conditional ones such as "restart while
``app.preload`` is on"), never in the code that reads the files: ``serve`` loads and sizes,
then asks :func:`decide_reload`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.config.schema import Reload, diff_settings
from appliance.master.events import Generation

if TYPE_CHECKING:
    from appliance.config.load import LoadedConfig
    from appliance.config.schema import Settings

__all__ = ["Accepted", "ReloadPlan", "decide_reload", "generation_for", "plan_reload"]


def generation_for(loaded: LoadedConfig, target: int, number: int = 1) -> Generation:
    """The policy's view of a loaded config: its typed settings, digest and pool size."""
    return Generation(number=number, settings=loaded.settings, digest=loaded.digest, target=target)


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


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """Diff two validated ``Settings`` by each setting's declared reload policy."""
    live: list[str] = []
    rolling: list[str] = []
    restart: list[str] = []
    for change in diff_settings(old, new):
        if change.policy is Reload.RESTART:
            restart.append(change.key)
        elif change.policy is Reload.ROLLING:
            rolling.append(change.key)
        else:
            live.append(change.key)
    return ReloadPlan(tuple(live), tuple(rolling), tuple(restart))


@dataclass(frozen=True, slots=True)
class Accepted:
    """A reload that can go ahead: the generation to roll out, and how."""

    generation: Generation
    plan: ReloadPlan
    live_only: bool


def decide_reload(
    running: Generation, running_target: int, new: LoadedConfig, new_target: int
) -> Accepted | str:
    """The verdict on rolling ``new`` over what the pool runs now (a reason string: refused).

    ``running`` is the generation the pool runs (after an aborted reload, the one it went back
    to), ``running_target`` its pool size now (``appliance scale`` may have changed it).
    Only live settings changed *and* the pool size stays: apply live, keep every worker.
    """
    plan = plan_reload(running.settings, new.settings)
    if plan.restart:
        return plan.restart_error()
    live_only = plan.live_only and new_target == running_target
    return Accepted(generation_for(new, new_target), plan, live_only)
