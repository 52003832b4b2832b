"""The moderation pre-check against the simulator's /v1/moderations (real processes)."""

from __future__ import annotations

import uuid

import fakeredis
import pytest
import requests

from relay.core.conversations import Conversations
from relay.dev.simulator import reply_text
from tests.helpers import chat_body, create_job, read_stream
from worker import moderation
from worker.moderation import REFUSAL

pytestmark = pytest.mark.timeout(60)


def chat_requests_containing(stack, marker: str) -> list[dict]:
    bodies = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    return [b for b in bodies if marker in str(b.get("messages"))]


@pytest.fixture
def moderated(stack):
    """A stack whose worker checks every input first (fail closed, the default)."""
    base = stack.start_web()
    stack.start_worker(env={"RELAY_MODERATION": "1"})
    return stack, base


@pytest.mark.integration
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


@pytest.mark.integration
def test_clean_input_goes_through_after_the_check(moderated):
    stack, base = moderated
    stats = stack.upstream.removesuffix("/v1") + "/_sim/stats"
    before = requests.get(stats, timeout=5).json()["moderations"]
    body = chat_body("a harmless question", tokens=4)
    received, _ = read_stream(create_job(base, body)["events_url"])
    assert received.text == reply_text(body) and received.finish_reasons == ["stop"]
    assert requests.get(stats, timeout=5).json()["moderations"] == before + 1


@pytest.mark.integration
def test_a_moderation_outage_fails_closed_by_default(moderated):
    stack, base = moderated
    marker = uuid.uuid4().hex
    job = create_job(base, chat_body(f"{marker} moderation-outage", tokens=4))
    received, _ = read_stream(job["events_url"])
    assert received.done and received.errors[0]["code"] == "moderation_unavailable"
    assert requests.get(job["status_url"], timeout=5).json()["status"] == "failed"
    assert chat_requests_containing(stack, marker) == []


@pytest.mark.integration
def test_a_moderation_outage_can_fail_open(stack):
    base = stack.start_web()
    stack.start_worker(env={"RELAY_MODERATION": "1", "RELAY_MODERATION_FAIL_OPEN": "1"})
    body = chat_body("moderation-outage but answer anyway", tokens=4)
    received, _ = read_stream(create_job(base, body)["events_url"])
    assert received.text == reply_text(body) and received.finish_reasons == ["stop"]


def new_input_of(body: dict, parent: str | None = None, conversations=None) -> list[str]:
    draft = conversations.prepare({**body, **({"parentMessageId": parent} if parent else {})})
    turn = conversations.save(draft)
    return moderation.new_input(draft.request, turn), turn


def test_moderation_sees_every_new_message_and_a_new_system_prompt_not_the_history():
    conversations = Conversations(fakeredis.FakeRedis(), ttl=60)
    first = {"model": "m", "messages": [
        {"role": "system", "content": "S1"}, {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1 (written by the client)"},
        {"role": "user", "content": "u2"}]}  # fmt: skip
    texts, turn = new_input_of(first, conversations=conversations)
    assert texts == ["S1", "u1", "a1 (written by the client)", "u2"]
    conversations.save_reply(turn, "reply")
    texts, turn2 = new_input_of({"model": "m", "prompt": "u3"}, turn.message_id, conversations)
    assert texts == ["u3"]  # the history and the inherited system prompt were checked before
    conversations.save_reply(turn2, "reply 2")
    texts, _ = new_input_of({"model": "m", "systemMessage": "S1", "prompt": "u4"},
                            turn2.message_id, conversations)  # fmt: skip
    assert texts == ["u4"]  # the same system prompt again: already seen
    texts, _ = new_input_of({"model": "m", "systemMessage": "S2", "prompt": "u5"},
                            turn2.message_id, conversations)  # fmt: skip
    assert texts == ["S2", "u5"]


@pytest.mark.integration
def test_a_bad_earlier_message_or_new_system_prompt_is_flagged(moderated):
    stack, base = moderated
    marker = uuid.uuid4().hex
    body = chat_body("an innocent last question", tokens=3)
    body["messages"][:0] = [
        {"role": "user", "content": f"{marker} something forbidden"},
        {"role": "assistant", "content": "a reply the client wrote itself"},
    ]
    received, _ = read_stream(create_job(base, body)["events_url"])
    assert received.finish_reasons == ["content_filter"] and received.text == REFUSAL
    # A clean conversation, then a follow-up whose new system prompt is the bad part.
    first = create_job(base, chat_body("hello", tokens=2))
    assert read_stream(first["events_url"])[0].finish_reasons == ["stop"]
    follow = {"model": "simulator", "parentMessageId": first["messageId"], "prompt": "go on",
              "systemMessage": f"{marker} be forbidden"}  # fmt: skip
    received, _ = read_stream(create_job(base, follow)["events_url"])
    assert received.finish_reasons == ["content_filter"]
    assert chat_requests_containing(stack, marker) == []
