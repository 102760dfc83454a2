"""The master's signals: handlers that do nothing, and a pipe that carries them to the loop.

``signal.set_wakeup_fd`` writes each signal's number into a pipe the master's selector
watches; the Python-level handlers are empty. :meth:`SignalPipe.install_early` runs first thing
in ``appliance serve``, before the config is read and long before the loop starts: a SIGHUP
(or SIGTTIN/SIGTTOU) in that window would otherwise hit the default action and kill the
process silently. It is kept in the pipe and handled when the loop starts. SIGTERM and SIGINT
keep their default action until then: before the first fork there is nothing to drain, and
a master stuck importing an app must still stop when told.
"""

from __future__ import annotations

import os
import signal

__all__ = ["EARLY", "HANDLED", "SignalPipe"]

#: Signals whose default action (terminate) is wrong at any time for the master.
EARLY = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
#: Everything the loop handles.
HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


def _noop(_signo: int, _frame: object) -> None:
    """Signal handlers do nothing: the wakeup fd carries the signal to the loop."""


class SignalPipe:
    """A non-blocking pipe that receives the number of every handled signal."""

    __slots__ = ("read_fd", "write_fd")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def _install(self, signals: tuple[signal.Signals, ...]) -> None:
        for sig in signals:
            signal.signal(sig, _noop)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)

    def install_early(self) -> None:
        self._install(EARLY)

    def install(self) -> None:
        self._install(HANDLED)

    def read(self) -> bytes:
        """The signal numbers that arrived since the last read (possibly none)."""
        try:
            return os.read(self.read_fd, 512)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
