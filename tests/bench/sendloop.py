"""The kernel's floor for fan-out: one event sent to N loopback TCP sockets from one thread.

    python -m tests.bench.sendloop --viewers 1000 [--rounds 200] [--size 300]

No relay, no Redis, no Python per viewer beyond the ``send`` call: a child process holds the
other ends in one epoll loop (as :mod:`tests.bench.loadgen` does) and this one writes the same
bytes to every socket, once per 20 ms. It prints the loop's p50/p99 in ms and the cost of one
send as JSON. The relay's dispatcher does this loop for every live event; its time (and so
the median viewer's wait for its turn, half of it) is bounded below by what is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time


def _drain(listener: socket.socket, viewers: int) -> None:
    """The child: connect every viewer, then read until the parent closes them."""
    poller = select.epoll()
    socks = {}
    for _ in range(viewers):
        sock = socket.create_connection(listener.getsockname())
        sock.setblocking(False)
        socks[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
    open_ = viewers
    while open_:
        for fd, _ in poller.poll(5.0):
            try:
                data = socks[fd].recv(65536)
            except BlockingIOError:
                continue
            if not data:
                poller.unregister(fd)
                open_ -= 1
    os._exit(0)


def measure(viewers: int, rounds: int, size: int) -> dict:
    listener = socket.create_server(("127.0.0.1", 0), backlog=viewers)
    child = os.fork()
    if child == 0:
        _drain(listener, viewers)
    conns = [listener.accept()[0] for _ in range(viewers)]
    for conn in conns:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sends = [conn.send for conn in conns]
    data = b"x" * size
    loops = []
    for _ in range(rounds):
        started = time.perf_counter()
        for send in sends:
            send(data)
        loops.append(time.perf_counter() - started)
        time.sleep(0.02)  # the benchmarks' chunk interval: the reader drains meanwhile
    for conn in conns:
        conn.close()
    os.waitpid(child, 0)
    loops.sort()
    p50, p99 = loops[len(loops) // 2], loops[min(len(loops) - 1, int(len(loops) * 0.99))]
    return {"viewers": viewers, "loop_p50_ms": p50 * 1e3, "loop_p99_ms": p99 * 1e3,
            "send_us": p50 / viewers * 1e6}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--size", type=int, default=300, help="bytes per event")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.viewers, args.rounds, args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
