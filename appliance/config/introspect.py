"""Read the settings declarations back off the pydantic models, for the docs and the example.

The schema declares each setting once; this module turns those declarations into plain
:class:`SettingInfo` values (type, default, limits, description, reload rule), so that
``scripts/gen-settings-doc`` never has to know pydantic's internals and the wording of a
reload rule is produced in one place. It works on any root model made of section models;
:func:`appliance.config.schema.iter_settings` binds it to ``Settings``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from appliance.config.reload import Reload, reload_policy, restart_condition

__all__ = ["Constraint", "SettingInfo", "iter_model_settings", "reload_text", "section_model"]


@dataclass(frozen=True, slots=True)
class Constraint:
    """A rule enforced by a validator, described for the docs.

    Bounds such as ``ge=1`` are read from pydantic's own metadata; rules checked by code (an
    address form, a name alphabet) need this marker to reach ``docs/settings.md``.
    """

    text: str


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """Everything the docs and the example need to know about one setting.

    ``key`` is dotted (``workers.count``); settings of ``[[listen]]`` entries are keyed
    ``listen[].name``. ``required`` settings have no default (``default`` is then None).
    ``policy`` is the declared reload policy; ``restart_while`` names the boolean setting
    under which a change needs a restart anyway (``app.preload``), or is None.
    """

    key: str
    section: str
    name: str
    type: str
    default: object
    required: bool
    limits: str
    description: str
    policy: Reload
    examples: tuple[object, ...]
    is_array: bool
    restart_while: str | None = None


def reload_text(info: SettingInfo) -> str:
    """The reload rule as the docs print it.

    For example ``rolling; needs restart while `app.preload` is true``.
    """
    if info.restart_while is None:
        return info.policy.value
    return f"{info.policy.value}; needs restart while `{info.restart_while}` is true"


def _unwrap_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata.extend(extra)
    return annotation, metadata


def section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a section field (``[workers]`` or ``[[listen]]``), else None."""
    annotation, _ = _unwrap_annotated(field.annotation)
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


_TYPE_NAMES: Mapping[Any, str] = {
    int: "integer",
    float: "float",
    bool: "boolean",
    str: "string",
}


def _type_text(annotation: Any) -> str:
    annotation, _ = _unwrap_annotated(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(
            f'"{arg}"' if isinstance(arg, str) else str(arg) for arg in typing.get_args(annotation)
        )
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return " | ".join(parts)
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(field: FieldInfo) -> list[Any]:
    """Constraint metadata of a field, including inside union members (``count``)."""
    found = list(field.metadata)
    pending = [field.annotation]
    while pending:
        annotation, metadata = _unwrap_annotated(pending.pop())
        for item in metadata:
            found.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        pending.extend(typing.get_args(annotation) if typing.get_origin(annotation) else [])
    return found


def _limits_text(field: FieldInfo) -> str:
    words = []
    for item in _constraints(field):
        match item:
            case annotated_types.Ge(ge=bound):
                words.append(f"≥ {bound}")
            case annotated_types.Gt(gt=bound):
                words.append(f"> {bound}")
            case annotated_types.Le(le=bound):
                words.append(f"≤ {bound}")
            case annotated_types.Lt(lt=bound):
                words.append(f"< {bound}")
            case annotated_types.MinLen(min_length=bound) if bound > 1:
                words.append(f"at least {bound} items")
            case Constraint(text=text):
                words.append(text)
    return ", ".join(words)


def _info(section: str, name: str, model: type[BaseModel], *, is_array: bool) -> SettingInfo:
    field = model.model_fields[name]
    required = field.is_required()
    condition = restart_condition(model, name)
    return SettingInfo(
        key=f"{section}[].{name}" if is_array else f"{section}.{name}",
        section=section,
        name=name,
        type=_type_text(field.annotation),
        default=None if required else field.get_default(call_default_factory=True),
        required=required,
        limits=_limits_text(field),
        description=field.description or "",
        policy=reload_policy(model, name),
        examples=tuple(field.examples or ()),
        is_array=is_array,
        restart_while=None if condition is None else condition.key,
    )


def iter_model_settings(root: type[BaseModel]) -> Iterator[SettingInfo]:
    """Every leaf setting of ``root`` (a model of section models) in declaration order."""
    for section, field in root.model_fields.items():
        model = section_model(field)
        if model is None:  # pragma: no cover - every top-level field is a section today
            msg = f"{root.__name__}.{section} is not a section"
            raise TypeError(msg)
        is_array = typing.get_origin(_unwrap_annotated(field.annotation)[0]) is list
        for name in model.model_fields:
            yield _info(section, name, model, is_array=is_array)
