"""What a changed setting costs on ``systemctl reload``, declared on the field and nowhere else.

Each field of the schema carries a :class:`Reload` member in its ``Annotated`` metadata, and a
setting whose cost depends on another setting also carries a :class:`RestartWhile` marker.
pydantic keeps unknown metadata on ``FieldInfo.metadata`` and otherwise ignores it, so the
rules stay data next to the type, the limits and the description: :func:`diff_settings` reads
them, the reload planner only sorts the resulting :class:`Change` values by ``policy``, and the
generated reference prints the same markers. A rule kept anywhere else (a key list in the
planner) let the docs say "rolling" where the code said "restart"; this module exists so that
cannot happen again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel

__all__ = [
    "Change",
    "Reload",
    "RestartWhile",
    "diff_settings",
    "reload_policy",
    "restart_condition",
    "strictest",
]


class Reload(enum.Enum):
    """How a changed setting takes effect on ``systemctl reload``.

    Members are ordered from cheapest to most disruptive; :func:`strictest` relies on the
    declaration order, so keep it.
    """

    LIVE = "live"
    ROLLING = "rolling"
    RESTART = "restart"

    @property
    def summary(self) -> str:
        """One line for docs and logs."""
        return _RELOAD_SUMMARY[self]


_RELOAD_SUMMARY = {
    Reload.LIVE: "applies without replacing workers",
    Reload.ROLLING: "applies by rolling replacement of workers",
    Reload.RESTART: "needs `systemctl restart`",
}
_RELOAD_ORDER = tuple(Reload)


def strictest(policies: Iterable[Reload]) -> Reload:
    """The most disruptive of ``policies`` (``LIVE`` when there are none).

    A reload that changes one ROLLING and one LIVE setting must roll the workers; one RESTART
    change means the reload cannot apply the new config at all.
    """
    return max(policies, key=_RELOAD_ORDER.index, default=Reload.LIVE)


@dataclass(frozen=True, slots=True)
class RestartWhile:
    """Marker: a change needs a restart while the boolean setting ``key`` is true.

    "While" means in the old *or* the new configuration: turning ``app.preload`` on or off
    and changing ``app.target`` in the same reload is as impossible for forked workers as
    changing the target under a preloaded app. Otherwise the field's own :class:`Reload`
    member applies.
    """

    key: str
    why: str
    """Why, for the docs: completes "then it needs a restart, because ..."."""

    def holds(self, old: BaseModel, new: BaseModel) -> bool:
        """Whether the condition is true in ``old`` or ``new`` (both ``Settings``)."""
        return _lookup(old, self.key) or _lookup(new, self.key)

    @property
    def text(self) -> str:
        """The condition for docs and messages: ``app.preload is true``."""
        return f"{self.key} is true"


def _lookup(settings: BaseModel, key: str) -> bool:
    value: object = settings
    for name in key.split("."):
        value = getattr(value, name)
    if not isinstance(value, bool):
        msg = f"RestartWhile({key!r}) names a setting that is not a boolean"
        raise TypeError(msg)
    return value


def _section(model_cls: type[BaseModel], field_name: str) -> type[BaseModel] | None:
    annotation = model_cls.model_fields[field_name].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def reload_policy(model_cls: type[BaseModel], field_name: str) -> Reload:
    """The declared reload policy of ``model_cls.field_name``, before any condition.

    A section field without its own marker (``Settings.workers``) gets the strictest policy of
    its settings. A leaf without a marker is a bug in the schema and raises ``LookupError``.
    Use :func:`diff_settings` for the policy of an actual change: it applies
    :class:`RestartWhile` conditions too.
    """
    for item in model_cls.model_fields[field_name].metadata:
        if isinstance(item, Reload):
            return item
    section = _section(model_cls, field_name)
    if section is None:
        msg = f"{model_cls.__name__}.{field_name} has no Reload marker"
        raise LookupError(msg)
    return strictest(reload_policy(section, name) for name in section.model_fields)


def restart_condition(model_cls: type[BaseModel], field_name: str) -> RestartWhile | None:
    """The :class:`RestartWhile` marker of ``model_cls.field_name``, if it has one."""
    for item in model_cls.model_fields[field_name].metadata:
        if isinstance(item, RestartWhile):
            return item
    return None


@dataclass(frozen=True, slots=True)
class Change:
    """One setting whose value differs between two configurations.

    ``policy`` is what this change costs, conditions included: the planner needs nothing else.
    ``reason`` is the condition that made it stricter than declared (``"app.preload is
    true"``), or None when the declared policy applies.
    """

    key: str
    old: object
    new: object
    policy: Reload
    reason: str | None = None


def _change(
    model_cls: type[BaseModel],
    name: str,
    key: str,
    values: tuple[object, object],
    roots: tuple[BaseModel, BaseModel],
) -> Change:
    policy = reload_policy(model_cls, name)
    condition = restart_condition(model_cls, name)
    if condition is not None and policy is not Reload.RESTART and condition.holds(*roots):
        return Change(key, *values, Reload.RESTART, condition.text)
    return Change(key, *values, policy)


def diff_settings(old: BaseModel, new: BaseModel) -> list[Change]:
    """The settings that differ between two ``Settings``, in declaration order.

    Table sections are compared key by key. Arrays of tables (``listen``) are compared as a
    whole under their section name, because entries have no identity beyond their position
    and a changed socket set is one decision (restart) for the planner. Except when every
    entry stays the same socket (as many entries, none of their restart settings changed):
    then each changed setting of an entry is its own change, ``listen[0].proxy_trusted``
    with its own policy, so what the generated docs say about it is what a reload does.
    """
    roots = (old, new)
    changes = []
    for section in type(old).model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if isinstance(before, BaseModel):
            for name in type(before).model_fields:
                a, b = getattr(before, name), getattr(after, name)
                if a != b:
                    changes.append(_change(type(before), name, f"{section}.{name}", (a, b), roots))
        elif before != after:
            changes.extend(
                _entry_changes(section, before, after, roots)
                or [_change(type(old), section, section, (before, after), roots)]
            )
    return changes


def _entry_changes(
    section: str, before: object, after: object, roots: tuple[BaseModel, BaseModel]
) -> list[Change]:
    """Setting by setting changes of an array of tables whose entries are the same sockets;
    empty when they are not (another length, or a changed setting that needs a restart)."""
    if not (isinstance(before, list) and isinstance(after, list)) or len(before) != len(after):
        return []
    changes = []
    for index, (a, b) in enumerate(zip(before, after, strict=True)):
        if not (isinstance(a, BaseModel) and type(a) is type(b)):
            return []
        for name in type(a).model_fields:
            x, y = getattr(a, name), getattr(b, name)
            if x != y:
                change = _change(type(a), name, f"{section}[{index}].{name}", (x, y), roots)
                if change.policy is Reload.RESTART:
                    return []
                changes.append(change)
    return changes
