"""The one declaration of every appliance setting.

Each field states its type, default, limits, description and *reload policy* in one place, so
the validator, ``docs/settings.md``, the commented ``conf.d`` example and the reload planner can
never disagree (gunicorn's one-``Setting``-per-option idea, done with pydantic v2).

Rules of the house, and why:

* ``extra="forbid"``: a misspelt key is an error with a suggestion, never silently ignored.
* ``frozen=True``: a validated configuration is a value; the master compares old and new ones
  on reload instead of mutating a shared object.
* ``strict=True`` on numbers and booleans: TOML already has typed values, so ``"true"`` or
  ``"8"`` in a config file is a mistake worth reporting, not something to guess about.
* Units live in names (``graceful_timeout_s``, ``max_rss_mb``).
* Cross-field rules are ``model_validator(mode="after")``, so they never depend on the order in
  which fields were validated.

The reload policy is a :class:`Reload` member placed in each field's ``Annotated`` metadata.
pydantic keeps unknown metadata on ``FieldInfo.metadata`` and otherwise ignores it, which is what
lets :func:`reload_policy` and :func:`diff_settings` stay pure lookups.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = [
    "AppSettings",
    "Change",
    "Constraint",
    "ControlSettings",
    "HttpSettings",
    "ListenSettings",
    "LogSettings",
    "Reload",
    "ReloadSettings",
    "SettingInfo",
    "Settings",
    "TcpAddress",
    "UnixAddress",
    "WatchdogSettings",
    "WorkerSettings",
    "diff_settings",
    "iter_settings",
    "reload_policy",
    "resolve_control_path",
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
class Constraint:
    """A rule enforced by a validator, described for the docs.

    Bounds such as ``ge=1`` are read from pydantic's own metadata; rules checked by code (an
    address form, a name alphabet) need this marker to reach ``docs/settings.md``.
    """

    text: str


# --------------------------------------------------------------------------------------------
# Shared checks. Each raises PydanticCustomError so the message reaches the operator without
# pydantic's "Value error, " prefix.

_UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) on Linux, minus the terminating NUL.
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_FDNAME_RE = re.compile(r"^[ -9;-~]{1,255}$")  # printable ASCII except ':' (systemd fdname rule)
_MODE_RE = re.compile(r"^0?[0-7]{3}$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ADDRESS_FORMS = "HOST:PORT, [IPV6]:PORT or unix:/ABSOLUTE/PATH"


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _check_socket_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise _fail("absolute_path", f"{what} must be an absolute path")
    if "\0" in path:
        raise _fail("socket_path", f"{what} must not contain a NUL byte")
    if len(path.encode()) > _UNIX_PATH_MAX:
        raise _fail(
            "socket_path",
            f"{what} is longer than the {_UNIX_PATH_MAX} bytes a unix socket address can hold",
        )
    return path


def _check_host(host: str) -> socket.AddressFamily:
    """Return the family a literal address implies, ``AF_UNSPEC`` for a hostname."""
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _fail("listen_address", f"{host!r} is not a valid IPv4 address") from None
        return socket.AF_INET
    if len(host) > 253 or not all(_HOST_LABEL_RE.match(label) for label in labels):
        raise _fail(
            "listen_address",
            f"expected {_ADDRESS_FORMS}; {host!r} is neither an IPv4 address nor a hostname",
        )
    return socket.AF_UNSPEC


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A parsed ``HOST:PORT``. ``family`` is ``AF_UNSPEC`` for a hostname (resolve at bind)."""

    host: str
    port: int
    family: socket.AddressFamily


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A parsed ``unix:/absolute/path``."""

    path: str


def _parse_address(text: str) -> TcpAddress | UnixAddress:
    if text.startswith("unix:"):
        return UnixAddress(_check_socket_path(text.removeprefix("unix:"), "a unix socket path"))
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise _fail("listen_address", f"expected {_ADDRESS_FORMS}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail("listen_address", f"{host!r} is not a valid IPv6 address") from None
        family = socket.AF_INET6
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise _fail("listen_address", f"expected {_ADDRESS_FORMS}")
        if ":" in host:
            raise _fail("listen_address", "an IPv6 address needs brackets, as in [::1]:8000")
        family = _check_host(host)
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise _fail("listen_address", "the port must be a number from 0 to 65535")
    return TcpAddress(host=host, port=int(port_text), family=family)


def _section_config(title: str) -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True, title=title)


# --------------------------------------------------------------------------------------------
# Sections


class AppSettings(BaseModel):
    """``[app]``: what the workers serve."""

    model_config = _section_config("[app]")

    target: Annotated[
        str,
        Field(
            strict=True,
            description="The application to serve, as MODULE:ATTRIBUTE (imported in each "
            "worker, or once in the master when `preload` is true).",
        ),
        Constraint("MODULE:ATTRIBUTE"),
        Reload.ROLLING,
    ] = "appliance.apps.hello:app"
    interface: Annotated[
        Literal["asgi", "wsgi"],
        Field(description="Calling convention of the application object."),
        Reload.ROLLING,
    ] = "asgi"
    preload: Annotated[
        bool,
        Field(
            strict=True,
            description="Import the application in the master before forking, so workers share "
            "its memory copy-on-write; code changes then need a restart of the master to load.",
        ),
        Reload.ROLLING,
    ] = False
    directory: Annotated[
        str | None,
        Field(
            strict=True,
            min_length=1,
            description="Directory put first on `sys.path` before importing "
            "the application; unset means the working directory at start.",
            examples=["/srv/myapp"],
        ),
        Reload.ROLLING,
    ] = None
    lifespan: Annotated[
        Literal["auto", "on", "off"],
        Field(
            description="ASGI lifespan events: `on` requires them, `off` never sends them, "
            "`auto` uses them when the application supports them."
        ),
        Reload.ROLLING,
    ] = "auto"

    @field_validator("target")
    @classmethod
    def _target_form(cls, value: str) -> str:
        if not _TARGET_RE.match(value):
            raise _fail("app_target", 'expected MODULE:ATTRIBUTE, for example "myapp.web:app"')
        return value


class WorkerSettings(BaseModel):
    """``[workers]``: pool size, liveness and recycling of worker processes."""

    model_config = _section_config("[workers]")

    count: Annotated[
        Literal["auto"] | Annotated[int, Field(ge=1, le=1024)],
        Field(
            description='Number of workers; "auto" means usable CPUs (affinity and cgroup '
            "CPU quota) minus `reserve_cores`, clamped to [`min`, `max`]."
        ),
        Reload.ROLLING,
    ] = "auto"
    reserve_cores: Annotated[
        int,
        Field(
            strict=True,
            ge=0,
            le=1024,
            description='CPUs to leave for other work when `count` is "auto".',
        ),
        Reload.ROLLING,
    ] = 0
    min: Annotated[
        int,
        Field(strict=True, ge=1, description='Lower bound of the pool size ("auto" and scaling).'),
        Reload.ROLLING,
    ] = 1
    max: Annotated[
        int,
        Field(
            strict=True,
            ge=1,
            le=1024,
            description='Upper bound of the pool size ("auto" and scaling).',
        ),
        Reload.ROLLING,
    ] = 64
    boot_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            gt=0,
            le=3600,
            description="Seconds a new worker may take to report ready before it is killed and "
            "counted as a failed boot.",
        ),
        Reload.ROLLING,
    ] = 30.0
    heartbeat_interval_s: Annotated[
        float,
        Field(
            strict=True,
            gt=0,
            le=60,
            description="Seconds between heartbeats a worker sends from its serving loop.",
        ),
        Reload.ROLLING,
    ] = 1.0
    heartbeat_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            gt=0,
            le=3600,
            description="Seconds without a heartbeat after which a worker is considered hung: "
            "its stack is logged, then it is killed and replaced.",
        ),
        Reload.ROLLING,
    ] = 30.0
    graceful_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            ge=0,
            le=3600,
            description="Seconds a stopping worker may spend finishing in-flight requests "
            "before it is killed.",
        ),
        Reload.ROLLING,
    ] = 30.0
    backoff_initial_s: Annotated[
        float,
        Field(
            strict=True,
            gt=0,
            description="Delay before respawning a worker slot after its first failure; it "
            "doubles with each further failure.",
        ),
        Reload.ROLLING,
    ] = 0.1
    backoff_max_s: Annotated[
        float,
        Field(strict=True, gt=0, le=600, description="Upper bound of the respawn delay."),
        Reload.ROLLING,
    ] = 10.0
    backoff_reset_s: Annotated[
        float,
        Field(
            strict=True,
            gt=0,
            description="Seconds of healthy uptime after which a slot's failure count resets.",
        ),
        Reload.ROLLING,
    ] = 30.0
    max_requests: Annotated[
        int,
        Field(
            strict=True,
            ge=0,
            description="Retire a worker gracefully after this many requests; 0 means never.",
        ),
        Reload.ROLLING,
    ] = 0
    max_requests_jitter: Annotated[
        int,
        Field(
            strict=True,
            ge=0,
            description="Add a random 0..N to `max_requests` per worker, so workers do not all "
            "retire at once.",
        ),
        Reload.ROLLING,
    ] = 0
    max_rss_mb: Annotated[
        int,
        Field(
            strict=True,
            ge=0,
            description="Retire a worker gracefully once its resident memory exceeds this many "
            "MiB; 0 means never.",
        ),
        Reload.ROLLING,
    ] = 0

    @field_validator("count", mode="wrap")
    @classmethod
    def _count_form(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        # A plain union reports one error per branch ("should be 'auto'" *and* "should be
        # >= 1"); an operator wants the one that matches what they wrote.
        if value == "auto":
            return handler(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail("auto_or_int", 'Input should be "auto" or an integer')
        try:
            return handler(value)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                if error["type"] != "literal_error":
                    raise PydanticCustomError(
                        error["type"], error["msg"], dict(error.get("ctx") or {})
                    ) from None
            raise

    @model_validator(mode="after")
    def _consistent(self) -> WorkerSettings:
        _relation(self, "workers", "min", "<=", "max")
        _relation(self, "workers", "heartbeat_interval_s", "<", "heartbeat_timeout_s")
        _relation(self, "workers", "backoff_initial_s", "<=", "backoff_max_s")
        if isinstance(self.count, int) and not self.min <= self.count <= self.max:
            raise PydanticCustomError(
                "cross_field",
                f"must be between workers.min ({self.min}) and workers.max ({self.max})",
                {"at": ("count",)},
            )
        return self


_OPERATORS: Mapping[str, tuple[str, str]] = {
    # operator: (words, words for the reversed comparison)
    "<=": ("less than or equal to", "greater than or equal to"),
    "<": ("less than", "greater than"),
}


def _relation(model: BaseModel, section: str, left: str, op: str, right: str) -> None:
    """Raise a ``cross_field`` error unless ``model.left op model.right``.

    The context carries both keys, their values and the wording either way round, so the
    loader can blame whichever key the operator actually set (the message then names the
    other one and its value) instead of always the left one.
    """
    lvalue, rvalue = getattr(model, left), getattr(model, right)
    if (lvalue <= rvalue) if op == "<=" else (lvalue < rvalue):
        return
    words, reverse = _OPERATORS[op]
    raise PydanticCustomError(
        "cross_field",
        f"{section}.{left} ({lvalue!r}) must be {words} {section}.{right} ({rvalue!r})",
        {
            "relation": (
                (left, f"must be {words} {section}.{right} ({rvalue!r})", lvalue),
                (right, f"must be {reverse} {section}.{left} ({lvalue!r})", rvalue),
            )
        },
    )


class ReloadSettings(BaseModel):
    """``[reload]``: how a rolling reload proceeds."""

    model_config = _section_config("[reload]")

    surge: Annotated[
        int,
        Field(
            strict=True,
            ge=1,
            le=64,
            description="New workers booted ahead of draining old ones during a rolling reload.",
        ),
        Reload.LIVE,
    ] = 1


class ListenSettings(BaseModel):
    """One ``[[listen]]`` entry: a socket systemd passes by name, or that appliance binds."""

    model_config = _section_config("[[listen]]")

    name: Annotated[
        str,
        Field(
            strict=True,
            description="Matches the socket unit's `FileDescriptorName=` when systemd passes "
            "the socket; also names it in logs.",
        ),
        Constraint("1-255 printable ASCII characters, no ':'"),
        Reload.RESTART,
    ]
    address: Annotated[
        str,
        Field(
            strict=True,
            description="Where to listen when appliance binds the socket itself: HOST:PORT "
            "(IPv4 address or hostname), [IPV6]:PORT, or unix:/ABSOLUTE/PATH.",
        ),
        Constraint("port 0-65535; unix path ≤ 107 bytes"),
        Reload.RESTART,
    ]
    backlog: Annotated[
        int,
        Field(
            strict=True,
            ge=1,
            le=65535,
            description="Length of the kernel's queue of not yet accepted connections "
            "(also capped by net.core.somaxconn).",
        ),
        Reload.RESTART,
    ] = 2048
    mode: Annotated[
        str,
        Field(
            strict=True,
            description="Permissions of a unix socket appliance creates, as an octal string; "
            "only valid for unix: addresses.",
        ),
        Constraint("octal, e.g. 0660"),
        Reload.RESTART,
    ] = "0660"
    reuse_port: Annotated[
        bool,
        Field(strict=True, description="Set SO_REUSEPORT on a TCP socket appliance binds."),
        Reload.RESTART,
    ] = False

    @field_validator("name")
    @classmethod
    def _name_form(cls, value: str) -> str:
        if not _FDNAME_RE.match(value):
            raise _fail(
                "listen_name",
                "must be 1 to 255 printable ASCII characters other than ':' "
                "(the rule for systemd's FileDescriptorName=)",
            )
        return value

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str) -> str:
        _parse_address(value)
        return value

    @field_validator("mode")
    @classmethod
    def _mode_form(cls, value: str) -> str:
        if not _MODE_RE.match(value):
            raise _fail("listen_mode", 'expected an octal permission string such as "0660"')
        return value

    @model_validator(mode="after")
    def _mode_only_for_unix(self) -> ListenSettings:
        # A mode other than the default on a TCP address is a mistake worth reporting; the
        # default itself must pass, or the effective config (which lists it) would not reload.
        default = type(self).model_fields["mode"].default
        if self.mode != default and not isinstance(self.parsed(), UnixAddress):
            raise PydanticCustomError(
                "cross_field", "only applies to unix: addresses", {"at": ("mode",)}
            )
        return self

    def parsed(self) -> TcpAddress | UnixAddress:
        """The address as a typed value (already validated, so this cannot fail)."""
        return _parse_address(self.address)

    @property
    def mode_bits(self) -> int:
        """``mode`` as an integer for ``os.chmod``."""
        return int(self.mode, 8)


class HttpSettings(BaseModel):
    """``[http]``: protocol behaviour of the serving engine."""

    model_config = _section_config("[http]")

    keepalive_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            gt=0,
            le=3600,
            description="Seconds an idle keep-alive connection is kept open.",
        ),
        Reload.ROLLING,
    ] = 5.0
    limit_concurrency: Annotated[
        int | None,
        Field(
            strict=True,
            ge=1,
            description="Connections plus in-flight requests a worker accepts before answering "
            "503; unset means no limit.",
            examples=[1000],
        ),
        Reload.ROLLING,
    ] = None
    access_log: Annotated[
        bool,
        Field(strict=True, description="Log one event per request."),
        Reload.ROLLING,
    ] = False
    proxy_headers: Annotated[
        bool,
        Field(
            strict=True,
            description="Trust X-Forwarded-For/-Proto from `forwarded_allow_ips` to set the "
            "client address and scheme.",
        ),
        Reload.ROLLING,
    ] = False
    forwarded_allow_ips: Annotated[
        str,
        Field(
            strict=True,
            description="Comma-separated addresses or networks whose proxy headers are trusted; "
            '"*" trusts all.',
        ),
        Reload.ROLLING,
    ] = "127.0.0.1"
    accept: Annotated[
        Literal["balanced", "kernel"],
        Field(
            description='How workers share the listening sockets. "balanced": each worker '
            "accepts only while it has no more open connections than the least loaded other "
            "worker (counts in shared memory), so keep-alive clients spread evenly. "
            '"kernel": every worker accepts as fast as it can and the kernel decides, which '
            "on a lightly loaded pool often puts every connection on one worker.",
        ),
        Reload.ROLLING,
    ] = "balanced"


class WatchdogSettings(BaseModel):
    """``[watchdog]``: when the master may tell systemd it is alive."""

    model_config = _section_config("[watchdog]")

    min_healthy: Annotated[
        int,
        Field(
            strict=True,
            ge=0,
            description="Workers that must be heartbeating for the master to send WATCHDOG=1 "
            "(only when the unit sets WatchdogSec=); 0 pings whenever the master loop runs.",
        ),
        Reload.LIVE,
    ] = 1


class ControlSettings(BaseModel):
    """``[control]``: the unix socket ``appliance status`` and ``appliance reload`` use."""

    model_config = _section_config("[control]")

    path: Annotated[
        str | None,
        Field(
            strict=True,
            description="Control socket path; unset means $RUNTIME_DIRECTORY/control.sock, "
            "else /run/appliance/control.sock as root, else "
            "$XDG_RUNTIME_DIR/appliance/control.sock, else /tmp/appliance-UID/control.sock.",
            examples=["/run/appliance/control.sock"],
        ),
        Constraint("absolute path ≤ 107 bytes"),
        Reload.RESTART,
    ] = None

    @field_validator("path")
    @classmethod
    def _path_form(cls, value: str | None) -> str | None:
        return None if value is None else _check_socket_path(value, "the control socket path")


class LogSettings(BaseModel):
    """``[log]``: what the master and workers log, and how."""

    model_config = _section_config("[log]")

    level: Annotated[
        Literal["debug", "info", "warning", "error"],
        Field(description="Lowest level that is logged."),
        Reload.LIVE,
    ] = "info"
    format: Annotated[
        Literal["auto", "json", "console", "journal"],
        Field(
            description="Output format; `auto` picks journal when stderr is the journal, "
            "console on a terminal, JSON lines otherwise."
        ),
        Reload.LIVE,
    ] = "auto"


def _default_listen() -> list[ListenSettings]:
    return [ListenSettings(name="http", address="127.0.0.1:8000")]


class Settings(BaseModel):
    """The whole validated configuration: one value, compared as a whole on reload."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="appliance settings")

    # Sections use `= Field(...)` rather than Annotated defaults so type checkers see them
    # as optional constructor arguments (PEP 681 recognises default_factory only there).
    app: AppSettings = Field(default_factory=AppSettings, description="[app]")
    workers: WorkerSettings = Field(default_factory=WorkerSettings, description="[workers]")
    reload: ReloadSettings = Field(default_factory=ReloadSettings, description="[reload]")
    listen: Annotated[list[ListenSettings], Reload.RESTART] = Field(
        default_factory=_default_listen,
        min_length=1,
        description="[[listen]] sockets; the default is one entry named http on "
        "127.0.0.1:8000. Entries in a later file replace the whole list.",
    )
    http: HttpSettings = Field(default_factory=HttpSettings, description="[http]")
    watchdog: WatchdogSettings = Field(default_factory=WatchdogSettings, description="[watchdog]")
    control: ControlSettings = Field(default_factory=ControlSettings, description="[control]")
    log: LogSettings = Field(default_factory=LogSettings, description="[log]")

    @field_validator("listen")
    @classmethod
    def _unique_names(cls, value: list[ListenSettings]) -> list[ListenSettings]:
        first: dict[str, int] = {}
        for index, entry in enumerate(value):
            if entry.name in first:
                raise PydanticCustomError(
                    "cross_field",
                    f"duplicate listen name, already used by listen[{first[entry.name]}]",
                    {"at": (index, "name")},
                )
            first[entry.name] = index
        return value


