"""Load generator run *inside* a test box (stdlib only): THREADS clients send GET / in a loop,
one connection per request, until STOPFILE exists. Every failure (refused, reset, timeout,
non-200) is counted. Progress and the final result go to OUTFILE as JSON.

usage: python3 load.py URL_HOST PORT THREADS STOPFILE OUTFILE
"""

import http.client
import json
import os
import sys
import threading
import time

host, port, threads, stopfile, outfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
lock = threading.Lock()
state = {"ok": 0, "failed": 0, "errors": [], "pids": {}, "generations": {}, "done": False}


def client() -> None:
    while not os.path.exists(stopfile):
        err = None
        try:
            c = http.client.HTTPConnection(host, port, timeout=30)
            c.request("GET", "/", headers={"Connection": "close"})
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status != 200:
                err = f"HTTP {r.status}"
            else:
                try:
                    info = json.loads(body)
                except ValueError:
                    info = {}
        except Exception as e:  # noqa: BLE001 - every failure counts
            err = f"{type(e).__name__}: {e}"
        with lock:
            if err is None:
                state["ok"] += 1
                pid, gen = str(info.get("pid")), str(info.get("generation"))
                state["pids"][pid] = state["pids"].get(pid, 0) + 1
                state["generations"][gen] = state["generations"].get(gen, 0) + 1
            else:
                state["failed"] += 1
                if len(state["errors"]) < 50:
                    state["errors"].append(f"{time.time():.3f} {err}")


def dump() -> None:
    with lock:
        data = json.dumps(state)
    tmp = outfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, outfile)


workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
for t in workers:
    t.start()
while any(t.is_alive() for t in workers):
    dump()
    for t in workers:
        t.join(timeout=0.2)
        break
state["done"] = True
dump()
