"""Faults at scale against real processes: a worker killed under 50 concurrent jobs, and a storm
of viewers dropping and resuming with Last-Event-ID."""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay.simulator import reply_text
from tests.helpers import chat_body, create_job, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_worker_sigkill_during_50_concurrent_jobs_every_viewer_gets_done(stack):
    base = stack.start_web()
    doomed = stack.start_worker()
    jobs = [create_job(base, chat_body(f"job {i}", tokens=60, interval=0.05)) for i in range(50)]
    results: list = [None] * len(jobs)

    def watch(i: int) -> None:
        results[i] = read_stream(jobs[i]["events_url"], timeout=60)[0]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(watch, i) for i in range(len(jobs))]
        first, _ = read_stream(jobs[-1]["events_url"], max_events=5)  # all 50 are streaming
        doomed.signal(signal.SIGKILL)
        stack.start_worker()  # the janitor runs in any live worker
        for future in futures:
            future.result(timeout=90)
    assert first.ids == [1, 2, 3, 4, 5]
    for received in results:
        assert received.done and received.data.count("[DONE]") == 1, received
        assert received.ids == list(range(1, len(received.ids) + 1))
        lost = [e for e in received.errors if e["code"] == "worker_lost"]
        assert lost or received.finish_reasons == ["stop"]
    assert sum(1 for r in results if r.errors) >= 1, "the kill landed mid-stream"


def test_disconnect_storm_500_viewers_resume_with_no_event_lost_or_repeated(running_stack):
    _, base = running_stack
    body = chat_body("storm", tokens=150, interval=0.02)
    job = create_job(base, body)
    rng = random.Random(7)
    cut_points = [rng.randint(1, 140) for _ in range(500)]
    outcomes: list = [None] * len(cut_points)

    def viewer(i: int) -> None:
        first, _ = read_stream(job["events_url"], max_events=cut_points[i], timeout=60)
        rest, _ = read_stream(
            job["events_url"], headers={"Last-Event-ID": str(first.ids[-1])}, timeout=60
        )
        outcomes[i] = (first.ids + rest.ids, first.data + rest.data)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=500) as pool:
        for future in [pool.submit(viewer, i) for i in range(len(cut_points))]:
            future.result(timeout=120)
    whole, _ = read_stream(job["events_url"])
    assert whole.text == reply_text(body) and whole.done
    for ids, data in outcomes:
        assert ids == whole.ids, "an event was lost or repeated"
        assert data == whole.data
    assert time.monotonic() - started < 120
