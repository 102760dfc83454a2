"""Every event name the code logs is documented in docs/events.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EVENT = re.compile(r'"((?:master|worker|reload|pool|notify|template)\.[a-z_]+)"')


def test_every_logged_event_is_documented() -> None:
    doc = (ROOT / "docs" / "events.md").read_text()
    names = {
        name
        for path in (ROOT / "appliance").rglob("*.py")
        for name in EVENT.findall(path.read_text())
    }
    assert len(names) > 20
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert missing == []
