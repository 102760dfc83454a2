"""Abusive control clients: replies never read, endless lines, garbage, crowds, hang-ups.

The control socket is part of the master's one loop, so every client here is a chance to
crash or wedge the master. Each test: the abuse, then the master must answer a well-behaved
client, keep serving HTTP without a failed request, settle with its descriptors back at the
baseline, and stop on SIGTERM in time. Known bug 2: a client that sent many requests without
reading the replies (> 1 MiB of them) crashed the master at the next connection.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from faults import SCALE, Control, under_load

#: Enough status requests that their replies exceed the master's 1 MiB output buffer.
_UNREAD_REQUESTS = 4000


def _hung_up(sock: socket.socket, timeout: float) -> bool:
    """Whether the master closed ``sock`` within ``timeout`` (POLLHUP; nothing is read)."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP | select.POLLERR)
    return bool(poller.poll(timeout * 1000))


def test_a_client_that_never_reads_its_replies_does_not_hurt_the_next_one(subject, figures):
    s = subject()
    with s.watching():
        with under_load(s) as load:
            load.wait_requests(100)
            for _ in range(3):
                abuser = s.control.connect(timeout=10)
                payload = b'{"cmd":"status"}\n' * _UNREAD_REQUESTS
                sender = threading.Thread(target=_send_quietly, args=(abuser, payload), daemon=True)
                sender.start()
                # The master either drops the client at its output limit or stops reading it;
                # a bounded wait for the drop, then the next connection either way.
                dropped = _hung_up(abuser, 3.0)
                figures.notes["dropped"] = figures.notes.get("dropped", 0) + int(dropped)
                status = s.control.status(timeout=5)
                assert status["phase"] == "running"
                s.assert_alive()
                abuser.close()
                sender.join(10)
            load.wait_requests(100)
        assert load.failures == []
        s.settled()
        s.stop_within()


def test_an_endless_request_line_is_refused_and_the_connection_stays_usable(subject, figures):
    s = subject()
    with s.watching():
        with s.control.connect(timeout=30) as sock:
            sender = threading.Thread(
                target=_send_quietly, args=(sock, b"x" * (16 << 20) + b"\n"), daemon=True
            )
            sender.start()
            first = Control.final(sock, 30)
            assert first["ok"] is False and "longer than" in first["error"], first
            sender.join(30)
            sock.sendall(b'{"cmd":"status"}\n')
            assert Control.final(sock, 10)["ok"] is True
        s.assert_alive()
        s.settled()
        s.stop_within()


GARBAGE = [
    b"\xff\xfe\xfd\n",  # not UTF-8
    b"[]\n",
    b"null\n",
    b'{"cmd": 1}\n',
    b'{"cmd": "reload", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}\n",  # deep: RecursionError
    b'{"cmd": "scale", "workers": 1e999}\n',
    b'{"cmd": "scale", "workers": 99999999999999999999}\n',
    b'{"cmd": "status"' + b', "a": 1' * 5000 + b"}\n",
    b"\x00" * 1000 + b"\n",
]


def test_garbage_requests_each_get_an_error_and_the_connection_stays_usable(subject, figures):
    s = subject()
    with s.watching():
        with s.control.connect(timeout=30) as sock:
            for line in GARBAGE:
                sock.sendall(line)
                reply = Control.final(sock, 10)
                assert reply["ok"] is False and reply["error"], (line[:60], reply)
            sock.sendall(b'{"cmd":"status"}\n')
            assert Control.final(sock, 10)["ok"] is True
        s.assert_alive()
        status = s.settled()
        assert status["target"] == 2, "a garbage scale request changed the pool"
        s.stop_within()


def test_a_crowd_of_idle_control_clients_is_served_and_then_let_go(subject, figures):
    s = subject()
    with s.watching():
        crowd: list[socket.socket] = []
        try:
            with under_load(s) as load:
                load.wait_requests(50)
                for _ in range(SCALE.connections):
                    crowd.append(s.control.connect(timeout=10))
                # A half-sent request in some of them.
                for sock in crowd[::3]:
                    sock.sendall(b'{"cmd":"sta')
                assert s.control.status(timeout=10)["phase"] == "running"
                load.wait_requests(50)
        finally:
            for sock in crowd:
                sock.close()
        assert load.failures == []
        s.assert_alive()
        s.settled()
        s.stop_within()


def test_clients_that_hang_up_right_after_asking_for_a_reload(subject, figures):
    """The outcome of a reload has nobody to go to; the master must not mind. One reload at a
    time (concurrent reloads are test_fault_reload's fault)."""
    s = subject()
    with s.watching():
        with under_load(s) as load:
            load.wait_requests(50)
            for n in range(6):
                mark = s.logs.mark()
                sock = s.control.connect(timeout=5)
                sock.sendall(b'{"cmd":"reload"}\n')
                if n % 2:
                    sock.shutdown(socket.SHUT_WR)  # half-closed: it could still read
                sock.close()
                s.logs.wait_for("reload.finished", since=mark, timeout=30)
            reply = s.control.request("reload", timeout=60)
            assert reply["ok"] is True, reply
            load.wait_requests(50)
        assert load.failures == []
        figures.reloads = len(s.logs.find("reload.finished"))
        s.settled()
        s.stop_within()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """sendall that stops when the master hangs up or stops reading (that is allowed)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)
