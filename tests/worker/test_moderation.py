"""The moderation pre-check against the simulator's /v1/moderations (real processes)."""

from __future__ import annotations

import uuid

import pytest
import requests

from relay.simulator import reply_text
from tests.helpers import chat_body, create_job, read_stream
from worker.moderation import REFUSAL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def chat_requests_containing(stack, marker: str) -> list[dict]:
    bodies = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    return [b for b in bodies if marker in str(b.get("messages"))]


@pytest.fixture
def moderated(stack):
    """A stack whose worker checks every input first (fail closed, the default)."""
    base = stack.start_web()
    stack.start_worker(env={"RELAY_MODERATION": "1"})
    return stack, base


def test_flagged_input_never_reaches_the_chat_upstream_and_ends_in_content_filter(moderated):
    stack, base = moderated
    marker = uuid.uuid4().hex
    job = create_job(base, chat_body(f"{marker} something forbidden", tokens=5))
    received, _ = read_stream(job["events_url"])
    assert received.done and received.finish_reasons == ["content_filter"]
    assert received.text == REFUSAL
    status = requests.get(job["status_url"], timeout=5).json()
    assert (status["status"], status["finish_reason"]) == ("completed", "content_filter")
    assert chat_requests_containing(stack, marker) == []


def test_clean_input_goes_through_after_the_check(moderated):
    stack, base = moderated
    stats = stack.upstream.removesuffix("/v1") + "/_sim/stats"
    before = requests.get(stats, timeout=5).json()["moderations"]
    body = chat_body("a harmless question", tokens=4)
    received, _ = read_stream(create_job(base, body)["events_url"])
    assert received.text == reply_text(body) and received.finish_reasons == ["stop"]
    assert requests.get(stats, timeout=5).json()["moderations"] == before + 1


def test_a_moderation_outage_fails_closed_by_default(moderated):
    stack, base = moderated
    marker = uuid.uuid4().hex
    job = create_job(base, chat_body(f"{marker} moderation-outage", tokens=4))
    received, _ = read_stream(job["events_url"])
    assert received.done and received.errors[0]["code"] == "moderation_unavailable"
    assert requests.get(job["status_url"], timeout=5).json()["status"] == "failed"
    assert chat_requests_containing(stack, marker) == []


def test_a_moderation_outage_can_fail_open(stack):
    base = stack.start_web()
    stack.start_worker(env={"RELAY_MODERATION": "1", "RELAY_MODERATION_FAIL_OPEN": "1"})
    body = chat_body("moderation-outage but answer anyway", tokens=4)
    received, _ = read_stream(create_job(base, body)["events_url"])
    assert received.text == reply_text(body) and received.finish_reasons == ["stop"]
