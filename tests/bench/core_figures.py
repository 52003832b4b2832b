"""Core figures for the relay, on this machine: fan-out latency, connections, enqueue overhead.

    .venv/bin/python tests/bench/core_figures.py [--viewers 200 1000] [--chunks 150]

Starts a real redis-server, the simulator, one gunicorn -k gevent process and one worker on
free ports; viewers are greenlets in this process. Latency is the simulator's emit timestamp
(carried in each chunk) to a viewer's receipt. Not run by CI; the full comparative suite
(flask-sse, the direct floor, many jobs) is issue 6's.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import Stack, free_port, start_process, wait_for  # noqa: E402
from worker.sse_decoder import SSEDecoder  # noqa: E402

STAMP = re.compile(rb'"x_sim_emitted_at":([0-9.]+)')


def percentiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return (
        f"p50 {p(0.5) * 1000:.1f} ms, p99 {p(0.99) * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )


def watch(url: str, latencies: list[float], counts: list[int]) -> None:
    """One viewer: read the whole stream, recording emit-to-receipt latency per chunk."""
    decoder = SSEDecoder()
    events = 0
    with requests.get(url, stream=True, timeout=(10, 60)) as response:
        for block in response.iter_content(chunk_size=None):
            now = time.time()
            for event in decoder.feed(block):
                events += 1
                match = STAMP.search(event.data.encode())
                if match:
                    latencies.append(now - float(match.group(1)))
                if event.data == "[DONE]":
                    counts.append(events)
                    return


def fan_out(base: str, probe: redis.Redis, db: int, viewers: int, chunks: int) -> None:
    body = {
        "model": "simulator",
        "messages": [{"role": "user", "content": "bench"}],
        "simulator": {"tokens": chunks, "interval": 0.02, "timestamps": True, "first_delay": 3},
    }
    job = requests.post(f"{base}/v1/jobs", json=body, timeout=10).json()
    latencies: list[float] = []
    counts: list[int] = []
    started = time.monotonic()
    group = [gevent.spawn(watch, job["events_url"], latencies, counts) for _ in range(viewers)]
    wait_for(lambda: requests.get(f"{base}/healthz").json()["viewers"] >= viewers, 30, "viewers")
    connections = sum(1 for c in probe.client_list() if int(c["db"]) == db)
    gevent.joinall(group, timeout=120)
    elapsed = time.monotonic() - started
    complete = sum(1 for c in counts if c == chunks + 3)  # role chunk, pieces, finish, [DONE]
    print(
        f"| fan-out | {viewers} viewers, 1 job, {chunks + 3} events at 20 ms | "
        f"{complete}/{viewers} complete in {elapsed:.1f} s; latency {percentiles(latencies)}; "
        f"Redis connections (web + worker) during: {connections} |",
        flush=True,
    )


def enqueue_to_first_chunk(base: str, jobs: int) -> None:
    samples = []
    for i in range(jobs):
        body = {"model": "simulator", "messages": [{"role": "user", "content": f"q{i}"}],
                "simulator": {"tokens": 1}}  # fmt: skip
        started = time.monotonic()
        job = requests.post(f"{base}/v1/jobs", json=body, timeout=10).json()
        with requests.get(job["events_url"], stream=True, timeout=10) as response:
            decoder = SSEDecoder()
            for block in response.iter_content(chunk_size=None):
                if any(e.id == "1" for e in decoder.feed(block)):
                    samples.append(time.monotonic() - started)
                    break
    print(f"| enqueue to first chunk | {jobs} jobs, one at a time | {percentiles(samples)} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--chunks", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    redis_port, sim_port = free_port(), free_port()
    binary = shutil.which("redis-server") or sys.exit("redis-server is not installed")
    procs = [
        start_process("redis", [binary, "--port", str(redis_port), "--save", "",
                                "--appendonly", "no"], logs),
        start_process("simulator", [sys.executable, "-m", "relay.simulator",
                                    "--port", str(sim_port)], logs),
    ]  # fmt: skip
    stack = Stack(f"redis://127.0.0.1:{redis_port}/0", f"http://127.0.0.1:{sim_port}/v1", logs)
    try:
        wait_for(lambda: redis.Redis(port=redis_port).ping(), 10, "redis")
        wait_for(lambda: requests.get(f"http://127.0.0.1:{sim_port}/healthz").ok, 10, "sim")
        stack.env = {"RELAY_UPSTREAM_READ_TIMEOUT": "30", "RELAY_KEEPALIVE_SECONDS": "15"}
        base = stack.start_web(workers=1)
        stack.start_worker(concurrency=256)
        machine = f"{platform.machine()}, {os.cpu_count()} cores"
        print(f"machine: {machine}, Python {platform.python_version()}; one gunicorn process\n")
        print("| scenario | load | result |\n|---|---|---|")
        probe = redis.Redis(port=redis_port)
        for viewers in args.viewers:
            fan_out(base, probe, 0, viewers, args.chunks)
        enqueue_to_first_chunk(base, args.jobs)
    finally:
        stack.stop()
        for proc in procs:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
