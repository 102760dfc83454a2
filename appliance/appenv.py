"""The app's own environment: its virtualenv, extra import paths and variables.

An app is a guest with its own packages. Its versions must win over ours, so before it is
imported (in the generation's template process, see :mod:`appliance.worker.template`):

1. every module appliance loaded for itself (pydantic, the config, the control socket,
   sd_notify...) is dropped from ``sys.modules``: the app's ``import pydantic`` then finds
   *its* pydantic (or, if it brings none, a fresh copy of appliance's, from the same files).
   The objects appliance already holds keep working through their references.
2. ``sys.path`` starts with ``app.directory``, then ``app.python_path``, then the virtualenv's
   site-packages (with its ``.pth`` files), then what appliance itself runs from.
3. ``app.env`` is set, plus ``VIRTUAL_ENV`` and the venv's ``bin`` first on ``PATH`` as
   ``activate`` would, for subprocesses the app starts.

Only the serving engine is shared (:data:`ENGINE`): uvicorn, uvloop, httptools, websockets and what
they import are already loaded when the app is imported, so an app venv's own copies of them
are not used. That is reported once per generation (``app.engine_shadowed``).

:func:`resolve` checks the settings against the disk (one line per problem, naming the setting,
the path and both Python versions) and is used by ``appliance check``, at start and on reload;
:func:`enter` applies the result in the child.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import site
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config.schema import AppSettings

__all__ = [
    "ENGINE",
    "AppEnvError",
    "AppEnvironment",
    "check_findable",
    "engine_versions",
    "enter",
    "foreign_modules",
    "parse_pyvenv_cfg",
    "resolve",
    "shadowed_engine",
]

#: Top-level packages of the serving engine, shared with the app (loaded before it).
ENGINE = frozenset({"uvicorn", "uvloop", "httptools", "h11", "click", "websockets", "wsproto"})
#: appliance's own modules a worker needs; every other ``appliance.*`` module is the master's.
_WORKER_SIDE = ("appliance.worker", "appliance.engines", "appliance.http", "appliance.apps")
_WORKER_MODULES = frozenset(
    {"appliance", "appliance.log", "appliance.journal", "appliance.importer", "appliance.appenv"}
)
_VERSION = re.compile(r"^(\d+)\.(\d+)")


class AppEnvError(Exception):
    """The app's environment cannot be used; the message is one line naming the setting."""


@dataclass(frozen=True, slots=True)
class AppEnvironment:
    """What :func:`enter` does, decided up front (plain data: it crosses ``fork()``)."""

    paths: tuple[str, ...] = ()  # before everything else on sys.path, in order
    site_dir: str | None = None  # the venv's site-packages (with .pth processing)
    virtualenv: str | None = None
    #: ``include-system-site-packages = true``: the system's packages come after the venv's.
    system_site: bool = False
    env: Mapping[str, str] = field(default_factory=dict)