# --------------------------------------------------------------------------------------------
# Introspection for docs and reload planning


def _unwrap_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata.extend(extra)
    return annotation, metadata


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a section field (``[workers]`` or ``[[listen]]``), else None."""
    annotation, _ = _unwrap_annotated(field.annotation)
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def reload_policy(model_cls: type[BaseModel], field_name: str) -> Reload:
    """The reload policy of ``model_cls.field_name``.

    A section field without its own marker (``Settings.workers``) gets the strictest policy of
    its settings. A leaf without a marker is a bug in the schema and raises ``LookupError``.
    """
    field = model_cls.model_fields[field_name]
    for item in field.metadata:
        if isinstance(item, Reload):
            return item
    section = _section_model(field)
    if section is None:
        msg = f"{model_cls.__name__}.{field_name} has no Reload marker"
        raise LookupError(msg)
    return strictest(reload_policy(section, name) for name in section.model_fields)


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """Everything the docs and the reload planner need to know about one setting.

    ``key`` is dotted (``workers.count``); settings of ``[[listen]]`` entries are keyed
    ``listen[].name``. ``required`` settings have no default (``default`` is then None).
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
    )


def iter_settings() -> Iterator[SettingInfo]:
    """Every leaf setting in declaration order (the order of the docs and the example)."""
    for section, field in Settings.model_fields.items():
        model = _section_model(field)
        if model is None:  # pragma: no cover - every top-level field is a section today
            msg = f"Settings.{section} is not a section"
            raise TypeError(msg)
        is_array = typing.get_origin(_unwrap_annotated(field.annotation)[0]) is list
        for name in model.model_fields:
            yield _info(section, name, model, is_array=is_array)


