"""The `chatgpt` npm package's ChatGPTAPI (what chatgpt-web's back end runs) pointed at the relay.

The package is installed from the npm registry into tests/node by the ``node_clients`` fixture
(tests/relay/web/conftest.py).
"""

from __future__ import annotations

import itertools
import json
import re
import uuid

import pytest
import requests

from relay.dev.simulator import reply_text
from tests.helpers import read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_chatgpt_api_holds_a_three_turn_conversation_with_a_key(node_clients, stack):
    base = stack.start_web(env={"RELAY_API_KEYS": "npm-key-1"})
    stack.start_worker()
    out = node_clients.run("chatgpt_api.mjs", base, "npm-key-1")
    expected = reply_text({})  # the simulator's default reply
    assert out["first"]["text"] == expected
    assert out["finishReason"] == "stop"
    assert len(set(out["progress"])) >= 3 and out["progress"][-1] == expected
    assert out["third"]["text"] == expected
    assert len({out[turn]["id"] for turn in ("first", "second", "third")}) == 3
    # The package rebuilt the history itself; the upstream got the whole chain through the relay.
    bodies = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    sent = next(b for b in reversed(bodies) if b["messages"][-1]["content"] == "A third turn")
    assert sent["messages"][-5:] == [
        {"role": "user", "content": "Hello from the chatgpt package"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "A follow-up"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "A third turn"},
    ]


UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_chatgpt_unofficial_proxy_api_holds_a_two_turn_conversation(node_clients, stack):
    base = stack.start_web(env={"RELAY_API_KEYS": "npm-key-2"})
    stack.start_worker()
    out = node_clients.run("chatgpt_proxy_api.mjs", base, "npm-key-2")
    expected = reply_text({})
    first, second = out["first"], out["second"]
    assert first["text"] == expected and second["text"] == expected
    progress = out["progress"]  # onProgress saw the text grow, each a prefix of the next
    assert len(set(progress)) >= 3 and progress[-1] == expected
    assert all(b.startswith(a) for a, b in itertools.pairwise(progress))
    for value in (first["id"], first["conversationId"], second["id"]):
        assert UUID4.match(value), value  # the package refuses anything else on the next turn
    assert second["conversationId"] == first["conversationId"] and second["id"] != first["id"]
    bodies = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    sent = next(b for b in reversed(bodies) if b["messages"][-1]["content"] == "And a follow-up")
    assert [m["content"] for m in sent["messages"]] == [
        "Hello through ChatGPT's web protocol",
        expected,
        "And a follow-up",
    ]


def backend_post(base: str, body: dict, key: str, **kwargs) -> requests.Response:
    return requests.post(f"{base}/backend-api/conversation", json=body, timeout=20,
                         headers={"Authorization": f"Bearer {key}"}, **kwargs)  # fmt: skip


def new_message(text: str, **extra) -> dict:
    return {
        "action": "next",
        "messages": [{"id": str(uuid.uuid4()), "author": {"role": "user"},
                      "content": {"content_type": "text", "parts": [text]}}],
        "parent_message_id": str(uuid.uuid4()),
        "model": "text-davinci-002-render-sha",
        **extra,
    }  # fmt: skip


def test_backend_api_jobs_are_watchable_and_conversations_stay_their_owners(stack):
    base = stack.start_web(env={"RELAY_API_KEYS": "owner-key,other-key"})
    stack.start_worker()
    with backend_post(base, new_message("watch me", simulator={"tokens": 30, "interval": 0.02}),
                      "owner-key", stream=True) as answer:  # fmt: skip
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        watch_url = answer.headers["X-Relay-Watch-Url"]
        events_url = answer.headers["X-Relay-Events-Url"]
        watched, _ = read_stream(events_url)  # a second viewer, with the watch link's token
        lines = [line for line in answer.iter_lines() if line.startswith(b"data: ")]
    assert "token=" in watch_url and watched.done
    assert lines[-1] == b"data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["message"]["content"]["parts"] == [watched.text]
    assert last["message"]["status"] == "finished_successfully" and last["error"] is None
    conversation, reply = last["conversation_id"], last["message"]["id"]
    # The web app's own model name became the relay's default model.
    sent = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    assert sent[-1]["model"] != "text-davinci-002-render-sha"

    follow_up = new_message("next", parent_message_id=reply, conversation_id=conversation)
    assert backend_post(base, follow_up, "owner-key").status_code == 200
    refused = [
        backend_post(base, follow_up, "other-key"),  # another key: as if it did not exist
        backend_post(base, {**follow_up, "conversation_id": str(uuid.uuid4())}, "owner-key"),
        backend_post(base, {**follow_up, "parent_message_id": str(uuid.uuid4())}, "owner-key"),
    ]
    for answer in refused:
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "message_not_found"
    watch_token = watch_url.split("token=")[1]  # a watch link is not a key
    assert backend_post(base, follow_up, watch_token).status_code == 401
    bad = backend_post(base, {"action": "variant", "messages": []}, "owner-key")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "action"


def test_on_an_open_relay_a_watch_link_continues_no_backend_api_conversation(stack):
    base = stack.start_web()  # no keys: the message id itself is the secret
    stack.start_worker()
    with backend_post(base, new_message("mine"), "", stream=True) as answer:
        events_url = answer.headers["X-Relay-Events-Url"]
        lines = [line for line in answer.iter_lines() if line.startswith(b"data: {")]
    conversation = json.loads(lines[-1][6:])["conversation_id"]
    watched, _ = read_stream(events_url)  # all a watch-link holder sees
    job_id = events_url.split("/v1/jobs/")[1].split("/")[0]
    token = events_url.split("token=")[1]
    chunk_id = json.loads(watched.data[0])["id"]
    for parent in (job_id, token, chunk_id):
        for conversation_id in (conversation, str(uuid.uuid4())):
            follow_up = new_message("theirs", parent_message_id=parent,
                                    conversation_id=conversation_id)  # fmt: skip
            refused = backend_post(base, follow_up, token)
            assert refused.status_code == 404, (parent, refused.text)
            assert refused.json()["error"]["code"] == "message_not_found"
