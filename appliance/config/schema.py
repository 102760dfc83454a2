"""The one declaration of every appliance setting: the section models and ``Settings``.

Each field states its type, default, limits, description and *reload rule* in one place, so
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

The markers in each field's ``Annotated`` metadata come from the modules around this one:
:mod:`appliance.config.reload` (``Reload`` and ``RestartWhile``: what a change costs),
:mod:`appliance.config.introspect` (``Constraint``: a rule the docs should state) and
:mod:`appliance.config.addresses` (the address forms). Their public names are re-exported here,
so ``from appliance.config.schema import ...`` keeps working for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from appliance.config.addresses import (
    TcpAddress,
    UnixAddress,
    check_socket_path,
    parse_address,
)
from appliance.config.introspect import Constraint, SettingInfo, iter_model_settings
from appliance.config.reload import (
    Change,
    Reload,
    RestartWhile,
    diff_settings,
    reload_policy,
    strictest,
)
from appliance.http.proxy import Network, parse_network

__all__ = [
    "AgentSettings",
    "AppSettings",
    "Change",
    "Constraint",
    "ControlSettings",
    "HttpSettings",
    "ListenSettings",
    "LogSettings",
    "Reload",
    "ReloadSettings",
    "RestartWhile",
    "SettingInfo",
    "Settings",
    "TcpAddress",
    "UnixAddress",
    "WatchdogSettings",
    "WebSocketSettings",
    "WorkerSettings",
    "WsgiSettings",
    "diff_settings",
    "iter_settings",
    "reload_policy",
    "resolve_control_path",
    "strictest",
]

_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_FDNAME_RE = re.compile(r"^[ -9;-~]{1,255}$")  # printable ASCII except ':' (systemd fdname rule)
_MODE_RE = re.compile(r"^0?[0-7]{3}$")


def _fail(kind: str, message: str) -> PydanticCustomError:
    # PydanticCustomError, so the message reaches the operator without "Value error, ".
    return PydanticCustomError(kind, message)


def _section_config(title: str) -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True, title=title)


# --------------------------------------------------------------------------------------------
# Sections


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Variables the app may not set through ``app.env``: they would redirect appliance itself.
_RESERVED_ENV = frozenset(
    {"PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV"}
)


class AppSettings(BaseModel):
    """``[app]``: what the workers serve, and the environment it is imported in."""

    model_config = _section_config("[app]")

    target: Annotated[
        str,
        Field(
            strict=True,
            description="The application to serve, as MODULE:ATTRIBUTE (imported in each "
            "worker, or once per generation in its template process when `preload` is true).",
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
            description="Import the application once per generation, in the generation's "
            "template process, before its workers are forked from it: workers share its memory "
            "copy-on-write and boot in milliseconds. A reload starts a new template, so new "
            "code is picked up without a restart; an import error aborts the reload.",
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
    virtualenv: Annotated[
        str | None,
        Field(
            strict=True,
            min_length=1,
            description="The application's virtualenv: its packages are imported before "
            "appliance's own, so the app gets the versions it installed (only the serving "
            "engine, uvicorn, uvloop and httptools, is appliance's). It must be made "
            "with the Python appliance runs on (same major.minor).",
            examples=["/srv/myapp/.venv"],
        ),
        Constraint("absolute path"),
        Reload.ROLLING,
    ] = None
    python_path: Annotated[
        list[str],
        Field(
            description="Extra directories for `sys.path`, in this order, before the "
            "virtualenv's packages (after `directory`).",
            examples=[["/srv/myapp/src"]],
        ),
        Constraint("absolute paths"),
        Reload.ROLLING,
    ] = []
    env: Annotated[
        dict[str, str],
        Field(
            description="Environment variables set for the application (its template process "
            "and workers), e.g. `DJANGO_SETTINGS_MODULE`. Values are strings.",
            examples=[{"DJANGO_SETTINGS_MODULE": "mysite.settings"}],
        ),
        Reload.ROLLING,
    ] = {}
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

    @field_validator("virtualenv")
    @classmethod
    def _venv_form(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise _fail("absolute_path", "must be an absolute path")
        return value

    @field_validator("python_path", mode="before")
    @classmethod
    def _paths_form(cls, value: object) -> object:
        if isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, str) or not item.startswith("/"):
                    raise PydanticCustomError(
                        "absolute_path",
                        f"python_path[{index}] must be an absolute path (a string)",
                    )
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_form(cls, value: object) -> object:
        if isinstance(value, dict):
            for name, item in value.items():
                if not isinstance(item, str):
                    raise PydanticCustomError(
                        "env_value",
                        f"env.{name} must be a string (got {type(item).__name__}); "
                        "quote numbers and booleans",
                    )
                if not _ENV_NAME_RE.match(str(name)):
                    raise PydanticCustomError(
                        "env_name", f"{name!r} is not a valid environment variable name"
                    )
                if name in _RESERVED_ENV:
                    raise PydanticCustomError(
                        "env_name",
                        f"{name} cannot be set here; use app.virtualenv and app.python_path",
                    )
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
            allow_inf_nan=False,
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
            allow_inf_nan=False,
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
            allow_inf_nan=False,
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
            allow_inf_nan=False,
            ge=0,
            le=3600,
            description="Seconds a stopping worker may spend finishing in-flight requests "
            "before it is killed.",
        ),
        Reload.ROLLING,
    ] = 30.0
    drain_delay_s: Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
            ge=0,
            le=3600,
            description="Seconds the master keeps serving after SIGTERM while it already "
            "reports `drain` to the agent-check and 503 on `http.readiness_path`, so that "
            "balancers stop sending before the workers drain (set it to the balancer's check "
            "interval; Kubernetes' `preStop` sleep). A second SIGTERM or SIGINT skips the "
            "rest. Only after some worker was ever ready. Keep the unit's `TimeoutStopSec=` "
            "above this plus `graceful_timeout_s`.",
        ),
        Reload.LIVE,
    ] = 0.0
    backoff_initial_s: Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
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
            allow_inf_nan=False,
            gt=0,
            description="A worker that crashes after it has been ready for at least this many "
            "seconds is replaced at once and its slot's failure count starts over; one that "
            "dies sooner adds to the count, which grows the respawn delay.",
        ),
        Reload.ROLLING,
    ] = 1.0
    start_attempts: Annotated[
        int,
        Field(
            strict=True,
            ge=1,
            le=1000,
            description="Failed boots in a row, in every slot, before a master whose first "
            "generation never became ready gives up and exits with status 3 (so systemd's "
            "Restart= and start limit take over); boot failures after the first ready "
            "generation are retried with backoff forever.",
        ),
        Reload.ROLLING,
    ] = 3
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
            description="Add 0..N to `max_requests` per worker, spread by the worker's sequence "
            "number (Knuth's multiplicative hash, not a random draw), so workers started "
            "together do not all retire at once; ignored while `max_requests` is 0.",
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
    proxy_protocol: Annotated[
        bool,
        Field(
            strict=True,
            description="Every connection must begin with a PROXY protocol header (HAProxy "
            "`send-proxy` or `send-proxy-v2`; the version is detected) from a peer in "
            "`proxy_trusted`; its client address becomes the app's (ASGI `client`, WSGI "
            "`REMOTE_ADDR`). A connection without a valid header, or from another peer, is "
            "closed without an answer. On a unix socket every peer is trusted.",
        ),
        Reload.ROLLING,
    ] = False
    proxy_trusted: Annotated[
        list[str],
        Field(
            strict=True,
            description="Addresses and networks (IPv4 or IPv6, CIDR) that may send the "
            "PROXY header on this listener, e.g. the balancers; `0.0.0.0/0` and `::/0` "
            "trust everyone. Only used with `proxy_protocol`.",
            examples=[["10.0.0.0/8", "fd00::/8"]],
        ),
        Constraint("IP addresses or networks"),
        Reload.ROLLING,
    ] = ["127.0.0.1", "::1"]

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
        parse_address(value)
        return value

    @field_validator("mode")
    @classmethod
    def _mode_form(cls, value: str) -> str:
        if not _MODE_RE.match(value):
            raise _fail("listen_mode", 'expected an octal permission string such as "0660"')
        return value

    @field_validator("proxy_trusted")
    @classmethod
    def _trusted_form(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                parse_network(item)
            except ValueError as exc:
                raise _fail("proxy_trusted", str(exc)) from None
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

    @model_validator(mode="after")
    def _someone_trusted(self) -> ListenSettings:
        # Nobody may send the header on a TCP listener: every connection would be refused.
        if (
            self.proxy_protocol
            and not self.proxy_trusted
            and not isinstance(self.parsed(), UnixAddress)
        ):
            raise PydanticCustomError(
                "cross_field",
                "is empty while proxy_protocol is true: every connection would be refused",
                {"at": ("proxy_trusted",)},
            )
        return self

    def parsed(self) -> TcpAddress | UnixAddress:
        """The address as a typed value (already validated, so this cannot fail)."""
        return parse_address(self.address)

    def trusted_networks(self) -> tuple[Network, ...]:
        """``proxy_trusted`` as networks (already validated, so this cannot fail)."""
        return tuple(parse_network(item) for item in self.proxy_trusted)

    @property
    def mode_bits(self) -> int:
        """``mode`` as an integer for ``os.chmod``."""
        return int(self.mode, 8)


_PATH_RE = re.compile(r"^/[!-~]{0,255}$")


def _check_readiness_path(value: str | None) -> str | None:
    if value is not None and (not _PATH_RE.match(value) or "?" in value or "#" in value):
        raise _fail(
            "readiness_path",
            "must start with / and be at most 256 printable ASCII characters, without "
            "spaces, '?' or '#'",
        )
    return value


class HttpSettings(BaseModel):
    """``[http]``: protocol behaviour of the serving engine."""

    model_config = _section_config("[http]")

    keepalive_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
            gt=0,
            le=3600,
            description="Seconds a connection without a request in progress (new, or "
            "between keep-alive requests) is kept open.",
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
    readiness_path: Annotated[
        str | None,
        Field(
            strict=True,
            description="A path every worker answers itself, before the app (any method): "
            "200 `ready` while the master is ready and not drained, 503 with `starting`, "
            "`drained`, `maintenance` or `stopping` otherwise; for Kubernetes' "
            "`readinessProbe`, nginx or HAProxy's `http-check`. Unset means every path "
            "reaches the app.",
            examples=["/-/ready"],
        ),
        Constraint("starts with /, printable ASCII, ≤ 256 bytes"),
        Reload.ROLLING,
    ] = None
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
            "on a lightly loaded pool often puts every connection on one worker; it accepts "
            "in C rather than in Python, which costs less CPU per new connection when few "
            "connections arrive at once (docs/benchmarks.md, new connection per request).",
        ),
        Reload.ROLLING,
    ] = "balanced"
    max_request_line_bytes: Annotated[
        int,
        Field(
            strict=True,
            ge=64,
            le=1048576,
            description="Longest request line (method, target and version, without the "
            "CRLF); a longer one is answered 414 and the connection closed.",
        ),
        Reload.ROLLING,
    ] = 4094
    max_header_fields: Annotated[
        int,
        Field(
            strict=True,
            ge=1,
            le=32768,
            description="Most header fields in a request head; more are answered 431 and the "
            "connection closed.",
        ),
        Reload.ROLLING,
    ] = 100
    max_header_field_bytes: Annotated[
        int,
        Field(
            strict=True,
            ge=64,
            le=1048576,
            description="Largest header field (`Name: value`); a larger one is answered 431 "
            "and the connection closed. A head may never take more memory than these three "
            "limits allow together, however slowly or quickly it arrives.",
        ),
        Reload.ROLLING,
    ] = 8190
    request_head_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
            gt=0,
            le=3600,
            description="Seconds from the first byte of a request head to its end; a head "
            "still incomplete then is answered 408 and the connection closed.",
        ),
        Reload.ROLLING,
    ] = 10.0
    request_body_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
            gt=0,
            le=3600,
            description="Seconds a request body may stall (no byte received while the app "
            "waits for more); then the app's receive() reports a disconnect, the client gets "
            "408 if no response started, and the connection is closed.",
        ),
        Reload.ROLLING,
    ] = 30.0

    @field_validator("readiness_path")
    @classmethod
    def _readiness_path_form(cls, value: str | None) -> str | None:
        return _check_readiness_path(value)


class WebSocketSettings(BaseModel):
    """``[websocket]``: WebSocket connections of ASGI apps (uvicorn's websockets protocol)."""

    model_config = _section_config("[websocket]")

    enabled: Annotated[
        bool,
        Field(
            strict=True,
            description="Accept WebSocket upgrades for ASGI apps; when false, an upgrade "
            "request reaches the app as plain HTTP. WSGI apps never get WebSockets.",
        ),
        Reload.ROLLING,
    ] = True
    max_message_bytes: Annotated[
        int,
        Field(
            strict=True,
            ge=1024,
            le=1 << 30,
            description="Largest incoming message; a larger one closes the connection with "
            "1009 (message too big).",
        ),
        Reload.ROLLING,
    ] = 16 * 1024 * 1024
    ping_interval_s: Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
            ge=0,
            le=3600,
            description="Seconds between pings the server sends on an idle connection; 0 sends "
            "none.",
        ),
        Reload.ROLLING,
    ] = 20.0
    ping_timeout_s: Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
            gt=0,
            le=3600,
            description="Seconds to wait for the pong; without it the connection is closed "
            "with 1011. Only applies while `ping_interval_s` is not 0.",
        ),
        Reload.ROLLING,
    ] = 20.0
    per_message_deflate: Annotated[
        bool,
        Field(
            strict=True,
            description="Offer the permessage-deflate extension (compression, RFC 7692) to "
            "clients that ask for it.",
        ),
        Reload.ROLLING,
    ] = True


