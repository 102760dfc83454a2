"""What a generation's workers serve with: plain data the master fills from the settings.

Its own module, free of the engine's imports, so the master can build it (for a template it
hands a spec to, see :mod:`appliance.worker.template`) without loading uvicorn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.http.proxy import ProxyPolicy
from appliance.http.rules import HeadLimits

__all__ = ["EngineSettings"]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    interface: str = "asgi"
    lifespan: Literal["auto", "on", "off"] = "auto"
    keepalive_timeout_s: float = 5.0
    limit_concurrency: int | None = None
    access_log: bool = False
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    graceful_timeout_s: float = 30.0
    heartbeat_interval_s: float = 1.0
    accept: str = "balanced"
    max_request_line_bytes: int = 4094
    max_header_fields: int = 100
    max_header_field_bytes: int = 8190
    request_head_timeout_s: float = 10.0
    request_body_timeout_s: float = 30.0
    websocket: bool = True
    websocket_max_message_bytes: int = 16 * 1024 * 1024
    #: 0 disables pings (and so the ping timeout).
    websocket_ping_interval_s: float = 20.0
    websocket_ping_timeout_s: float = 20.0
    websocket_per_message_deflate: bool = True
    wsgi_threads: int = 10
    heartbeat_timeout_s: float = 30.0
    #: Answered by the worker itself, before the app (``http.readiness_path``); None: off.
    readiness_path: str | None = None
    #: One entry per listening socket, in the order of the sockets: the PROXY protocol
    #: policy of its listener, or None when it has no ``proxy_protocol``. Empty: none has.
    proxy: tuple[ProxyPolicy | None, ...] = ()

    @property
    def head_limits(self) -> HeadLimits:
        return HeadLimits(
            max_request_line_bytes=self.max_request_line_bytes,
            max_header_fields=self.max_header_fields,
            max_header_field_bytes=self.max_header_field_bytes,
        )
