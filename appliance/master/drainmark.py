"""An operator's drain outlives a restart of the service: the drain mark.

``appliance drain`` is the first step of "drain, upgrade, undrain": the upgrade restarts the
service (the package's ``try-restart``), and the new master must keep telling balancers
``drain`` (or ``maint``) until ``appliance undrain``, or the host would rejoin at full weight
before the operator checked it. So the master keeps the operator's word in a file beside its
control socket, ``control.sock.drained``, holding ``drain`` or ``maint``, and a master that
starts and finds one starts drained. The units keep their runtime directory across restarts
(``RuntimeDirectoryPreserve=restart``), and only across restarts: ``systemctl stop`` or a
reboot forgets it.

Reading is pure (:func:`parse`); the master's runtime writes and removes the file.
"""

from __future__ import annotations

import enum

__all__ = ["Mark", "parse", "path_for", "render"]


class Mark(enum.Enum):
    DRAIN = "drain"
    MAINT = "maint"


def path_for(control_path: str) -> str:
    return control_path + ".drained"


def parse(text: str) -> Mark | None:
    """The mark a file holds; None for anything else (an empty or foreign file is no drain)."""
    word = text.strip()
    for mark in Mark:
        if word == mark.value:
            return mark
    return None


def render(mark: Mark) -> str:
    return mark.value + "\n"
