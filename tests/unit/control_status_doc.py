"""A status document as the master sends it, shared by the control tests."""

from __future__ import annotations

from typing import Any

STATUS: dict[str, Any] = {
    "phase": "running",
    "generation": 2,
    "target": 2,
    "ready": 2,
    "pid": 123,
    "config_digest": "abc123",
    "started_at_unix": 1_700_000_000.0,
    "workers": [
        {
            "id": 0,
            "pid": 201,
            "generation": 2,
            "state": "ready",
            "uptime_s": 3.2,
            "requests": 10,
            "in_flight": 0,
            "rss_mb": 21.5,
        },
        {
            "id": 1,
            "pid": 202,
            "generation": 2,
            "state": "ready",
            "uptime_s": 7384.0,
            "requests": 12345,
            "in_flight": 3,
            "rss_mb": 22.25,
        },
    ],
    "reload": {
        "state": "idle",
        "last": {
            "ok": True,
            "generation": 2,
            "error": None,
            "finished_unix": 1_700_000_100.0,
            "replaced": 2,
        },
    },
}
