"""The master's numeric rules: pure functions of their inputs, each with the reason it is so.

Every number the policy decides with (how long to wait before a respawn, how many requests a
worker may serve, when a stall of the master itself excuses a missed heartbeat, when a start
has failed for good) is computed here, so each rule can be read and tested on its own.
"""

from __future__ import annotations

__all__ = [
    "EXIT_START_FAILED",
    "HANG_DUMP_GRACE_S",
    "KILL_RESEND_S",
    "MAX_POOL",
    "STALL_THRESHOLD_S",
    "STATUS_DETAIL_MAX",
    "clamp_detail",
    "failures_after",
    "gives_up",
    "max_requests_for",
    "respawn_delay",
    "stall_seconds",
]

#: Time between asking a hung worker for its stack (SIGUSR1) and SIGKILL: long enough for
#: faulthandler to write a few hundred frames, short enough not to matter to anyone waiting.
HANG_DUMP_GRACE_S = 1.0
#: A worker sent SIGKILL that has not been reaped after this long gets SIGKILL again (and a
#: log line): a lost signal must never leave a process the master believes is dying.
KILL_RESEND_S = 5.0
#: Upper bound for ``appliance scale`` / SIGTTIN, matching the schema's limit on workers.count.
MAX_POOL = 1024
#: A master that could not read its pipes for longer than this (SIGSTOP, suspend, a slow step)
#: forgives the heartbeats it missed meanwhile. Below it, jitter of the loop is not worth a
#: log line; heartbeat timeouts are seconds, so it can never hide a real hang.
STALL_THRESHOLD_S = 0.25
#: Longest error text the master carries into STATUS=, status and log lines.
STATUS_DETAIL_MAX = 300
#: ``appliance serve`` exits with this status when the first generation could never boot
#: (gunicorn's WORKER_BOOT_ERROR): systemd's ``Restart=`` and start limit decide what next.
EXIT_START_FAILED = 3


def respawn_delay(failures: int, initial_s: float, maximum_s: float) -> float:
    """Delay before respawning a slot after its ``failures``-th failure in a row.

    The first failure is replaced at once: one crash after a healthy run is an accident, and
    the replacement should answer within milliseconds. From the second on the delay doubles
    from ``initial_s`` up to ``maximum_s``, so an app that raises at import costs a few forks a
    second at first and one every ``maximum_s`` after that: never a hot loop. No jitter: the
    slots of one master are not a thundering herd against a shared resource.
    """
    if failures <= 1:
        return 0.0
    return min(maximum_s, initial_s * 2.0 ** (failures - 2))


def failures_after(previous: int, *, ready_for_s: float | None, reset_s: float) -> int:
    """The slot's failure count after a worker died unexpectedly.

    ``ready_for_s`` is how long the worker had been ready (None: it never was). A worker that
    served for at least ``reset_s`` died of something other than booting (a kill, a crash in a
    request): its replacement is due at once and the count starts over, however many such
    deaths came before. Only deaths at or shortly after boot grow the backoff.
    """
    if ready_for_s is not None and ready_for_s >= reset_s:
        return 1
    return previous + 1


def max_requests_for(key: int, max_requests: int, jitter: int) -> int:
    """This worker's request budget: ``max_requests`` plus a per-worker spread in ``[0, jitter]``.

    The spread is derived from the worker key (Knuth's multiplicative hash) rather than a random
    generator, so the policy stays deterministic while workers spawned together still retire at
    different times.
    """
    if max_requests <= 0:
        return 0
    if jitter <= 0:
        return max_requests
    return max_requests + (key * 2654435761) % (jitter + 1)


def gives_up(*, ever_ready: bool, boot_failures: list[int], attempts: int) -> bool:
    """Whether a master that never served should stop trying and exit.

    Only before anything was ever ready: once a generation served, a failing boot is a reload
    or crash problem and the old workers (or retries with backoff) are the better answer. Then
    every slot must have failed ``attempts`` boots in a row, so one flaky slot is not enough.
    """
    return not ever_ready and bool(boot_failures) and min(boot_failures) >= attempts


def stall_seconds(
    *, deaf_since: float, wait_started: float, timeout: float | None, now: float
) -> float:
    """How long the master was unable to hear its workers, minus what it chose to wait.

    ``deaf_since`` is when the previous wait returned, ``wait_started`` when this one began
    (the time between was spent processing), ``timeout`` what this wait was allowed to take.
    A wait that returned later than its timeout (the process was stopped or the host
    suspended) adds the overshoot. Returns 0 below :data:`STALL_THRESHOLD_S`.
    """
    busy = max(0.0, wait_started - deaf_since)
    overshoot = 0.0 if timeout is None else max(0.0, now - wait_started - timeout)
    stalled = busy + overshoot
    return stalled if stalled >= STALL_THRESHOLD_S else 0.0


def clamp_detail(text: str, limit: int = STATUS_DETAIL_MAX) -> str:
    """One line of at most ``limit`` characters, for texts that come from outside (an app's
    boot error, a config problem) and end up in STATUS= or a status table."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    return line[: limit - 1].rstrip() + "…"