class WsgiSettings(BaseModel):
    """``[wsgi]``: how a WSGI app (``app.interface = "wsgi"``) is run in each worker."""

    model_config = _section_config("[wsgi]")

    threads: Annotated[
        int,
        Field(
            strict=True,
            ge=1,
            le=1024,
            description="Threads per worker that run the WSGI app: the requests one worker "
            "serves at the same time. When all of them are stuck in the app for longer than "
            "`workers.heartbeat_timeout_s`, the worker stops heartbeating and is replaced.",
        ),
        Reload.ROLLING,
    ] = 10


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
        return None if value is None else check_socket_path(value, "the control socket path")


class AgentSettings(BaseModel):
    """``[agent]``: the HAProxy agent-check responder the master answers itself."""

    model_config = _section_config("[agent]")

    address: Annotated[
        str | None,
        Field(
            strict=True,
            description="Where the master answers HAProxy's `agent-check` (HOST:PORT or "
            "[IPV6]:PORT, TCP only): each connection gets one line and is closed: "
            "`ready NN%` (NN = ready workers / pool size), `drain` while drained (`appliance "
            "drain`), in the drain delay or stopping, `maint` after `appliance drain --maint`. "
            "Unset means no responder.",
            examples=["127.0.0.1:8099"],
        ),
        Constraint("HOST:PORT, port 0-65535"),
        Reload.RESTART,
    ] = None

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if isinstance(parse_address(value), UnixAddress):
            raise _fail("agent_address", "the agent-check is TCP: expected HOST:PORT")
        return value

    def parsed(self) -> TcpAddress | None:
        """The address as a typed value (already validated), or None when off."""
        if self.address is None:
            return None
        address = parse_address(self.address)
        assert isinstance(address, TcpAddress)
        return address


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
    stream: Annotated[
        Literal["auto", "stderr", "stdout"],
        Field(
            description="Where log lines go (with every format but journal); `auto` is stdout "
            "when the master runs as PID 1 (a container's entrypoint, where the runtime "
            "collects stdout) and stderr otherwise."
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
    websocket: WebSocketSettings = Field(
        default_factory=WebSocketSettings, description="[websocket]"
    )
    wsgi: WsgiSettings = Field(default_factory=WsgiSettings, description="[wsgi]")
    watchdog: WatchdogSettings = Field(default_factory=WatchdogSettings, description="[watchdog]")
    control: ControlSettings = Field(default_factory=ControlSettings, description="[control]")
    agent: AgentSettings = Field(default_factory=AgentSettings, description="[agent]")
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


def iter_settings() -> Iterator[SettingInfo]:
    """Every leaf setting in declaration order (the order of the docs and the example)."""
    return iter_model_settings(Settings)


def resolve_control_path(settings: Settings, env: Mapping[str, str], uid: int) -> str:
    """Where the control socket lives, for the master and for ``appliance status``.

    Both sides must agree without talking to each other, so this is a pure function of the
    config, the environment and the uid. Under systemd ``RuntimeDirectory=appliance`` sets
    ``RUNTIME_DIRECTORY`` (a colon-separated list when several are configured; the first is
    ours). A developer without it gets a per-user directory, never a shared world-writable one.
    An instance (``APPLIANCE_INSTANCE=NAME``, set by ``appliance --instance NAME``) has its own:
    ``RuntimeDirectory=appliance-NAME`` in ``appliance@.service``, and ``appliance-NAME`` in
    place of ``appliance`` in the other defaults.
    """
    if settings.control.path is not None:
        return settings.control.path
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return str(PurePosixPath(runtime, "control.sock"))
    instance = env.get("APPLIANCE_INSTANCE", "")
    name = f"appliance-{instance}" if instance else "appliance"
    if uid == 0:
        return f"/run/{name}/control.sock"
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return str(PurePosixPath(xdg, name, "control.sock"))
    return (
        f"/tmp/appliance-{uid}/{instance}/control.sock"
        if instance
        else f"/tmp/appliance-{uid}/control.sock"
    )
