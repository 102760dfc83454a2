"""The error for a malformed systemd variable, in a module of its own.

It lives apart from :mod:`appliance.systemd` because :mod:`appliance.journal` raises it too
(a malformed ``JOURNAL_STREAM``), and importing the logging side must not import sdnotify,
which :mod:`appliance.systemd` does: a worker's module namespace belongs to the application
(soon from its own virtualenv), so appliance's own dependencies stay out of it.
:mod:`appliance.systemd` re-exports the class; callers catch it as
``appliance.systemd.SystemdEnvError``.
"""

from __future__ import annotations

__all__ = ["SystemdEnvError"]


class SystemdEnvError(ValueError):
    """A systemd variable is present but cannot be understood, or disagrees with the config."""
