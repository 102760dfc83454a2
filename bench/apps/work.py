"""The fixed CPU work of the ``cpu`` app: about 2 ms of pure-Python arithmetic on the bench
machine (17,000 iterations; node/app.js runs the same loop)."""

CPU_ITERATIONS = 17_000


def cpu_work(n: int = CPU_ITERATIONS) -> int:
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x
