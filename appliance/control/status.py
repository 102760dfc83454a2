"""The ``appliance status`` table: the master's status document rendered for people.

Pure and tolerant: the document comes from another process (maybe another version), so every
missing or odd-typed key shows as ``-`` instead of failing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["format_status"]


def _number(value: object) -> float | None:
    """*value* as a finite number, or None (JSON from a peer may hold NaN, Infinity, or 1e999)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _human_duration(value: object) -> str:
    seconds = _number(value)
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(seconds)
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _when(value: object, now: float | None) -> str:
    unix = _number(value)
    if unix is None:
        return ""
    try:
        text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
    except (OverflowError, OSError, ValueError):  # beyond the platform's time_t
        return ""
    if now is not None:
        text += f" ({_human_duration(max(0.0, now - unix))} ago)"
    return text


def _reload_line(reload: object, now: float | None) -> str:
    if not isinstance(reload, Mapping):
        return "-"
    parts: list[str] = []
    if reload.get("state") == "in_progress":
        text = "in progress"
        if reload.get("generation") is not None:
            text += (
                f": generation {_cell(reload.get('generation'))}, "
                f"{_cell(reload.get('replaced'))}/{_cell(reload.get('total'))} workers replaced"
            )
        parts.append(text)
    last = reload.get("last")
    if isinstance(last, Mapping):
        when = _when(last.get("finished_unix"), now)
        if last.get("ok"):
            text = f"last ok, generation {_cell(last.get('generation'))}"
            if last.get("replaced") is not None:
                text += f", {_cell(last.get('replaced'))} worker(s) replaced"
            elif last.get("message"):
                text += f" ({last.get('message')})"
        else:
            text = f"last FAILED: {_cell(last.get('error'))}"
        if when:
            text += f", {when}"
        parts.append(text)
    elif not parts:
        parts.append("none since start")
    return "; ".join(parts)


_COLUMNS = (
    ("ID", "id"),
    ("PID", "pid"),
    ("GEN", "generation"),
    ("STATE", "state"),
    ("UPTIME", "uptime_s"),
    ("REQUESTS", "requests"),
    ("IN-FLIGHT", "in_flight"),
    ("RSS MiB", "rss_mb"),
)


def format_status(status: Mapping[str, Any], *, now: float | None = None) -> str:
    """Render the ``status`` reply as the ``appliance status`` table; missing keys show as -.

    *now* (unix time) adds "... ago" to the last reload; omitted, times are absolute.
    """
    header = [
        ("phase", _cell(status.get("phase"))),
        ("master pid", _cell(status.get("pid"))),
        ("generation", _cell(status.get("generation"))),
        ("workers", f"{_cell(status.get('ready'))} ready / {_cell(status.get('target'))} target"),
        ("config", _cell(status.get("config_digest"))),
        ("reload", _reload_line(status.get("reload"), now)),
    ]
    balancer = status.get("balancer")
    if isinstance(balancer, Mapping):
        agent, readiness = _cell(balancer.get("agent")), _cell(balancer.get("readiness"))
        header.append(("balancers", f"agent-check {agent}, readiness {readiness}"))
    started = _when(status.get("started_at_unix"), now)
    if started:
        header.insert(2, ("started", started))
    width = max(len(label) for label, _ in header)
    lines = [f"{label:<{width}}  {value}" for label, value in header]

    workers = status.get("workers")
    rows: list[list[str]] = []
    if isinstance(workers, list):
        for worker in workers:
            if not isinstance(worker, Mapping):
                continue
            rows.append(
                [
                    _human_duration(worker.get("uptime_s"))
                    if key == "uptime_s"
                    else _cell(worker.get(key))
                    for _title, key in _COLUMNS
                ]
            )
    lines.append("")
    if not rows:
        lines.append("no workers")
        return "\n".join(lines)
    titles = [title for title, _ in _COLUMNS]
    widths = [max(len(titles[i]), *(len(row[i]) for row in rows)) for i in range(len(titles))]
    numeric = {"id", "pid", "generation", "uptime_s", "requests", "in_flight", "rss_mb"}

    def fmt(cells: list[str]) -> str:
        out = []
        for (_, key), cell, w in zip(_COLUMNS, cells, widths, strict=True):
            out.append(cell.rjust(w) if key in numeric else cell.ljust(w))
        return "  ".join(out).rstrip()

    lines.append(fmt(titles))
    lines.extend(fmt(row) for row in rows)
    return "\n".join(lines)
