"""The CPU work of the ``cpu`` app: a loop of pure-Python arithmetic (node/app.js runs the same
loop).

Its length is set to *time*, not to a fixed count: the harness measures the loop at start and
passes, in ``BENCH_CPU_ITERATIONS``, the iteration count that takes ``CPU_TARGET_MS`` on this
machine (see ``bench.harness.calibrate_cpu_work``). A fixed count took 2.9 ms on one bench
host and 1 ms on another; on the faster one the Python load generator's share of the two cores
grew by as much, and the cpu scenario's spread and scaling measured the client, not the server.
"""

import os

#: What one request of the cpu app should cost in the worker, in ms.
CPU_TARGET_MS = 3.0
#: The loop's length when nothing calibrated it (about 2 ms on the first bench machine).
DEFAULT_ITERATIONS = 17_000
CPU_ITERATIONS = int(os.environ.get("BENCH_CPU_ITERATIONS") or DEFAULT_ITERATIONS)


def cpu_work(n: int = CPU_ITERATIONS) -> int:
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x
