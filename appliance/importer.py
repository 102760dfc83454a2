"""Finding and importing the configured app (``module:attr``), the way gunicorn and uvicorn do.

``check_importable`` runs in the master when the app is *not* preloaded: it finds the module
without executing it, so a typo fails ``appliance serve`` before anything is forked, while the
module's code still runs only in the workers (fresh on every reload).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

__all__ = ["AppImportError", "add_app_directory", "check_importable", "import_app"]


class AppImportError(Exception):
    """The app named by ``app.target`` cannot be found or loaded; the message is one line."""


def add_app_directory(directory: str | None) -> str:
    """Put the app directory (default: the working directory) first on ``sys.path``."""
    path = os.path.abspath(directory or os.getcwd())
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def _split(target: str) -> tuple[str, str]:
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise AppImportError(f'app.target "{target}" must look like "package.module:attribute"')
    return module, attr


def check_importable(target: str, directory: str | None) -> None:
    """Fail early (without running app code) when ``target``'s module cannot be found."""
    module, _ = _split(target)
    add_app_directory(directory)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:  # a parent package failed to import
        raise AppImportError(f'app.target "{target}": {type(exc).__name__}: {exc}') from exc
    if spec is None:
        where = directory or os.getcwd()
        raise AppImportError(
            f'app.target "{target}": no module named "{module}" (searched the app directory '
            f"{where} and the installed packages)"
        )


def import_app(target: str, directory: str | None) -> Any:
    """Import ``module:attr`` and return the attribute (dotted attributes are followed)."""
    module_name, attr = _split(target)
    add_app_directory(directory)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise AppImportError(
            f'app.target "{target}": importing {module_name} raised {type(exc).__name__}: {exc}'
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppImportError(
                f'app.target "{target}": module "{module_name}" has no attribute "{attr}"'
            ) from None
    if not callable(obj):
        raise AppImportError(f'app.target "{target}" is not callable (got {type(obj).__name__})')
    return obj
