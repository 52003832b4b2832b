"""Redis killed and restarted mid-stream: the web tier and the worker recover on their own and new
jobs work within seconds. With AOF, viewers end with the full text or an error and [DONE]; without
persistence the job is gone, and its viewers are told so (an error and [DONE], or a 404 when they
reconnect) instead of waiting for ever."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
import requests

from relay.dev.simulator import reply_text
from tests.conftest import Proc, Stack, free_port, start_process, wait_for
from tests.helpers import chat_body, create_job, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def start_redis(port: int, data: Path, log_dir: Path, aof: bool = True) -> Proc:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run the tests with deploy/test.sh"
    proc = start_process(
        f"redis-aof-{port}",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
         "--appendonly", "yes" if aof else "no", "--appendfsync", "always"],
        log_dir,
    )  # fmt: skip
    wait_for(lambda: redis.Redis(port=port).ping(), 10, "redis-server")
    return proc


def follow_until_done(url: str, deadline: float) -> tuple[list[int], list[str]]:
    """Read a stream like an EventSource: reconnect with Last-Event-ID until [DONE]."""
    ids: list[int] = []
    data: list[str] = []
    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": str(ids[-1])} if ids else {}
        try:
            received, response = read_stream(url, headers=headers, timeout=10)
        except (requests.RequestException, TimeoutError):
            time.sleep(0.2)  # the relay is (briefly) unreachable: back off like EventSource
            continue
        ids += received.ids
        data += received.data
        if data and data[-1] == "[DONE]":
            break
        if response.status_code == 404:  # the job is gone: an EventSource would stop here
            data.append("<404>")
            break
        if response.status_code != 200:
            time.sleep(0.2)
    return ids, data


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_mid_stream(tmp_path, simulator, log_dir, aof):
    port = free_port()
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    server = start_redis(port, data_dir, log_dir, aof)
    stack = Stack(f"redis://127.0.0.1:{port}/0", simulator, log_dir)
    try:
        base = stack.start_web()
        stack.start_worker()
        body = chat_body("survive", tokens=80, interval=0.05)
        job = create_job(base, body)
        result: dict = {}
        viewer = threading.Thread(
            target=lambda: result.update(
                zip(
                    ("ids", "data"),
                    follow_until_done(job["events_url"], time.monotonic() + 60),
                    strict=True,
                )
            )
        )
        viewer.start()
        wait_for(
            lambda: redis.Redis(port=port).llen(f"relay:{{{job['id']}}}:events") >= 10, 10, "events"
        )
        server.signal(signal.SIGKILL)
        server.popen.wait(5)
        time.sleep(1.0)  # an outage, not a blip: the relay must notice it
        server = start_redis(port, data_dir, log_dir, aof)
        restarted = time.monotonic()

        viewer.join(70)
        viewer_done = time.monotonic() - restarted
        ids, data = result["ids"], result["data"]
        if not aof:
            assert data[-1] == "<404>" or (data[-1] == "[DONE]" and "job_lost" in data[-2]), data
            assert ids == list(range(1, len(ids) + 1)), "nothing repeated before the loss"
        else:
            assert data and data[-1] == "[DONE]" and data.count("[DONE]") == 1
            assert ids == list(range(1, len(ids) + 1)), "no event lost or repeated"
            text = "".join(
                (c.get("delta") or {}).get("content") or ""
                for d in data[:-1]
                for c in requests.models.complexjson.loads(d).get("choices") or ()
            )
            errors = [d for d in data if '"error":' in d]
            assert text == reply_text(body) or errors, "the full text, or an error event"

        # New jobs work within seconds of the restart, without restarting the relay or worker.
        fresh = chat_body("after the restart", tokens=3)
        wait_for(
            lambda: (
                read_stream(create_job(base, fresh)["events_url"], timeout=10)[0].text
                == reply_text(fresh)
            ),
            20,
            "a new job to complete",
        )
        new_job = time.monotonic() - restarted
        print(
            f"\nfigure: redis restart ({'aof' if aof else 'no persistence'}): viewer ended "
            f"{viewer_done:.1f}s after the restart with {data[-2:]!s:.60}; a new job completed "
            f"{new_job:.1f}s after; events {len(ids)} contiguous"
        )
        assert new_job < 20
        assert all(proc.alive() for proc in stack.procs), "relay and worker were not restarted"
    finally:
        stack.stop()
        server.stop()