def parse_pyvenv_cfg(text: str) -> dict[str, str]:
    """``key = value`` lines of a ``pyvenv.cfg`` (keys lower-cased; junk lines ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def _venv_version(cfg: Mapping[str, str]) -> tuple[int, int] | None:
    for key in ("version_info", "version"):
        match = _VERSION.match(cfg.get(key, ""))
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def resolve(
    app: AppSettings, *, python: tuple[int, int] = (sys.version_info[0], sys.version_info[1])
) -> AppEnvironment:
    """Check ``app.virtualenv`` and ``app.python_path`` on disk; :class:`AppEnvError` if unusable."""
    site_dir = None
    system_site = False
    if app.virtualenv is not None:
        venv = Path(app.virtualenv)
        cfg_path = venv / "pyvenv.cfg"
        try:
            text = cfg_path.read_text(encoding="utf-8", errors="replace")[:65536]
        except FileNotFoundError:
            what = "does not exist" if not venv.exists() else "is not a virtualenv (no pyvenv.cfg)"
            raise AppEnvError(f"app.virtualenv: {venv} {what}") from None
        except OSError as exc:
            raise AppEnvError(f"app.virtualenv: cannot read {cfg_path}: {exc.strerror}") from None
        version = _venv_version(parse_pyvenv_cfg(text))
        running = f"{python[0]}.{python[1]}"
        if version is None:
            raise AppEnvError(f"app.virtualenv: {cfg_path} names no Python version")
        if version != python:
            made = f"{version[0]}.{version[1]}"
            raise AppEnvError(
                f"app.virtualenv: {venv} was made with Python {made}, but appliance runs on "
                f"Python {running}: recreate it with python{running} -m venv {venv}"
            )
        site_path = venv / "lib" / f"python{running}" / "site-packages"
        if not site_path.is_dir():
            raise AppEnvError(f"app.virtualenv: {venv} has no {site_path}")
        site_dir = str(site_path)
        system_site = (
            parse_pyvenv_cfg(text).get("include-system-site-packages", "").lower() == "true"
        )
    for index, path in enumerate(app.python_path):
        if not Path(path).is_dir():
            raise AppEnvError(f"app.python_path[{index}]: {path} is not a directory")
    paths = tuple(app.python_path)
    if app.directory is not None:
        paths = (app.directory, *paths)
    return AppEnvironment(
        paths=paths,
        site_dir=site_dir,
        virtualenv=app.virtualenv,
        env=dict(app.env),
        system_site=system_site,
    )


def check_findable(environment: AppEnvironment, target: str) -> None:
    """Fail early when the top-level package of ``app.target`` is nowhere on the app's path.

    Only the top level: finding ``pkg.module`` would import ``pkg`` and run app code, which
    never happens in the master. The template process checks the rest.
    """
    module = target.partition(":")[0]
    top = module.partition(".")[0]
    search = [*environment.paths, *([environment.site_dir] if environment.site_dir else [])]
    search += [os.getcwd()] if not environment.paths else []
    search += [p for p in sys.path if p]
    if top in sys.builtin_module_names or top in sys.modules:
        return
    found = importlib.machinery.PathFinder.find_spec(top, search) is not None
    if not found:
        # Finders beyond sys.path (an editable install's hook): a top-level lookup runs no code.
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
    if not found:
        where = environment.paths[0] if environment.paths else os.getcwd()
        raise AppEnvError(
            f'app.target "{target}": no module named "{top}" (searched the app directory '
            f"{where}, app.python_path, the virtualenv and the installed packages)"
        )


def _is_ours(name: str) -> bool:
    """A module the worker side keeps: the stdlib, the engine, appliance's worker half."""
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names or top in ENGINE or top.startswith("_"):
        return True
    if top != "appliance":
        return False
    return name in _WORKER_MODULES or name.startswith(_WORKER_SIDE)


def foreign_modules(names: Iterable[str]) -> list[str]:
    """Of ``names`` (``sys.modules``), those to drop before the app is imported: everything
    but the stdlib, the engine and appliance's worker half (pure)."""
    return [name for name in names if not _is_ours(name)]


def engine_versions() -> dict[str, str]:
    """The versions of the engine packages appliance runs with (call before :func:`enter`)."""
    from importlib import metadata

    found: dict[str, str] = {}
    for name in ENGINE:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def shadowed_engine(site_dir: str, ours: Mapping[str, str] | None = None) -> dict[str, str]:
    """Engine packages the venv has its own copy of, ``{name: its version}`` from dist-info;
    with ``ours``, only those whose version differs from appliance's."""
    found: dict[str, str] = {}
    try:
        entries = os.listdir(site_dir)
    except OSError:
        return found
    for entry in entries:
        if not entry.endswith(".dist-info"):
            continue
        name, _, version = entry.removesuffix(".dist-info").partition("-")
        key = name.lower().replace("-", "_")
        if key in ENGINE and (ours is None or ours.get(key) != version):
            found[key] = version
    return found


def enter(environment: AppEnvironment) -> None:
    """Make this process the app's: drop appliance's own modules, then paths and variables.

    Runs in a child only (the template process), never in the master.
    """
    if environment.site_dir is not None:
        before = list(sys.path)
        site.addsitedir(environment.site_dir)  # also runs its .pth files (editable installs)
        if environment.system_site:
            # As the venv's own interpreter would: the base Python's packages after the venv's
            # (on Debian, /usr/lib/python3/dist-packages and friends).
            for path in site.getsitepackages([sys.base_prefix]):
                site.addsitedir(path)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before
    for name in foreign_modules(list(sys.modules)):
        del sys.modules[name]
    sys.path[:0] = [p for p in environment.paths if p not in sys.path[: len(environment.paths)]]
    os.environ.update(environment.env)
    if environment.virtualenv is not None:
        os.environ["VIRTUAL_ENV"] = environment.virtualenv
        bin_dir = os.path.join(environment.virtualenv, "bin")
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        python = os.path.join(bin_dir, "python")
        if os.access(python, os.X_OK):
            # What the app starts with sys.executable (multiprocessing's spawn, subprocesses)
            # gets the app's packages, not appliance's.
            sys.executable = python
