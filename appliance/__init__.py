"""appliance: a systemd-native, config-driven pre-fork server for Python ASGI and WSGI apps."""

from __future__ import annotations

__all__ = ["__version__"]

# The one place the version is written: pyproject.toml reads it (dynamic = ["version"]), the
# .deb's version is derived from it by scripts/build-deb, and `appliance --version` and the
# journal's VERSION= field print it.
__version__ = "0.1.1"
