"""Conversations through the real stack: what the upstream receives, and the ids clients see."""

from __future__ import annotations

import pytest
import requests

from relay.dev.simulator import reply_text
from tests.helpers import chat_body, create_job, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def recorded(stack) -> list[dict]:
    return requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()


def run_turn(base: str, body: dict) -> tuple[dict, str]:
    job = create_job(base, body)
    received, _ = read_stream(job["events_url"])
    assert received.done and not received.errors, received
    # The reply's message id is the creator's alone: chunks carry the public completion id, and
    # the status shows no conversation ids to a holder of the read token.
    assert {c["id"] for c in received.chunks} == {f"chatcmpl-{job['id']}"}
    status = requests.get(job["status_url"], timeout=5).json()
    assert "messageId" not in status and "parentMessageId" not in status
    return job, received.text


def test_a_three_turn_conversation_sends_the_whole_chain_upstream(running_stack):
    stack, base = running_stack
    first = {**chat_body("What is a relay?", tokens=5)}
    first["messages"].insert(0, {"role": "system", "content": "You are a helpful assistant."})
    job1, text1 = run_turn(base, first)
    job2, text2 = run_turn(
        base, {"model": "simulator", "parentMessageId": job1["messageId"], "prompt": "And Redis?",
               "simulator": {"tokens": 6}},
    )  # fmt: skip
    job3, _ = run_turn(
        base, {"model": "simulator", "parentMessageId": job2["messageId"],
               "messages": [{"role": "user", "content": "Thanks!"}], "simulator": {"tokens": 2}},
    )  # fmt: skip
    assert text1 == reply_text(first)
    third = next(r for r in reversed(recorded(stack)) if r["messages"][-1]["content"] == "Thanks!")
    assert third["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is a relay?"},
        {"role": "assistant", "content": text1},
        {"role": "user", "content": "And Redis?"},
        {"role": "assistant", "content": text2},
        {"role": "user", "content": "Thanks!"},
    ]
    assert "parentMessageId" not in third and "prompt" not in third


def test_a_long_chain_is_trimmed_to_the_budget_upstream(stack):
    base = stack.start_web(
        env={"RELAY_MAX_CONTEXT_TOKENS": "300", "RELAY_MAX_RESPONSE_TOKENS": "60"}
    )
    stack.start_worker()
    filler = " lorem ipsum dolor sit amet" * 6
    parent, prompts = None, []
    for i in range(8):
        prompts.append(f"question {i}{filler}")
        body = {"model": "simulator", "systemMessage": "Be terse.", "prompt": prompts[-1],
                "simulator": {"reply": f"answer {i}{filler}"}}  # fmt: skip
        if parent:
            body["parentMessageId"] = parent
        job, _ = run_turn(base, body)
        parent = job["messageId"]
    last = recorded(stack)[-1]["messages"]
    assert last[0] == {"role": "system", "content": "Be terse."}
    assert last[-1]["content"] == prompts[-1]
    contents = [m["content"] for m in last[1:]]
    full_chain = [c for i in range(8) for c in (f"question {i}{filler}", f"answer {i}{filler}")][
        :-1
    ]
    assert len(contents) < len(full_chain), "the oldest messages were dropped"
    assert contents == full_chain[-len(contents) :], "what is kept is the newest, in order"


def test_an_unknown_parent_message_id_is_404(running_stack):
    base = running_stack[1]
    response = requests.post(
        f"{base}/v1/jobs", json={"parentMessageId": "no-such-id", "prompt": "hi"}, timeout=5
    )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "parentMessageId"


def test_a_cancelled_reply_can_be_the_parent_of_the_next_message(running_stack):
    stack, base = running_stack
    job = create_job(base, chat_body("slow", tokens=400, interval=0.05))
    partial, _ = read_stream(job["events_url"], max_events=5)
    requests.post(job["cancel_url"], timeout=5).raise_for_status()
    kept = requests.get(job["status_url"], timeout=5).json()["text"]
    assert kept
    _, _ = run_turn(
        base, {"model": "simulator", "parentMessageId": job["messageId"], "prompt": "go on",
               "simulator": {"tokens": 2}},
    )  # fmt: skip
    sent = recorded(stack)[-1]["messages"]
    assert sent[-2:] == [
        {"role": "assistant", "content": kept},
        {"role": "user", "content": "go on"},
    ]
