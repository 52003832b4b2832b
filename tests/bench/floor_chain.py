"""The design's floor for the first chunk, beside the relay:
``python -m tests.bench.floor_chain [--jobs 500] [--warmup 50] [--minutes M]``.

Any relay of this design crosses the same processes before a client sees its first chunk: the
client to a web process, Redis, a worker, the upstream, and back through the worker, Redis and
the web process. This runs those hops with nothing of the relay in them, as the *floor chain*:

- a gevent web process (``python -m tests.bench.floor_chain web``): for each POST it subscribes to
  a channel of its own on one shared connection, stores the body and queues the job in one
  write, and writes each published message to the client until an end mark;
- a gevent worker process (``... worker``): pops the queue (``BRPOP``), reads the body, sends it
  upstream on a kept-alive connection and publishes every read of the answer;

Redis commands written by hand, no checks, no replay log, no claim; and the same web process as
a Flask app under gunicorn's gevent worker (the relay's framework and server). The relay (one
stack of the working tree, as :mod:`tests.bench.first_ab` starts it) and the floor chains share
that stack's Redis and upstream, and the jobs alternate: a relay job, one of each floor chain,
the same request to the upstream directly, each going first in turn (a job's time depends on
what ran just before it). Prints p50 and p90 of each's POST to first chunk and their overhead
over the upstream: the floor chain's is what the hops cost on this machine, the Flask one's
what gunicorn and Flask add, and the relay's beyond that is the relay's own code (its checks,
its writes and scripts, redis-py, the claim, the replay log). With ``--minutes``, blocks of
``--jobs`` rounds on the same processes until that long has passed, then all of them together.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hiredis

ROOT = Path(__file__).resolve().parents[2]
END_MARK = b"END"  # published after the upstream's answer is complete


def command(*args: bytes) -> bytes:
    """One Redis command in RESP."""
    return hiredis.pack_command(args)


class Replies:
    """Redis replies read off one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.reader = sock, hiredis.Reader()

    def next(self) -> Any:
        while (reply := self.reader.gets()) is False:
            if not (data := self.sock.recv(65536)):
                raise ConnectionError("Redis closed the connection")
            self.reader.feed(data)
        return reply


def redis_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Chain:
    """A floor-chain web process's Redis side: jobs stored and queued, their messages followed."""

    def __init__(self, redis_port: int) -> None:
        import gevent

        self.subscription, self.commands = redis_socket(redis_port), redis_socket(redis_port)
        self.replies = Replies(self.commands)
        self.mailboxes: dict[bytes, Any] = {}
        self.jobs = iter(range(1, 1 << 62))
        gevent.spawn(self._dispatch)

    def _dispatch(self) -> None:
        pushed = Replies(self.subscription)
        while True:
            message = pushed.next()
            if isinstance(message, list) and message[0] == b"message":
                if (mailbox := self.mailboxes.get(message[1])) is not None:
                    mailbox.put(message[2])

    def submit(self, body: bytes) -> bytes:
        """Subscribe to a new job's channel, then store and queue the job; its channel."""
        from gevent.queue import Queue

        # The process's id in it: the two floor web processes share one Redis, and a client
        # that leaves at [DONE] may start the other's job before this one's end mark is sent.
        channel = b"floor:%d:%d" % (os.getpid(), next(self.jobs))
        self.mailboxes[channel] = Queue()
        self.subscription.sendall(command(b"SUBSCRIBE", channel))
        self.commands.sendall(command(b"SET", channel + b":body", body, b"EX", b"60")
                              + command(b"LPUSH", b"floor:queue", channel))  # fmt: skip
        self.replies.next(), self.replies.next()
        return channel

    def messages(self, channel: bytes) -> Iterator[bytes]:
        """What the worker publishes for the job, to its end mark."""
        mailbox = self.mailboxes[channel]
        try:
            while (message := mailbox.get(timeout=10)) != END_MARK:
                yield message
        finally:
            self.subscription.sendall(command(b"UNSUBSCRIBE", channel))
            del self.mailboxes[channel]


def serve_web(redis_port: int, port: int) -> None:
    """The floor chain's web process on gevent's own server: the request read by hand."""
    from gevent.server import StreamServer

    from tests.helpers import read_request

    chain = Chain(redis_port)

    def handle(client: socket.socket, _: object) -> None:
        if (request := read_request(client)) is None:
            return  # a probe that only connected
        _, body, _ = request
        prefix = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        for message in chain.messages(chain.submit(body)):
            client.sendall(prefix + message)
            prefix = b""
        client.close()

    StreamServer(("127.0.0.1", port), handle).serve_forever()


def flask_app() -> Any:
    """The floor chain's web process as a Flask app, for gunicorn's gevent worker (the relay's
    framework and server): ``FLOOR_REDIS_PORT`` names the Redis."""
    from flask import Flask, Response, request

    app = Flask(__name__)
    chains: list[Chain] = []  # made in the worker process, after gunicorn forks

    @app.post("/")
    def create() -> Response:
        if not chains:
            chains.append(Chain(int(os.environ["FLOOR_REDIS_PORT"])))
        chain = chains[0]
        channel = chain.submit(request.get_data())
        return Response(chain.messages(channel), mimetype="text/event-stream")

    return app


