"""The benchmark harness: stdlib-only client and harness, apps, peers (see docs/benchmarks.md)."""
