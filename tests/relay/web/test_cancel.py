"""Cancelling jobs: by the API, and by closing the stream that created the job."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from relay.dev.simulator import reply_text
from tests.conftest import wait_for
from tests.helpers import chat_body, create_job, read_stream, status_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def active_upstream_streams(upstream: str) -> int:
    return requests.get(upstream.removesuffix("/v1") + "/_sim/stats", timeout=5).json()[
        "active_streams"
    ]


def test_cancel_stops_the_upstream_within_a_second_and_every_viewer_gets_done(running_stack):
    stack, base = running_stack
    body = chat_body("long", tokens=400, interval=0.05)
    job = create_job(base, body)
    results: list = []
    viewers = [
        threading.Thread(target=lambda: results.append(read_stream(job["events_url"])[0]))
        for _ in range(3)
    ]
    for viewer in viewers:
        viewer.start()
    first, _ = read_stream(job["events_url"], max_events=6)
    assert active_upstream_streams(stack.upstream) == 1
    cancelled_at = time.monotonic()
    response = requests.post(job["cancel_url"], timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_for(lambda: active_upstream_streams(stack.upstream) == 0, 1.0, "the upstream to close")
    assert time.monotonic() - cancelled_at <= 1.0
    for viewer in viewers:
        viewer.join(10)
    assert len(results) == 3
    for received in results:
        assert received.done and received.data.count("[DONE]") == 1
        assert received.finish_reasons == ["cancelled"]
        assert reply_text(body).startswith(received.text) and received.text
        assert received.ids == results[0].ids
    status = requests.get(job["status_url"], timeout=5).json()
    assert status["status"] == "cancelled" and status["finish_reason"] == "cancelled"
    assert status["text"] == results[0].text  # the text so far is kept
    # Cancelling again changes nothing, and says so.
    again = requests.post(job["cancel_url"], timeout=5)
    assert again.status_code == 409 and "status: cancelled" in again.json()["error"]["message"]
    assert requests.get(job["status_url"], timeout=5).json()["events"] == status["events"]


def test_cancel_of_a_queued_job_means_it_never_runs(stack):
    base = stack.start_web()
    job = create_job(base, chat_body("never", tokens=3))
    assert requests.post(job["cancel_url"], timeout=5).ok
    received, _ = read_stream(job["events_url"])
    assert received.finish_reasons == ["cancelled"] and received.done and received.text == ""
    stack.start_worker()
    probe = create_job(base, chat_body("after", tokens=2))  # the worker runs later jobs...
    assert read_stream(probe["events_url"])[0].done
    status = requests.get(job["status_url"], timeout=5).json()
    assert status["status"] == "cancelled" and status["started_at"] is None  # ...not this one


def test_cancel_after_the_job_ended_is_409_and_changes_nothing(running_stack):
    base = running_stack[1]
    job = create_job(base, chat_body("quick", tokens=2))
    before, _ = read_stream(job["events_url"])
    assert before.finish_reasons == ["stop"]
    answer = requests.post(job["cancel_url"], timeout=5)
    assert answer.status_code == 409
    error = answer.json()["error"]
    assert error["code"] == "job_already_ended" and error["type"] == "invalid_request_error"
    assert "status: completed" in error["message"] and error["param"] is None
    after, _ = read_stream(job["events_url"])
    assert after == before  # the outcome and its stream are as they were
    assert requests.get(job["status_url"], timeout=5).json()["status"] == "completed"
    again = requests.post(job["cancel_url"], timeout=5)  # cancelling twice: the same answer
    assert again.status_code == 409


def test_cancel_of_an_unknown_job_is_404(running_stack):
    base = running_stack[1]
    assert requests.post(f"{base}/v1/jobs/job_{'A' * 24}/cancel", timeout=5).status_code == 404


def open_chat_stream(base: str, body: dict) -> requests.Response:
    response = requests.post(
        f"{base}/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=10
    )
    assert response.status_code == 200
    return response


def test_closing_the_only_chat_stream_cancels_its_job(running_stack):
    stack, base = running_stack
    response = open_chat_stream(base, chat_body("abandon", tokens=400, interval=0.05))
    url = status_url(response)
    next(response.iter_content(chunk_size=None))
    response.close()
    wait_for(
        lambda: requests.get(url, timeout=5).json()["status"] == "cancelled",
        5,
        "the abandoned job to be cancelled",
    )


def test_closing_a_chat_stream_others_watch_does_not_cancel(running_stack):
    stack, base = running_stack
    body = chat_body("shared", tokens=30, interval=0.05)
    response = open_chat_stream(base, body)
    events_url = response.headers["X-Relay-Events-Url"]
    result: dict = {}
    watcher = threading.Thread(target=lambda: result.update(r=read_stream(events_url)[0]))
    watcher.start()
    wait_for(lambda: requests.get(f"{base}/healthz").json()["viewers"] >= 2, 5, "two viewers")
    response.close()
    watcher.join(20)
    assert result["r"].text == reply_text(body) and result["r"].finish_reasons == ["stop"]
