"""The ``appliance status`` table, from the master's status document (or a confused one)."""

from __future__ import annotations

from control_status_doc import STATUS  # type: ignore[import-not-found]

from appliance.control import format_status


def test_format_status_table() -> None:
    text = format_status(STATUS, now=1_700_000_160.0)
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "running"]
    assert "generation  2" in text
    assert "2 ready / 2 target" in text
    assert (
        "last ok, generation 2, 2 worker(s) replaced, 2023-11-14 22:15:00 UTC (1m00s ago)" in text
    )
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == [
        "ID",
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "REQUESTS",
        "IN-FLIGHT",
        "RSS",
        "MiB",
    ]
    assert table[1].split() == ["0", "201", "2", "ready", "3.2s", "10", "0", "21.5"]
    assert table[2].split() == ["1", "202", "2", "ready", "2h03m", "12345", "3", "22.2"]
    # columns line up
    assert len({len(row) for row in table}) == 1


def test_format_status_failed_reload_and_missing_keys() -> None:
    status = {
        "phase": "reloading",
        "reload": {
            "state": "in_progress",
            "last": {"ok": False, "error": "worker 1 failed to boot", "finished_unix": None},
        },
        "workers": [{"id": 0}],
    }
    text = format_status(status)
    assert "in progress; last FAILED: worker 1 failed to boot" in text
    assert "- ready / - target" in text
    assert text.splitlines()[-1].split()[:4] == ["0", "-", "-", "-"]


def test_format_status_empty() -> None:
    text = format_status({})
    assert "reload      -" in text
    assert "none since start" in format_status({"reload": {"state": "idle", "last": None}})
    assert text.endswith("no workers")


def test_format_status_survives_numbers_json_allows() -> None:
    """Python's JSON decoder accepts NaN, Infinity and huge ints; none of them may crash."""
    status = {
        "started_at_unix": float("inf"),
        "reload": {"last": {"ok": True, "generation": 1, "finished_unix": 1e300}},
        "workers": [
            {"id": 0, "uptime_s": float("nan")},
            {"id": 1, "uptime_s": float("inf")},
            {"id": 2, "uptime_s": 10**400},
            {"id": 3, "uptime_s": True},
        ],
    }
    text = format_status(status, now=1_700_000_000.0)
    assert "started" not in text
    assert "last ok, generation 1" in text
    rows = [line.split() for line in text.splitlines()[-4:]]
    assert rows == [[str(n), *["-"] * 7] for n in range(4)]  # UPTIME is "-" too