@dataclass(frozen=True, slots=True)
class Change:
    """One setting whose value differs between two configurations."""

    key: str
    old: object
    new: object
    policy: Reload


def diff_settings(old: Settings, new: Settings) -> list[Change]:
    """The settings that differ, in declaration order.

    Table sections are compared key by key. Arrays of tables (``listen``) are compared as a
    whole under their section name, because entries have no identity beyond their position
    and a changed socket set is one decision (restart) for the planner.
    """
    changes = []
    for section in Settings.model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if isinstance(before, BaseModel):
            for name in type(before).model_fields:
                a, b = getattr(before, name), getattr(after, name)
                if a != b:
                    policy = reload_policy(type(before), name)
                    changes.append(Change(f"{section}.{name}", a, b, policy))
        elif before != after:
            changes.append(Change(section, before, after, reload_policy(Settings, section)))
    return changes


def resolve_control_path(settings: Settings, env: Mapping[str, str], uid: int) -> str:
    """Where the control socket lives, for the master and for ``appliance status``.

    Both sides must agree without talking to each other, so this is a pure function of the
    config, the environment and the uid. Under systemd ``RuntimeDirectory=appliance`` sets
    ``RUNTIME_DIRECTORY`` (a colon-separated list when several are configured; the first is
    ours). A developer without it gets a per-user directory, never a shared world-writable one.
    """
    if settings.control.path is not None:
        return settings.control.path
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return str(PurePosixPath(runtime, "control.sock"))
    if uid == 0:
        return "/run/appliance/control.sock"
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return str(PurePosixPath(xdg, "appliance", "control.sock"))
    return f"/tmp/appliance-{uid}/control.sock"
