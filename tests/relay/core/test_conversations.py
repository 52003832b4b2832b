"""Conversations by message id: history rebuilt from the parent chain within a token budget."""

from __future__ import annotations

import json

import fakeredis
import pytest

from relay.core import tokens
from relay.core.conversations import Conversations, Turn
from relay.core.errors import InvalidRequest, NotFound
from tests.helpers import stored_message


@pytest.fixture
def conversations():
    return Conversations(
        fakeredis.FakeRedis(), ttl=600, max_context_tokens=4096, max_response_tokens=1000
    )


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def start(conversations: Conversations, body: dict, owner: str = "") -> tuple[dict, Turn]:
    """Prepare and store one turn, as the API does: (the upstream request, the turn)."""
    draft = conversations.prepare(body, owner)
    return draft.request, conversations.save(draft)


def reply(conversations: Conversations, turn, text: str) -> str:
    conversations.save_reply(turn, text)
    return turn.message_id


def test_a_chain_is_rebuilt_in_order_with_the_system_message(conversations):
    first, turn1 = start(
        conversations,
        {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, user("one")]},
    )
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, user("one")]
    a1 = reply(conversations, turn1, "first answer")
    second, turn2 = start(conversations, {"model": "m", "parentMessageId": a1, "prompt": "two"})
    a2 = reply(conversations, turn2, "second answer")
    third, _ = start(conversations, {"model": "m", "parentMessageId": a2, "messages": [user("3")]})
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
    assert stored_message(conversations, turn2.parent_message_id) == {
        "role": "user",
        "content": "two",
        "parent": str(turn1.reply_number),
    }


