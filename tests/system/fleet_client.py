"""The fleet test's client loop (stdlib only), run in the fleet's network namespace: one thread
per user sends ``GET /hit/USER`` through the balancer, one request after the other, until
STOPFILE exists (or MAX_SECONDS passed), at most RATE requests per second each (0: as fast as
the answers come; a paced load leaves the machine's cores to the operations under test). Even users keep their connection to the balancer
alive (HTTP/1.1 keep-alive), odd users open one connection per request.

Every failure counts: a connection error, a timeout, a status other than 200, an answer that
is not the app's, and a wrong counter. The counter is per user and only this thread
increments it, so each answer must be the previous one plus 1. After a failed request the
client cannot know whether the app's increment happened (the app may have answered into a
connection that then broke): the next answer may then be 1 higher per such failure; those
increments are counted in ``applied_by_failed`` so that the Redis value can be checked
exactly (Redis == ok + applied_by_failed, give or take ``uncertain`` failures at the end).

Progress and the final result go to OUTFILE as JSON (rewritten atomically), with per-host
and per-worker counts and wall-clock times of the first and last answer of each, so the test
can tell when a host stopped and resumed answering.

usage: python3 fleet_client.py HOST PORT USERS PREFIX STOPFILE OUTFILE [MAX_SECONDS [RATE]]
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time

host, port, users, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stopfile, outfile = sys.argv[5], sys.argv[6]
max_seconds = float(sys.argv[7]) if len(sys.argv) > 7 else 600.0
rate = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
deadline = time.monotonic() + max_seconds
lock = threading.Lock()
state: dict = {
    "ok": 0, "failed": 0, "wrong": 0, "errors": [], "users": {}, "hosts": {}, "workers": {},
    "clients": {}, "max_latency_s": 0.0, "started": time.time(), "done": False,
}


def record_ok(user: dict, info: dict, latency: float, now: float) -> None:
    state["ok"] += 1
    user["ok"] += 1
    state["max_latency_s"] = max(state["max_latency_s"], latency)
    for table, key in (("hosts", str(info.get("host"))),
                       ("workers", f"{info.get('host')}/{info.get('pid')}")):
        entry = state[table].setdefault(key, {"ok": 0, "first": now, "last": now})
        entry["ok"] += 1
        entry["last"] = now
    client = str(info.get("client"))
    state["clients"][client] = state["clients"].get(client, 0) + 1


def record_failure(user: dict, err: str, now: float) -> None:
    state["failed"] += 1
    user["failed"] += 1
    if len(state["errors"]) < 50:
        state["errors"].append(f"{now:.3f} {user['name']}: {err}")


def client(name: str, keepalive: bool) -> None:
    user = {"name": name, "ok": 0, "failed": 0, "last": 0, "uncertain": 0,
            "applied_by_failed": 0, "keepalive": keepalive}
    with lock:
        state["users"][name] = user
    conn: http.client.HTTPConnection | None = None
    due = time.monotonic()
    while not os.path.exists(stopfile) and time.monotonic() < deadline:
        if rate > 0:   # pacing the load, not waiting for an event
            due += 1 / rate
            time.sleep(max(0.0, due - time.monotonic()))
            due = max(due, time.monotonic() - 1)
        err, info, t0 = None, {}, time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=30)
            headers = {} if keepalive else {"Connection": "close"}
            conn.request("GET", f"/hit/{name}", headers=headers)
            response = conn.getresponse()
            body = response.read()
            if not keepalive or response.will_close:
                conn.close()
                conn = None
            if response.status != 200:
                err = f"HTTP {response.status}: {body[:200]!r}"
            else:
                info = json.loads(body)
                if not isinstance(info, dict) or info.get("user") != name:
                    err = f"not the app's answer: {body[:200]!r}"
        except Exception as e:  # noqa: BLE001 - every failure counts
            err = f"{type(e).__name__}: {e}"
            if conn is not None:
                conn.close()
                conn = None
        now, latency = time.time(), time.monotonic() - t0
        with lock:
            if err is not None:
                user["uncertain"] += 1
                record_failure(user, err, now)
                continue
            count = info.get("count")
            expected = user["last"] + 1
            if not isinstance(count, int) or not expected <= count <= expected + user["uncertain"]:
                state["wrong"] += 1
                record_failure(user, f"wrong counter {count!r}, expected {expected}"
                               + (f"..{expected + user['uncertain']}" if user["uncertain"] else ""),
                               now)
                user["last"] = count if isinstance(count, int) else user["last"]
                user["uncertain"] = 0
                continue
            user["applied_by_failed"] += count - expected
            user["last"], user["uncertain"] = count, 0
            record_ok(user, info, latency, now)
    if conn is not None:
        conn.close()


def dump() -> None:
    with lock:
        data = json.dumps(state)
    tmp = outfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, outfile)


threads = [threading.Thread(target=client, args=(f"{prefix}{i}", i % 2 == 0), daemon=True)
           for i in range(users)]
for t in threads:
    t.start()
while alive := [t for t in threads if t.is_alive()]:
    dump()
    alive[0].join(timeout=0.2)
state["done"] = True
state["stopped"] = time.time()
dump()
