"""Estimate the master-side cost of handing accepted connections to workers via SCM_RIGHTS.

Per connection the master would: accept(), sendmsg() the fd over a Unix socket, close() its
copy; the worker: recvmsg(), then adopt the fd. We time that loop in Python over loopback and
report microseconds per connection for each side.
Run: python3 -m bench.fairness.scm_rights_cost [N]
"""

import os
import socket
import sys
import time


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    addr = lst.getsockname()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    clients = []
    master = worker = 0.0
    done = 0
    while done < n:
        batch = min(500, n - done)
        clients = [socket.create_connection(addr) for _ in range(batch)]
        for _ in range(batch):
            t0 = time.perf_counter()
            conn, _ = lst.accept()
            socket.send_fds(a, [b"x"], [conn.fileno()])
            conn.close()
            t1 = time.perf_counter()
            _, fds, _, _ = socket.recv_fds(b, 1, 1)
            os.close(fds[0])
            t2 = time.perf_counter()
            master += t1 - t0
            worker += t2 - t1
        for c in clients:
            c.close()
        done += batch
    print(f"master accept+send_fds+close: {master / n * 1e6:.1f} us/conn; "
          f"worker recv_fds: {worker / n * 1e6:.1f} us/conn (n={n})")
    print(f"=> at 10k new connections/s the master would spend ~{master / n * 1e4 * 100:.0f}% "
          f"of a core (target: master < 1% of a core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
