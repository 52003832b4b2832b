"""Where the time to the first chunk goes, per stage: ``python -m tests.bench.stages [JOBS]``.

Starts redis-server, the simulator (no pause between chunks), one gunicorn process and one
worker; sends jobs one at a time through ``POST /v1/chat/completions`` and splits each job's
time to its first chunk by the job's ``created_at`` and ``started_at`` and the simulator's emit
stamp on the chunk: the web's handling, the queue, the worker to the upstream's first chunk,
and that chunk's way to the client (p50 and p90; the first 20 jobs warm up and are not counted).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import Stack, free_port, start_process, wait_for  # noqa: E402

STAGES = ("POST -> stored", "stored -> claimed", "claimed -> upstream's first chunk",
          "first chunk -> client", "total")  # fmt: skip


def main(argv: list[str]) -> int:
    jobs = int(argv[0]) if argv else 300
    log = Path(tempfile.mkdtemp(prefix="relay-stages-"))
    redis_port, sim_port = free_port(), free_port()
    procs = [
        start_process("redis", ["redis-server", "--port", str(redis_port), "--save", ""], log),
        start_process(
            "simulator",
            [
                sys.executable,
                "-m",
                "relay.dev.simulator",
                "--port",
                str(sim_port),
                "--interval",
                "0",
            ],
            log,
        ),  # fmt: skip
    ]
    sim = f"http://127.0.0.1:{sim_port}"
    wait_for(lambda: requests.get(f"{sim}/healthz", timeout=1).ok, 10, "simulator")
    stack = Stack(f"redis://127.0.0.1:{redis_port}/0", f"{sim}/v1", log)
    stack.env = {"RELAY_KEEPALIVE_SECONDS": "15"}
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
            "simulator": {"tokens": 3, "timestamps": True}}  # fmt: skip
    rows = []
    try:
        base = stack.start_web(workers=1)
        stack.start_worker()
        for n in range(jobs + 20):
            sent = time.time()
            with requests.post(f"{base}/v1/chat/completions", json=body, stream=True,
                               timeout=10) as answer:  # fmt: skip
                for line in answer.iter_lines():
                    if line.startswith(b"data: {"):
                        received = time.time()
                        emitted = json.loads(line[6:])["x_sim_emitted_at"]
                        break
                status_url = answer.headers["X-Relay-Events-Url"].replace("/events?", "?", 1)
            job = requests.get(status_url, timeout=5).json()
            if n >= 20:
                created, started = job["created_at"], job["started_at"]
                rows.append((created - sent, started - created, emitted - started,
                             received - emitted, received - sent))  # fmt: skip
    finally:
        stack.stop()
        for proc in procs:
            proc.stop()
    for name, column in zip(STAGES, zip(*rows, strict=True), strict=True):
        ordered = sorted(column)
        p50, p90 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.9)]
        print(f"{name:36s} p50 {p50 * 1e3:6.2f} ms   p90 {p90 * 1e3:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
