"""Stopping a worker with SIGTERM, against real processes: it takes no new jobs, lets running
ones finish within its grace, then re-queues the unstarted ones and fails the rest itself."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from relay.core import keys
from relay.dev.simulator import reply_text
from tests.conftest import Proc, Stack, start_process, wait_for
from tests.helpers import Received, chat_body, create_job, queued, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

_names = itertools.count()
SUMMARY = re.compile(
    r"stopped: (?P<running>\d+) jobs running at the stop, (?P<finished>\d+) finished within "
    r"the grace, (?P<handed_back>\d+) handed back unstarted \((?P<window>\d+) claimed as it "
    r"stopped\), (?P<failed>\d+) failed unfinished"
)


def start_worker(
    stack: Stack, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> tuple[Proc, str]:
    """Like ``stack.start_worker``, but with its own arguments (no fixed ``--grace``); returns
    the process and its worker id once it has registered."""
    worker_id = f"shutdown-{os.getpid()}-{next(_names)}"
    cmd = [sys.executable, "-m", "worker", "--worker-id", worker_id, "--concurrency", "8", *args]
    proc = start_process(worker_id, cmd, stack.log_dir, stack.settings(env))
    stack.procs.append(proc)
    client = stack.redis()
    wait_for(lambda: client.exists(keys.heartbeat(worker_id)), 20, f"worker ({proc.log})")
    return proc, worker_id


def exit_code(proc: Proc, timeout: float) -> int:
    return proc.popen.wait(timeout)


def summary(proc: Proc) -> dict[str, int]:
    """The counts of the worker's last log line."""
    for line in proc.output().splitlines():
        try:
            message = json.loads(line).get("msg", "")
        except ValueError:
            continue
        if match := SUMMARY.search(message):
            return {name: int(value) for name, value in match.groupdict().items()}
    raise AssertionError(f"no stop summary in {proc.log}")


def status_of(job: dict) -> dict:
    return requests.get(job["status_url"], timeout=5).json()


def upstream_calls(stack: Stack, marker: str) -> int:
    sent = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    return sum(1 for body in sent if marker in str(body.get("messages")))


def assert_complete(received: Received, body: dict) -> None:
    """The whole reply, each event once, in order, ending with one [DONE]."""
    assert received.done and received.data.count("[DONE]") == 1, received
    assert received.ids == list(range(1, len(received.ids) + 1)), "an event was lost or repeated"
    assert not received.errors
    assert received.text == reply_text(body)
    assert received.finish_reasons == ["stop"]


def assert_unregistered(stack, worker_id: str) -> None:
    """The stopped worker left no registration, heartbeat or claimed list behind."""
    redis = stack.redis()
    assert not redis.sismember(keys.WORKERS, worker_id)
    assert not redis.exists(keys.heartbeat(worker_id), keys.claimed(worker_id))


def test_a_running_job_shorter_than_the_grace_completes_then_the_worker_exits(stack):
    base = stack.start_web()
    worker, worker_id = start_worker(stack, ("--grace", "20"))
    body = chat_body("finish me", tokens=40, interval=0.05)  # 2 s, longer than the heartbeat TTL
    job = create_job(base, body)
    with ThreadPoolExecutor(max_workers=1) as pool:
        viewer = pool.submit(lambda: read_stream(job["events_url"], timeout=30)[0])
        read_stream(job["events_url"], max_events=3)  # it is streaming
        worker.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        code = exit_code(worker, timeout=15)
        exited_after = time.monotonic() - stopped_at
        received = viewer.result(timeout=10)
    assert code == 0
    assert exited_after < 8, "the worker exits once its job ends, not at the end of the grace"
    assert_complete(received, body)
    status = status_of(job)
    assert status["status"] == "completed" and status["attempts"] == 1
    assert_unregistered(stack, worker_id)
    assert summary(worker) == {
        "running": 1, "finished": 1, "handed_back": 0, "window": 0, "failed": 0
    }  # fmt: skip