def test_system_message_override_replaces_the_inherited_one(conversations):
    _, turn = start(conversations, {"model": "m", "systemMessage": "old", "prompt": "hi"})
    parent = reply(conversations, turn, "hello")
    request, _ = start(
        conversations,
        {"model": "m", "parentMessageId": parent, "systemMessage": "new", "prompt": "again"},
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
        _, turn = start(conversations, body)
        parent = reply(conversations, turn, f"answer {i} {words}")
    request, _ = start(conversations, {"model": "m", "parentMessageId": parent, "prompt": "last"})
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
    _, turn = start(conversations, {"model": "m", "prompt": "word " * 100})
    parent = reply(conversations, turn, "ok")
    roomy, _ = start(conversations, {"model": "m", "parentMessageId": parent, "prompt": "x"})
    tight, _ = start(
        conversations, {"model": "m", "parentMessageId": parent, "prompt": "x", "max_tokens": 250}
    )
    assert len(roomy["messages"]) == 3  # the long first message fits the default room
    assert [m["content"] for m in tight["messages"]] == ["ok", "x"]  # not with 250 reserved


def test_an_unknown_parent_is_an_error_never_a_new_conversation(conversations):
    with pytest.raises(NotFound) as info:
        conversations.prepare({"model": "m", "parentMessageId": "nope", "prompt": "hi"})
    assert info.value.to_dict()["error"]["param"] == "parentMessageId"


def test_messages_outlive_jobs_with_their_own_ttl(conversations):
    _, turn = start(conversations, {"model": "m", "prompt": "hi"})
    conversations.save_reply(turn, "hello")
    for key in (f"relay:{{{turn.message_id}}}:message",
                f"relay:{{{turn.conversation_id}}}:conversation"):  # fmt: skip
        assert 500 < conversations.redis.ttl(key) <= 600


def test_token_counting_is_real_bpe_and_offline():
    # cl100k_base: "Hello world" is two tokens; a 4-characters estimate would say three.
    assert tokens.count("Hello world") == 2
    assert tokens.count("") == 0


def refusal(error: NotFound, asked: str) -> dict:
    """The error as a client sees it, with the id it asked about taken out."""
    body = error.to_dict()
    body["error"]["message"] = body["error"]["message"].replace(asked, "<id>")
    return body


def test_only_the_owner_may_continue_and_others_are_told_the_id_does_not_exist(conversations):
    _, turn = start(conversations, {"model": "m", "systemMessage": "A's secret", "prompt": "hi"},
                    owner="key-a")  # fmt: skip
    conversations.save_reply(turn, "hello")
    with pytest.raises(NotFound) as unknown:
        conversations.prepare({"model": "m", "parentMessageId": "no-such-id", "prompt": "x"})
    for owner in ("key-b", ""):  # another key; anyone at all while the relay runs open
        for parent in (turn.message_id, turn.parent_message_id):
            with pytest.raises(NotFound) as foreign:
                conversations.prepare(
                    {"model": "m", "parentMessageId": parent, "prompt": "x"}, owner
                )
            assert refusal(foreign.value, parent) == refusal(unknown.value, "no-such-id")
    request, _ = start(
        conversations, {"model": "m", "parentMessageId": turn.message_id, "prompt": "x"}, "key-a"
    )
    assert request["messages"][0] == {"role": "system", "content": "A's secret"}


def test_an_open_conversation_is_not_continued_by_a_key(conversations):
    _, turn = start(conversations, {"model": "m", "prompt": "hi"})
    conversations.save_reply(turn, "hello")
    with pytest.raises(NotFound):
        conversations.prepare({"model": "m", "parentMessageId": turn.message_id, "prompt": "x"},
                              "key-a")  # fmt: skip


def test_preparing_writes_nothing(conversations):
    _, turn = start(conversations, {"model": "m", "prompt": "hi"})
    conversations.save_reply(turn, "hello")
    redis = conversations.redis
    before = {key: redis.dump(key) for key in redis.keys()}
    conversations.prepare({"model": "m", "parentMessageId": turn.message_id,
                           "systemMessage": "new", "prompt": "x"})  # fmt: skip
    assert {key: redis.dump(key) for key in redis.keys()} == before


def test_a_system_prompt_is_stored_once_per_conversation(conversations):
    system = "You are a pirate. " * 2000  # 36 kB
    parent = None
    for i in range(5):
        body = {"model": "m", "systemMessage": system, "prompt": f"q{i}"}
        if parent:
            body["parentMessageId"] = parent
        _, turn = start(conversations, body)
        conversations.save_reply(turn, f"a{i}")
        parent = turn.message_id
    redis = conversations.redis
    stored = b"".join(
        b"".join(redis.hvals(key)) if redis.type(key) == b"hash" else redis.get(key)
        for key in redis.keys()
    )
    assert stored.count(b"pirate") == 2000  # once, not once per message
    assert len(stored) < len(system) + 2000


def test_a_follow_up_reads_only_what_its_budget_takes():
    """Walking the chain happens inside Redis: records past the budget are never sent."""
    redis = fakeredis.FakeRedis()
    conversations = Conversations(redis, ttl=600, max_context_tokens=400, max_response_tokens=50)
    words = "lorem ipsum dolor sit amet " * 40  # about 200 tokens a message, 1 kB
    parent = None
    for i in range(100):  # 200 messages, 200 kB
        body = {"model": "m", "prompt": f"{i} {words}"}
        if parent:
            body["parentMessageId"] = parent
        _, turn = start(conversations, body)
        conversations.save_reply(turn, f"{i} {words}")
        parent = turn.message_id
    received = []
    execute = redis.execute_command

    def counting(*args, **kwargs):
        reply = execute(*args, **kwargs)
        received.append(len(repr(reply)))
        return reply

    redis.execute_command = counting  # type: ignore[method-assign]
    request = conversations.prepare({"model": "m", "parentMessageId": parent, "prompt": "x"})
    assert len(request.request["messages"]) == 2  # one 200-token message fits 400 - 50
    print(f"follow-up read {sum(received)} bytes of a 200 kB conversation")
    assert sum(received) < 2 * len(words)


def test_one_request_adds_a_bounded_number_of_records(conversations):
    many = [user("w")] * 1001
    with pytest.raises(InvalidRequest) as info:
        conversations.prepare({"model": "m", "messages": many})
    assert info.value.code == "too_many_messages"
    assert conversations.redis.dbsize() == 0


def test_a_turn_is_stored_as_json_with_its_field_names_and_read_back_whole():
    turn = Turn("conv", "reply", "parent", 3, 2, system="sys", new_head=1, new_tail=2)
    stored = turn.to_json()
    assert json.loads(stored) == {
        "conversation_id": "conv", "message_id": "reply", "parent_message_id": "parent",
        "reply_number": 3, "parent_number": 2, "system": "sys", "new_head": 1, "new_tail": 2,
    }  # fmt: skip
    assert Turn.from_json(stored) == turn
