"""Conversations by message id: history rebuilt from the parent chain within a token budget."""

from __future__ import annotations

import fakeredis
import pytest

from relay import tokens
from relay.conversations import Conversations
from relay.errors import NotFound


@pytest.fixture
def conversations():
    return Conversations(
        fakeredis.FakeRedis(), ttl=600, max_context_tokens=4096, max_response_tokens=1000
    )


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def reply(conversations: Conversations, turn, text: str) -> str:
    conversations.save_reply(turn, text)
    return turn.message_id


def test_a_chain_is_rebuilt_in_order_with_the_system_message(conversations):
    first, turn1 = conversations.prepare(
        {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, user("one")]}
    )
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, user("one")]
    a1 = reply(conversations, turn1, "first answer")
    second, turn2 = conversations.prepare({"model": "m", "parentMessageId": a1, "prompt": "two"})
    a2 = reply(conversations, turn2, "second answer")
    third, _ = conversations.prepare({"model": "m", "parentMessageId": a2, "messages": [user("3")]})
    assert third["messages"] == [
        {"role": "system", "content": "Be brief."},  # inherited along the chain
        user("one"),
        {"role": "assistant", "content": "first answer"},
        user("two"),
        {"role": "assistant", "content": "second answer"},
        user("3"),
    ]
    assert "parentMessageId" not in third and "prompt" not in second
    assert turn2.parent_message_id != a1  # the reply answers the new user message
    assert conversations.get(turn2.parent_message_id)["parentMessageId"] == a1


def test_system_message_override_replaces_the_inherited_one(conversations):
    _, turn = conversations.prepare({"model": "m", "systemMessage": "old", "prompt": "hi"})
    parent = reply(conversations, turn, "hello")
    request, _ = conversations.prepare(
        {"model": "m", "parentMessageId": parent, "systemMessage": "new", "prompt": "again"}
    )
    assert request["messages"][0] == {"role": "system", "content": "new"}
    assert [m["content"] for m in request["messages"][1:]] == ["hi", "hello", "again"]


def test_a_long_chain_is_trimmed_from_the_oldest_end_keeping_the_system_message():
    conversations = Conversations(
        fakeredis.FakeRedis(), ttl=600, max_context_tokens=300, max_response_tokens=50
    )
    words = "lorem ipsum dolor sit amet " * 8  # about 40 tokens a message
    parent = None
    for i in range(12):
        body = {"model": "m", "systemMessage": "You are terse.", "prompt": f"{i} {words}"}
        if parent:
            body["parentMessageId"] = parent
        _, turn = conversations.prepare(body)
        parent = reply(conversations, turn, f"answer {i} {words}")
    request, _ = conversations.prepare({"model": "m", "parentMessageId": parent, "prompt": "last"})
    messages = request["messages"]
    assert messages[0] == {"role": "system", "content": "You are terse."}
    assert messages[-1] == user("last")
    history = messages[1:-1]
    assert 2 <= len(history) < 24, "some, not all, of the 24 earlier messages fit"
    assert history[-1]["content"].startswith("answer 11")  # the newest are kept
    assert tokens.messages_tokens(messages) <= 300 - 50


def test_the_reply_room_follows_max_tokens():
    conversations = Conversations(
        fakeredis.FakeRedis(), ttl=600, max_context_tokens=300, max_response_tokens=50
    )
    _, turn = conversations.prepare({"model": "m", "prompt": "word " * 100})
    parent = reply(conversations, turn, "ok")
    roomy, _ = conversations.prepare({"model": "m", "parentMessageId": parent, "prompt": "x"})
    tight, _ = conversations.prepare(
        {"model": "m", "parentMessageId": parent, "prompt": "x", "max_tokens": 250}
    )
    assert len(roomy["messages"]) == 3  # the long first message fits the default room
    assert [m["content"] for m in tight["messages"]] == ["ok", "x"]  # not with 250 reserved


def test_an_unknown_parent_is_an_error_never_a_new_conversation(conversations):
    with pytest.raises(NotFound) as info:
        conversations.prepare({"model": "m", "parentMessageId": "nope", "prompt": "hi"})
    assert info.value.to_dict()["error"]["param"] == "parentMessageId"


def test_messages_outlive_jobs_with_their_own_ttl(conversations):
    _, turn = conversations.prepare({"model": "m", "prompt": "hi"})
    conversations.save_reply(turn, "hello")
    ttl = conversations.redis.ttl(f"relay:{{{turn.message_id}}}:message")
    assert 500 < ttl <= 600


def test_token_counting_is_real_bpe_and_offline():
    # cl100k_base: "Hello world" is two tokens; a 4-characters estimate would say three.
    assert tokens.count("Hello world") == 2
    assert tokens.count("") == 0
