"""Conversations by message id, as the ``chatgpt`` npm package keeps them.

Every job stores the messages it was given and, once it ends, the assistant's reply, each with
an id and a pointer to its parent. A later request that names ``parentMessageId`` gets its
history rebuilt by walking that chain, newest first, until the token budget is spent; the
system message is always kept. Messages outlive jobs (``CONVERSATION_TTL_SECONDS``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis

from . import keys, tokens
from .chunks import dumps, loads
from .errors import InvalidRequest, NotFound

SYSTEM_ROLES = ("system", "developer")
MAX_DEPTH = 10_000  # a chain is walked one message per round trip: bound it


def new_message_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Turn:
    """A job's place in its conversation."""

    message_id: str  # the assistant's reply: the next request's parentMessageId
    parent_message_id: str  # the user message it answers
    system: str | None

    def to_json(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Turn:
        return cls(**loads(raw))


class Conversations:
    def __init__(
        self,
        redis: Redis,
        *,
        ttl: int,
        max_context_tokens: int = 4096,
        max_response_tokens: int = 1000,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self.max_context_tokens = max_context_tokens
        self.max_response_tokens = max_response_tokens

    def get(self, message_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(keys.message(message_id)) if _plausible(message_id) else None
        return loads(raw) if raw else None

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], Turn]:
        """The request to send upstream, with its history rebuilt, and the turn it makes.

        ``body`` may carry ``parentMessageId``, ``systemMessage`` and ``prompt`` (the new user
        input, as an alternative to ``messages``); they are not sent upstream.
        """
        request = dict(body)
        parent_id = request.pop("parentMessageId", None)
        system = request.pop("systemMessage", None)
        prompt = request.pop("prompt", None)
        new = list(request.get("messages") or [])
        if prompt is not None:
            new.append({"role": "user", "content": prompt})
        leading = []
        while new and new[0].get("role") in SYSTEM_ROLES:
            leading.append(new.pop(0))
        if system is None and leading:
            system = "\n".join(tokens.content_text(m.get("content")) for m in leading)
        parent = None
        if parent_id is not None:
            parent = self.get(parent_id)
            if parent is None:
                raise NotFound(
                    f"No message with id '{parent_id}' (unknown, or the conversation expired).",
                    param="parentMessageId",
                    code="message_not_found",
                )
            if system is None:
                system = parent.get("system")
        if not new:
            raise InvalidRequest(
                "A new message is required: 'prompt' or a non-system entry in 'messages'.",
                param="messages",
                code="missing_required",
            )
        head = [{"role": "system", "content": system}] if system else []
        if parent is None:
            history: list[dict[str, Any]] = []
            head = leading if body.get("systemMessage") is None else head
        else:
            reply_room = (
                request.get("max_tokens")
                or request.get("max_completion_tokens")
                or self.max_response_tokens
            )
            budget = self.max_context_tokens - reply_room - tokens.messages_tokens(head + new)
            history = self._history(parent, budget)
        request["messages"] = head + history + new
        last_id = self._store_new(new, parent_id, system)
        return request, Turn(new_message_id(), last_id, system)

    def _history(self, parent: dict[str, Any], budget: int) -> list[dict[str, Any]]:
        """The chain ending at ``parent``, oldest first, as much of it as fits ``budget``."""
        newest_first: list[dict[str, Any]] = []
        node: dict[str, Any] | None = parent
        while node is not None and len(newest_first) < MAX_DEPTH:
            message = {"role": node["role"], "content": node["content"]}
            cost = tokens.message_tokens(message)
            if cost > budget:
                break
            budget -= cost
            newest_first.append(message)
            node = self.get(node["parentMessageId"]) if node.get("parentMessageId") else None
        return newest_first[::-1]

    def _store_new(
        self, messages: list[dict[str, Any]], parent_id: str | None, system: str | None
    ) -> str:
        """Chain the new messages after ``parent_id``; the id of the last one."""
        pipe = self.redis.pipeline(transaction=False)
        for message in messages:
            message_id = new_message_id()
            record = {
                "id": message_id,
                "role": message.get("role"),
                "content": message.get("content"),
                "parentMessageId": parent_id,
                "system": system,
                "createdAt": time.time(),
            }
            pipe.set(keys.message(message_id), dumps(record), ex=self.ttl)
            parent_id = message_id
        pipe.execute()
        assert parent_id is not None
        return parent_id

    def save_reply(self, turn: Turn, text: str) -> None:
        """Store the assistant's reply (complete or cancelled) so it can be a parent."""
        record = {
            "id": turn.message_id,
            "role": "assistant",
            "content": text,
            "parentMessageId": turn.parent_message_id,
            "system": turn.system,
            "createdAt": time.time(),
        }
        self.redis.set(keys.message(turn.message_id), dumps(record), ex=self.ttl)


def _plausible(message_id: Any) -> bool:
    """Ids are opaque strings to clients; refuse only what could not name a key safely."""
    return isinstance(message_id, str) and 0 < len(message_id) <= 128 and "}" not in message_id
