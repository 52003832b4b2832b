"""Conversations by message id, as the ``chatgpt`` npm package keeps them, owned by their creator.

Every job stores the messages it was given and, once it ends, the assistant's reply, each with
a pointer to its parent. A later request that names ``parentMessageId`` gets its history rebuilt
by walking that chain, newest first, until the token budget is spent; the system message is
always kept.

Who may continue a conversation: the API key that started it (``""`` when the relay runs open).
The ids a client may name as ``parentMessageId`` are handed out only to the creator (the job's
``POST`` answer, ``X-Relay-Message-Id``, chatgpt-web's lines): they are 122-bit random secrets,
distinct from the completion id viewers see in chunks. A watch link or a chunk therefore never
leads into the conversation, and an id presented by anyone but its owner is answered exactly as
an unknown one.

Storage is proportional to what was sent: one hash per conversation (:func:`relay.keys.
conversation`) holds its owner, each distinct system prompt once, and one compact record per
message; a follow-up reads only the records its token budget takes (a Lua script walks the chain
inside Redis). Only the two ids handed out per turn get a key of their own
(:func:`relay.keys.message`). Conversations outlive jobs (``CONVERSATION_TTL_SECONDS``).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass, fields
from typing import Any

from relay.core import keys, tokens
from relay.core.chunks import dumps, loads
from relay.core.connections import Client, as_text, script_in
from relay.core.errors import InvalidRequest, NotFound
from relay.core.settings import Settings

SYSTEM_ROLES = ("system", "developer")
MAX_DEPTH = 10_000  # a chain walk is bounded by its budget; this bounds a corrupt one as well
MAX_NEW_MESSAGES = 1_000  # records one request may add, whatever RELAY_MAX_MESSAGES says
NO_PARENT = "-"

# KEYS[1]: the conversation. ARGV: ttl, the parent's number (NO_PARENT: a new conversation),
# owner, system id, system text ('' if it is stored already), k, then k (record) values.
# Records: "<tokens> <parent> <role> <content JSON>". Returns the number given to the first new
# message (the reply's number is first + k), or 0 if the conversation to continue is gone.
_APPEND = """
local k = tonumber(ARGV[6])
if ARGV[2] == '-' then
  redis.call('HSET', KEYS[1], 'owner', ARGV[3])
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[1], 's:' .. ARGV[4], ARGV[5]) end
local first = redis.call('HINCRBY', KEYS[1], 'next', k + 1) - k
local parent = ARGV[2]
for i = 0, k - 1 do
  local tokens, rest = string.match(ARGV[7 + i], '^(%d+) (.*)$')
  redis.call('HSET', KEYS[1], 'm:' .. (first + i), tokens .. ' ' .. parent .. ' ' .. rest)
  parent = tostring(first + i)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return first
"""

# KEYS[1]: the conversation. ARGV: ttl, message number, record. A script and not HSET: Redis
# keeps a large HSET value in the buffer it was read into, up to twice its size.
_REPLY = """
redis.call('HSET', KEYS[1], 'm:' .. ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1]: the conversation. ARGV: the newest message's number, token budget, most messages.
# Walks the parent chain newest first and returns the records that fit the budget; a record
# over it is read only inside Redis, never sent.
_HISTORY = """
local out = {}
local n = ARGV[1]
local budget = tonumber(ARGV[2])
local most = tonumber(ARGV[3])
while n ~= '-' and #out < most do
  local record = redis.call('HGET', KEYS[1], 'm:' .. n)
  if not record then break end
  local a = string.find(record, ' ', 1, true)
  local b = string.find(record, ' ', a + 1, true)
  local cost = tonumber(string.sub(record, 1, a - 1))
  if cost > budget then break end
  budget = budget - cost
  out[#out + 1] = record
  n = string.sub(record, a + 1, b - 1)
end
return out
"""


def new_message_id() -> str:
    return str(uuid.uuid4())