def test_after_sigterm_new_jobs_stay_queued_and_another_worker_runs_them(stack):
    base = stack.start_web()
    stopping, stopping_id = start_worker(stack, ("--grace", "30"))
    redis = stack.redis()
    busy_body = chat_body("keeps the worker busy", tokens=80, interval=0.1)  # 8 s
    busy = create_job(base, busy_body)
    marker = f"after-the-stop-{time.monotonic_ns()}"
    later_body = chat_body(marker, tokens=8)
    with ThreadPoolExecutor(max_workers=1) as pool:
        busy_viewer = pool.submit(lambda: read_stream(busy["events_url"], timeout=40)[0])
        read_stream(busy["events_url"], max_events=3)
        stopping.signal(signal.SIGTERM)
        # Submitted at once: the worker's claim (BLMOVE, up to 1 s) is most likely still waiting.
        later = create_job(base, later_body)
        # The claim loop is over once the worker says it waits for its running job.
        wait_for(lambda: "waiting up to" in stopping.output(), 10, "the claim loop to end")
        status = status_of(later)
        assert status["status"] == "queued" and status["attempts"] == 0
        assert queued(redis) == [later["id"]]
        assert queued(redis, keys.claimed(stopping_id)) == [busy["id"]]

        # Started while the first worker is still in its grace: the first worker's heartbeat
        # goes on, so the newcomer's janitor does not take its running job for a dead one's.
        stack.start_worker()
        assert stopping.alive() and redis.exists(keys.heartbeat(stopping_id))
        later_received, _ = read_stream(later["events_url"], timeout=20)
        busy_received = busy_viewer.result(timeout=40)
    assert_complete(later_received, later_body)
    assert status_of(later)["attempts"] == 1  # run once, by the second worker
    assert upstream_calls(stack, marker) == 1
    assert_complete(busy_received, busy_body)
    assert exit_code(stopping, timeout=15) == 0
    counts = summary(stopping)
    assert counts["window"] in (0, 1)  # 1 when the waiting claim took the job: handed back
    assert counts == {
        "running": 1, "finished": 1, "handed_back": counts["window"],
        "window": counts["window"], "failed": 0,
    }  # fmt: skip


def test_a_job_longer_than_the_grace_ends_with_an_error_and_done_when_the_worker_exits(stack):
    grace = 1.0
    base = stack.start_web()
    # The grace from the environment (no --grace); this is the only worker, so no other
    # worker's janitor can be the one that ends the job.
    worker, worker_id = start_worker(stack, env={"RELAY_WORKER_GRACE_SECONDS": str(grace)})
    job = create_job(base, chat_body("too long", tokens=400, interval=0.05))  # 20 s
    with ThreadPoolExecutor(max_workers=1) as pool:
        viewer = pool.submit(lambda: read_stream(job["events_url"], timeout=30)[0])
        read_stream(job["events_url"], max_events=3)
        worker.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        code = exit_code(worker, timeout=grace + 10)
        exited_after = time.monotonic() - stopped_at
        received = viewer.result(timeout=5)
    assert code == 0
    assert grace - 0.1 <= exited_after < grace + 3
    assert received.done and received.data.count("[DONE]") == 1, received
    assert received.ids == list(range(1, len(received.ids) + 1))
    assert received.chunks[-1].get("error"), "the error is the last event before [DONE]"
    (error,) = received.errors
    assert error["code"] == "worker_lost" and "shut down" in error["message"]
    status = status_of(job)
    assert status["status"] == "failed" and status["error"]["message"] == error["message"]
    assert_unregistered(stack, worker_id)
    assert summary(worker) == {
        "running": 1, "finished": 0, "handed_back": 0, "window": 0, "failed": 1
    }  # fmt: skip


def test_a_job_unstarted_at_the_end_of_the_grace_is_handed_back_and_run_by_another(stack):
    grace = 1.0
    slow = {"RELAY_UPSTREAM_READ_TIMEOUT": "10"}  # the first chunk takes 3 s to come
    base = stack.start_web()
    worker, worker_id = start_worker(stack, ("--grace", str(grace)), env=slow)
    marker = f"unstarted-{time.monotonic_ns()}"
    body = chat_body(marker, tokens=10, first_delay=3)
    job = create_job(base, body)
    wait_for(lambda: status_of(job)["status"] == "running", 10, "the job to be claimed")
    redis = stack.redis()
    with ThreadPoolExecutor(max_workers=1) as pool:
        viewer = pool.submit(lambda: read_stream(job["events_url"], timeout=30)[0])
        worker.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        assert exit_code(worker, timeout=grace + 10) == 0
        assert time.monotonic() - stopped_at < grace + 3
        status = status_of(job)
        assert status["status"] == "queued" and status["events"] == 0
        assert queued(redis) == [job["id"]]
        assert not viewer.done(), "the viewer waits for the job to run again"
        stack.start_worker(env=slow)
        received = viewer.result(timeout=30)
    assert_complete(received, body)
    status = status_of(job)
    assert status["status"] == "completed" and status["text"] == reply_text(body)
    assert status["attempts"] >= 2  # the first claim was fenced off, then it ran again
    assert upstream_calls(stack, marker) == 2
    assert summary(worker) == {
        "running": 1, "finished": 0, "handed_back": 1, "window": 0, "failed": 0
    }  # fmt: skip