def run_worker(redis_port: int, upstream: str) -> None:
    """The floor chain's worker: one job at a time, the upstream connection kept alive."""
    parts = urlsplit(upstream)
    sock = redis_socket(redis_port)
    replies = Replies(sock)
    upstream_sock = socket.create_connection((parts.hostname, parts.port))
    upstream_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    path = f"{parts.path}/chat/completions".encode()
    while True:
        sock.sendall(command(b"BRPOP", b"floor:queue", b"0"))
        _, channel = replies.next()  # type: ignore[misc]
        sock.sendall(command(b"GET", channel + b":body"))
        body = replies.next()
        head = b"POST %b HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\n" % path
        upstream_sock.sendall(head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        answer = b""
        while not (b"[DONE]" in answer and answer.endswith(b"0\r\n\r\n")):
            data = upstream_sock.recv(65536)
            if not data:
                raise ConnectionError("the upstream closed the connection")
            answer += data
            sock.sendall(command(b"PUBLISH", channel, data))
            replies.next()
        sock.sendall(command(b"PUBLISH", channel, END_MARK))
        replies.next()


def accepts(port: int) -> bool:
    """Whether something listens on ``port`` (the connection is closed at once)."""
    socket.create_connection(("127.0.0.1", port)).close()
    return True


def report(took: dict[str, list[float]], label: str = "") -> None:
    """Each's p50 and p90 POST to first chunk and its overhead over the upstream alone."""
    from tests.bench.first_ab import quantile

    p50, p90 = (partial(quantile, q=q) for q in (0.5, 0.9))
    alone = took["upstream alone"]
    print(f"{label}upstream alone: p50 {p50(alone) * 1e3:.2f} ms, p90 {p90(alone) * 1e3:.2f} ms",
          flush=True)  # fmt: skip
    for name in list(took)[:-1]:
        times = took[name]
        print(
            f"{label}{name}: POST to first chunk p50 {p50(times) * 1e3:.2f} ms, "
            f"p90 {p90(times) * 1e3:.2f} ms | overhead p50 "
            f"{(p50(times) - p50(alone)) * 1e3:.2f} ms, p90 "
            f"{(p90(times) - p90(alone)) * 1e3:.2f} ms",
            flush=True,
        )


def measure(jobs: int, warmup: int, minutes: float = 0) -> None:
    """``jobs`` rounds after ``warmup``; with ``minutes``, blocks of ``jobs`` rounds on the same
    stack until that time is up, each block's figures and then all blocks' together (the
    machine's speed drifts within minutes: a long run's p50 spans its spells)."""
    sys.path.insert(0, str(ROOT))
    import tests.bench.first_ab as first_ab
    from tests.bench.run import first_chunk_body
    from tests.conftest import free_port, start_process, wait_for

    bench, base, _ = first_ab.start(ROOT, False)
    try:
        port, flask_port, redis_port = free_port(), free_port(), bench.redis_port
        me = [sys.executable, "-m", "tests.bench.floor_chain"]
        gunicorn = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b",
                    f"127.0.0.1:{flask_port}", "tests.bench.floor_chain:flask_app()"]  # fmt: skip
        worker = [*me, "worker", str(redis_port), bench.sim]
        parts = {"floor-web": [*me, "web", str(redis_port), str(port)], "floor-flask": gunicorn,
                 "floor-worker": worker}  # fmt: skip
        for name, cmd in parts.items():
            env = {"FLOOR_REDIS_PORT": str(redis_port)}
            bench.procs.append(start_process(name, cmd, bench.log_dir, env=env))
        for web in (port, flask_port):
            wait_for(partial(accepts, web), 10, "the floor chain's web processes")
        body = first_chunk_body()
        urls = {
            "relay": f"{base}/v1/chat/completions",
            "floor chain, gunicorn + Flask": f"http://127.0.0.1:{flask_port}/",
            "floor chain": f"http://127.0.0.1:{port}/",
            "upstream alone": f"{bench.sim}/chat/completions",
        }
        order = list(urls.items())
        pooled: dict[str, list[float]] = {name: [] for name in urls}
        deadline = time.monotonic() + minutes * 60
        block, skip = 0, warmup
        while True:
            took: dict[str, list[float]] = {name: [] for name in urls}
            for n in range(skip + jobs):
                # Each goes first in turn: a job's time depends on what ran just before it.
                for name, url in order[n % len(order) :] + order[: n % len(order)]:
                    seconds = first_ab.first_chunk(url, body)
                    if n >= skip:
                        took[name].append(seconds)
            block, skip = block + 1, 0
            for name, times in took.items():
                pooled[name] += times
            if not minutes:
                report(took)
                return
            report(took, f"[block {block}, {time.strftime('%H:%M:%S')}] ")
            if time.monotonic() >= deadline:
                break
        print(f"all {block} blocks, {len(pooled['relay'])} jobs of each:", flush=True)
        report(pooled)
    finally:
        bench.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["web"]:
        from gevent import monkey

        monkey.patch_all()
        serve_web(int(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["worker"]:
        from gevent import monkey

        monkey.patch_all()
        run_worker(int(argv[1]), argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="measured jobs of each kind")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured jobs first")
    parser.add_argument("--minutes", type=float, default=0,
                        help="measure blocks of --jobs until this long has passed, then all "
                             "of them together")  # fmt: skip
    args = parser.parse_args(argv)
    started = time.monotonic()
    measure(args.jobs, args.warmup, args.minutes)
    print(f"({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
