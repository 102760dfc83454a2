"""Fixtures of the fault suite: a master under test (:class:`faults.Subject`), torn down by
process group whatever happens, and the figures each test records.

``FAULT_REPORT=path`` writes every test's figures there as JSON (scripts/fault-soak does, and
prints them as a table).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faults import Figures, Master, Subject, fault_config, write_config
from harness import short_tmpdir

_FIGURES: list[Figures] = []


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    fig = Figures(test=request.node.name)
    _FIGURES.append(fig)
    return fig


@pytest.fixture
def subject(workdir: Path, figures: Figures) -> Iterator[Callable[..., Subject]]:
    """``subject(config=None, *, ready=True, **Master kwargs)``: start the master on the config
    (default: ``fault_config(workdir)``), wait for READY and take the baseline."""
    started: list[Master] = []

    def start(config: dict[str, Any] | None = None, *, ready: bool = True, **kw: Any) -> Subject:
        cfg = config if config is not None else fault_config(workdir)
        path = write_config(workdir, cfg)
        master = Master(path, **kw)
        started.append(master)
        s = Subject(master, workdir, cfg, figures)
        if ready:
            master.ready()
            s.baseline()
        return s

    yield start
    for m in started:
        m.kill_group()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    fig = getattr(item, "funcargs", {}).get("figures")
    if isinstance(fig, Figures) and (report.when == "call" or report.failed):
        fig.outcome = "failed" if report.failed else report.outcome
        fig.seconds = round(fig.seconds + report.duration, 2)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("FAULT_REPORT")
    if path and _FIGURES:
        Path(path).write_text(json.dumps([asdict(f) for f in _FIGURES], indent=1))
