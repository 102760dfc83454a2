"""The control socket: ``appliance status|reload|scale|drain|undrain`` talk to the running master.

Transport: a unix stream socket, mode 0600 (only the service user and root may connect), in
a directory we create 0700 when it is missing. The package is split by role:

* :mod:`.protocol` opens with the frame format and owns every message: request parsing and
  the reply builders (the only place a reply dict is written), encoding and decoding;
* :mod:`.server` is the master's non-blocking half (:class:`ControlServer`,
  :class:`ControlConn`, whose docstring states who closes what);
* :mod:`.client` is the CLI's blocking half (:class:`ControlClient`);
* :mod:`.status` renders the status document as the ``appliance status`` table;
* :mod:`.locate` finds the socket for the CLI (``--control``, ``$APPLIANCE_CONTROL``, the
  config read leniently); it needs the config schema, so it is not imported here.
"""

from __future__ import annotations

from appliance.control.client import ControlClient, ControlUnavailable
from appliance.control.protocol import (
    COMMANDS,
    MAX_CLIENT_LINE,
    MAX_LINE,
    MAX_REPLY_LINE,
    MAX_TEXT,
    BadRequest,
    ControlError,
    Request,
    bound_text,
    decode_reply,
    drain_reply,
    encode_line,
    encode_request,
    error_reply,
    is_final,
    ok_reply,
    parse_request,
    progress_reply,
    reload_ok_reply,
    reload_progress,
    scale_reply,
    status_reply,
)
from appliance.control.server import ControlConn, ControlServer, PeerCred
from appliance.control.status import format_status

__all__ = [
    "COMMANDS",
    "MAX_CLIENT_LINE",
    "MAX_LINE",
    "MAX_REPLY_LINE",
    "MAX_TEXT",
    "BadRequest",
    "ControlClient",
    "ControlConn",
    "ControlError",
    "ControlServer",
    "ControlUnavailable",
    "PeerCred",
    "Request",
    "bound_text",
    "decode_reply",
    "drain_reply",
    "encode_line",
    "encode_request",
    "error_reply",
    "format_status",
    "is_final",
    "ok_reply",
    "parse_request",
    "progress_reply",
    "reload_ok_reply",
    "reload_progress",
    "scale_reply",
    "status_reply",
]
