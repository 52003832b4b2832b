"""The worker's cost of reading upstream streams, alone: CPU per chunk, pull against push.

    python -m tests.bench.readloop [--streams 200] [--tokens 250]

Starts :mod:`tests.bench.upstream`, opens ``--streams`` streams of 50 chunks/s with the
worker's own ``open_stream`` and reads them all at once, first with :func:`iter_chunks` (a
greenlet per stream waits for each read) and then with :func:`follow_chunks` (the event loop
calls back); no Redis, no publishing. Prints this process's CPU microseconds per chunk for
each, as JSON.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402

from tests.conftest import free_port, start_process, wait_for  # noqa: E402
from worker.reader import follow_chunks, iter_chunks  # noqa: E402
from worker.upstream import Upstream, open_stream  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(upstream: Upstream, mode: str, streams: int, tokens: int) -> float:
    """CPU microseconds per chunk read, once every stream is open and flowing."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "simulator": {"tokens": tokens, "interval": 0.02, "first_delay": 1.0}}  # fmt: skip
    counted = [0]

    def count(_: str, __: dict) -> None:
        counted[0] += 1

    def one() -> None:
        with requests.Session() as session:
            response = open_stream(session, upstream, body)
            try:
                if mode == "pull":
                    for data, chunk in iter_chunks(response):
                        count(data, chunk)
                else:
                    follow_chunks(response, count, upstream.read_timeout)
            finally:
                response.close()

    readers = [gevent.spawn(one) for _ in range(streams)]
    gevent.sleep(1.5)  # every stream open, chunks flowing
    before, chunks = cpu(), counted[0]
    gevent.joinall(readers, raise_error=True)
    return (cpu() - before) / (counted[0] - chunks) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=250)
    args = parser.parse_args(argv)
    port = free_port()
    proc = start_process("bench-upstream", [sys.executable, "-m", "tests.bench.upstream",
                                            "--port", str(port)],
                         Path(tempfile.mkdtemp(prefix="relay-readloop-")))  # fmt: skip
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/healthz").ok, 10, "upstream")
        upstream = Upstream(f"http://127.0.0.1:{port}/v1")
        result = {mode: measure(upstream, mode, args.streams, args.tokens)
                  for mode in ("pull", "push")}  # fmt: skip
        print(json.dumps({"streams": args.streams, "us_per_chunk": result}))
    finally:
        proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
