"""Faults at scale against real processes: a worker killed under 50 concurrent jobs, a storm of
viewers dropping and resuming with Last-Event-ID, and a web process shut down under its viewers."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from relay.dev.simulator import reply_text
from tests.conftest import wait_for
from tests.helpers import chat_body, create_job, read_stream
from worker.sse_decoder import SSEDecoder

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
        killed = time.monotonic()
        stack.start_worker()  # the janitor runs in any live worker
        for future in futures:
            future.result(timeout=90)
    recovered = time.monotonic() - killed
    print(f"\nfigure: worker SIGKILL, 50 jobs: every viewer done {recovered:.1f}s after the kill")
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
    took = time.monotonic() - started
    print(f"\nfigure: storm of 500 drop+resume: 0 lost, 0 repeated; all done in {took:.1f}s")
    assert took < 120


def read_until_signalled(
    url: str, after_events: int, on_signal: Callable[[], None], **kwargs
) -> tuple[list[int], list[str], bool, str]:
    """Read a stream, call ``on_signal`` after ``after_events`` events, then read to its end.

    Returns the ids, the data, whether the response ended cleanly (a complete chunked body,
    not a connection cut mid-response), and the tokened events URL to resume from.
    """
    ids: list[int] = []
    data: list[str] = []
    decoder = SSEDecoder()
    method = kwargs.pop("method", "GET")
    with requests.request(method, url, stream=True, timeout=(5, 30), **kwargs) as response:
        assert response.status_code == 200, response.text
        events_url = response.headers.get("X-Relay-Events-Url", url)
        try:
            for block in response.iter_content(chunk_size=None):
                for event in decoder.feed(block):
                    ids.append(int(event.id))
                    data.append(event.data)
                    if len(ids) == after_events:
                        on_signal()
        except requests.exceptions.ChunkedEncodingError:
            return ids, data, False, events_url
    return ids, data, True, events_url


@pytest.mark.parametrize("endpoint", ["events", "chat-completions"])
def test_sigterm_to_gunicorn_ends_open_streams_cleanly_and_viewers_resume_elsewhere(
    stack, endpoint
):
    # A long graceful timeout: the stream must end because of the SIGTERM, not the timeout.
    leaving = stack.start_web(graceful_timeout=30)
    leaving_proc = stack.procs[-1]
    staying = stack.start_web()
    stack.start_worker()
    body = chat_body(f"shutdown {endpoint}", tokens=200, interval=0.03)  # 6 s
    signalled: list[float] = []

    def sigterm() -> None:
        signalled.append(time.monotonic())
        leaving_proc.signal(signal.SIGTERM)

    if endpoint == "events":
        url, kwargs = create_job(leaving, body)["events_url"], {}
    else:  # the job's creator: leaving with the process is not abandoning the job
        url = f"{leaving}/v1/chat/completions"
        kwargs = {"method": "POST", "json": {**body, "stream": True}}
    ids, data, clean, events_url = read_until_signalled(url, 10, sigterm, **kwargs)
    ended = time.monotonic()
    assert clean, "the stream ended with a complete response, not a cut connection"
    assert ended - signalled[0] < 3.0, "ended by the SIGTERM, well before graceful_timeout"
    assert "[DONE]" not in data and len(ids) >= 10
    wait_for(lambda: not leaving_proc.alive(), 10, "gunicorn to exit")

    resume_url = events_url.replace(leaving, staying, 1)
    rest, _ = read_stream(resume_url, headers={"Last-Event-ID": str(ids[-1])}, timeout=30)
    assert ids + rest.ids == list(range(1, len(ids) + len(rest.ids) + 1)), "none lost or repeated"
    assert rest.done and rest.data.count("[DONE]") == 1
    resumed = time.monotonic()
    whole, _ = read_stream(resume_url)
    assert whole.finish_reasons == ["stop"] and whole.text == reply_text(body)
    assert whole.data == data + rest.data
    print(
        f"\nfigure: gunicorn SIGTERM ({endpoint}): stream ended {ended - signalled[0]:.2f}s after"
        f" the signal; resumed elsewhere and done {resumed - signalled[0]:.1f}s after; 0 lost"
    )