def system_id(text: str) -> str:
    """A system prompt's name inside its conversation: stored once however often it is used."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Turn:
    """A job's place in its conversation, kept in the job's hash."""

    conversation_id: str
    message_id: str  # the reply's id: the next request's parentMessageId (creator only)
    parent_message_id: str  # the id of the last new message, which the reply answers
    reply_number: int  # the reply's record in the conversation
    parent_number: int
    system: str = ""  # the system prompt's id ("" for none), inherited by follow-ups
    # How many messages at the start (system) and end of the upstream request are new to the
    # conversation: what moderation must see.
    new_head: int = 0
    new_tail: int = 0

    def to_json(self) -> str:
        return dumps(self)  # orjson writes a dataclass itself (0.3 us; asdict's copy took 10)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Turn | None:
        """The turn, or None for one written by an older relay (its reply is not kept)."""
        values = loads(raw)
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in names})
        except TypeError:
            return None


@dataclass(frozen=True)
class Position:
    """Where a message id points: a message of a conversation the caller owns."""

    conversation_id: str
    number: int
    system: str  # the system prompt's id in force there ("" for none)
    system_text: str


@dataclass(frozen=True)
class Draft:
    """A prepared turn, nothing written yet: the caller checks its limits first."""

    request: dict[str, Any]  # what goes upstream
    owner: str  # who starts the conversation (a new one only)
    parent: Position | None
    new: list[dict[str, Any]]
    system: str
    system_text: str  # to store ("" if the conversation has it already)
    new_head: int


class Conversations:
    def __init__(
        self,
        redis: Client,
        *,
        ttl: int,
        max_context_tokens: int = Settings.max_context_tokens,
        max_response_tokens: int = Settings.max_response_tokens,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self.max_context_tokens = max_context_tokens
        self.max_response_tokens = max_response_tokens
        self._append = redis.register_script(_APPEND)
        self._history = redis.register_script(_HISTORY)
        self._reply = redis.register_script(_REPLY)

    def find(self, message_id: Any, owner: str) -> Position | None:
        """The message ``message_id`` names, if it exists and ``owner`` owns its conversation."""
        if not _plausible(message_id):
            return None
        handle = as_text(self.redis.get(keys.message(message_id))).split(" ")
        if len(handle) != 3 or not handle[1].isdigit():
            return None
        conversation_id, number, system = handle
        system = "" if system == NO_PARENT else system
        stored_owner, system_text = self.redis.hmget(
            keys.conversation(conversation_id), "owner", f"s:{system}"
        )
        if stored_owner is None or not hmac.compare_digest(
            as_text(stored_owner).encode(), owner.encode()
        ):
            return None
        return Position(conversation_id, int(number), system, as_text(system_text))

    def prepare(self, body: dict[str, Any], owner: str = "") -> Draft:
        """The request to send upstream, with its history rebuilt; writes nothing.

        ``body`` may carry ``parentMessageId``, ``systemMessage`` and ``prompt`` (the new user
        input, as an alternative to ``messages``); they are not sent upstream. A parent that
        does not exist or that ``owner`` does not own is :class:`NotFound`, alike.
        """
        request = dict(body)
        parent_id = request.pop("parentMessageId", None)
        given_system = request.pop("systemMessage", None)
        prompt = request.pop("prompt", None)
        new = list(request.get("messages") or [])
        if prompt is not None:
            new.append({"role": "user", "content": prompt})
        leading = []
        while new and new[0].get("role") in SYSTEM_ROLES:
            leading.append(new.pop(0))
        system = given_system
        if system is None and leading:
            system = "\n".join(tokens.content_text(m.get("content")) for m in leading)
        parent = None
        if parent_id is not None:
            parent = self.find(parent_id, owner)
            if parent is None:
                raise NotFound(
                    f"No message with id '{parent_id}' (unknown, or the conversation expired).",
                    param="parentMessageId",
                    code="message_not_found",
                )
            if system is None:
                system = parent.system_text or None
        if not new:
            raise InvalidRequest(
                "A new message is required: 'prompt' or a non-system entry in 'messages'.",
                param="messages",
                code="missing_required",
            )
        if len(new) > MAX_NEW_MESSAGES:
            raise InvalidRequest(
                f"Too many messages: {len(new)} (a conversation takes at most "
                f"{MAX_NEW_MESSAGES} at once).",
                param="messages",
                code="too_many_messages",
            )
        head = [{"role": "system", "content": system}] if system else []
        sid = system_id(system) if system else ""
        seen = parent is not None and sid == parent.system
        if parent is None:
            history: list[dict[str, Any]] = []
            head = leading if given_system is None else head
        else:
            reply_room = (
                request.get("max_tokens")
                or request.get("max_completion_tokens")
                or self.max_response_tokens
            )
            budget = self.max_context_tokens - reply_room - tokens.messages_tokens(head + new)
            history = self._read_history(parent, budget)
        request["messages"] = head + history + new
        return Draft(
            request=request,
            owner=owner,
            parent=parent,
            new=new,
            system=sid,
            system_text="" if seen else (system or ""),
            new_head=0 if seen else len(head),
        )

    def _read_history(self, parent: Position, budget: int) -> list[dict[str, Any]]:
        """The chain ending at ``parent``, oldest first, as much of it as fits ``budget``."""
        if budget <= 0:
            return []
        records = self._history(
            keys=[keys.conversation(parent.conversation_id)],
            args=[parent.number, budget, MAX_DEPTH],
        )
        history = []
        for record in reversed(records):
            _tokens, _parent, role, content = as_text(record).split(" ", 3)
            history.append({"role": role, "content": loads(content)})
        return history

    def save(self, draft: Draft, pipe: Any = None) -> Turn:
        """Store the draft's new messages after its parent: the turn the job will answer.

        With ``pipe``, what can wait is queued there, for the caller to send with its own
        writes (a new conversation's, on one Redis, all of it); without, it is sent here.
        """
        parent = draft.parent
        conversation_id = parent.conversation_id if parent else new_message_id()
        records = [_record(m.get("role"), m.get("content")) for m in draft.new]
        key = [keys.conversation(conversation_id)]
        args: list[str | int] = [self.ttl, str(parent.number) if parent else NO_PARENT, draft.owner,
                draft.system or NO_PARENT, draft.system_text, len(records), *records]  # fmt: skip
        message_id, question_id = new_message_id(), new_message_id()
        own = pipe is None
        if own:
            pipe = self.redis.pipeline(transaction=False)
        if parent is None:
            # A new conversation numbers its messages from 1: the question's id can be written
            # in the same round trip.
            first = 1
            script_in(self.redis, pipe, self._append, key, args)
        else:
            first = int(self._append(keys=key, args=args))
            if not first:  # expired between prepare and save
                raise NotFound(
                    "The conversation expired.", param="parentMessageId", code="message_not_found"
                )
        self._point(question_id, conversation_id, first + len(records) - 1, draft.system, pipe)
        if own:
            pipe.execute()
        return Turn(
            conversation_id=conversation_id,
            message_id=message_id,
            parent_message_id=question_id,
            reply_number=first + len(records),
            parent_number=first + len(records) - 1,
            system=draft.system,
            new_head=draft.new_head,
            new_tail=len(draft.new),
        )

    def save_reply(self, turn: Turn, text: str, cost: int | None = None) -> None:
        """Store the assistant's reply (complete or cancelled) so it can be a parent.

        ``cost``: its tokens, if the caller counted them already (see :func:`reply_cost`).
        """
        record = _record("assistant", text, cost)
        tokens_, rest = record.split(" ", 1)
        pipe = self.redis.pipeline(transaction=False)
        script_in(
            self.redis,
            pipe,
            self._reply,
            [keys.conversation(turn.conversation_id)],
            [self.ttl, turn.reply_number, f"{tokens_} {turn.parent_number} {rest}"],
        )
        self._point(turn.message_id, turn.conversation_id, turn.reply_number, turn.system, pipe)
        pipe.execute()

    def forget(self, draft: Draft, turn: Turn) -> None:
        """Undo :meth:`save` for a turn whose job was never stored: its question's id goes,
        and a new conversation with it (an older one keeps the messages, which no id names)."""
        self.redis.delete(keys.message(turn.parent_message_id))
        if draft.parent is None:
            self.redis.delete(keys.conversation(turn.conversation_id))

    def _point(
        self, message_id: str, conversation_id: str, number: int, system: str, pipe: Any = None
    ) -> None:
        """Make ``message_id`` name a message (a key of its own: only handed-out ids get one)."""
        value = f"{conversation_id} {number} {system or NO_PARENT}"
        # As the command itself: redis-py's set() checks a dozen options first (0.01 ms).
        (pipe or self.redis).execute_command("SET", keys.message(message_id), value, "EX",
                                             self.ttl)  # fmt: skip


def reply_cost(text: str) -> int:
    """The tokens a reply takes in a history."""
    return tokens.message_tokens({"role": "assistant", "content": text})


def _record(role: Any, content: Any, cost: int | None = None) -> str:
    """A message as the append script takes it: ``"<tokens> <role> <content JSON>"``."""
    if cost is None:
        cost = tokens.message_tokens({"role": role, "content": content})
    return f"{cost} {role} {dumps(content)}"


def _plausible(message_id: Any) -> bool:
    """Ids are opaque strings to clients; refuse only what could not name a key safely."""
    return isinstance(message_id, str) and 0 < len(message_id) <= 128 and "}" not in message_id
