from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Master, NotifySocket, base_config, short_tmpdir, write_config  # noqa: E402


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def notify(workdir: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(workdir)
    yield sock
    sock.close()


@pytest.fixture
def start_master(workdir: Path) -> Iterator[Callable[..., Master]]:
    """Start ``appliance serve`` with a test config (merged over base_config)."""
    started: list[Master] = []

    def start(config: dict[str, Any] | None = None, **kw: Any) -> Master:
        cfg = config if config is not None else base_config(workdir)
        path = write_config(workdir, cfg)
        master = Master(path, **kw)
        started.append(master)
        return master

    yield start
    for m in started:
        m.kill_group()
