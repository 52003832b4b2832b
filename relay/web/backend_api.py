"""ChatGPT's own web protocol, ``POST /backend-api/conversation``: what the ``chatgpt`` npm
package's ``ChatGPTUnofficialProxyAPI`` speaks (its ``apiReverseProxyUrl``), as chatgpt-web does
in access-token mode.

The request is ``{"action": "next", "messages": [{"id", "author": {"role"} | "role",
"content": {"content_type": "text", "parts": [...]}}], "parent_message_id",
"conversation_id"?, "model"}``; the answer is ``text/event-stream`` of ``data: {"message":
{"id", "author": {"role": "assistant"}, "content": {"content_type": "text", "parts": [<the whole
text so far>]}, "status", "end_turn", "metadata"}, "conversation_id", "error": null}`` events and
``data: [DONE]``. Jobs made here are ordinary jobs (watch link, resume, cancel); the ``Bearer``
token the client sends as its access token is a relay API key, and conversations follow the
same ownership rules as everywhere else.

The package always sends a ``parent_message_id``, a random one on a conversation's first
message (with no ``conversation_id``): only a request that names a ``conversation_id`` continues
one, and then its parent must be a reply of that conversation the caller may continue. The ids
the relay returns (the reply's ``message.id``, ``conversation_id``) are v4 UUIDs, which the
package requires of what it sends back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g

from relay.core.chunks import dumps, failure, loads
from relay.core.conversations import Turn
from relay.core.errors import InvalidRequest, NotFound
from relay.web import guessing
from relay.web.api import link_headers
from relay.web.auth import require_api_key
from relay.web.fanout import LiveEvent
from relay.web.sse import format_comment
from relay.web.state import state
from relay.web.streams import open_stream, stream_response
from relay.web.submission import json_body, submit_job

backend_api = Blueprint("backend_api", __name__, url_prefix="/backend-api")

# ChatGPT's web app names its own models; sent upstream they would be unknown, so a request
# naming one gets the relay's default model.
WEB_APP_MODELS = ("text-davinci-002-render", "auto")
ROLES = ("user", "system")


@backend_api.before_request
def _authenticate() -> None:
    require_api_key()  # the client's access token: a relay API key once keys exist


@backend_api.post("/conversation")
def conversation() -> Response:
    body = json_body()
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_type")
    action = body.get("action", "next")
    if action != "next":
        raise InvalidRequest(
            f"Only action 'next' is supported (not {str(action)[:40]!r}).",
            param="action",
            code="unsupported_value",
        )
    job: dict[str, Any] = {"messages": _messages(body.get("messages")), "stream": True}
    model = body.get("model")
    if isinstance(model, str) and model and not model.startswith(WEB_APP_MODELS):
        job["model"] = model
    conversation_id = body.get("conversation_id")
    if conversation_id is not None:
        job["parentMessageId"] = _parent_in(conversation_id, body.get("parent_message_id"))
    submission = submit_job(job, watch=lambda job_id, _: open_stream(job_id))
    turn = submission.turn
    return stream_response(
        submission.job_id,
        0,
        lambda events, _viewer: conversation_events(events, turn),
        mimetype="text/event-stream",
        headers={
            **link_headers(submission),
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },  # fmt: skip
        owner=True,  # the client aborting its request cancels the job, as with chat streams
        opened=submission.opened,
    )


def _messages(raw: Any) -> list[dict[str, str]]:
    """The request's messages as Chat Completions messages."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages",
                             code="invalid_type")  # fmt: skip
    out = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where, code="invalid_type")
        author = message.get("author")
        role = author.get("role") if isinstance(author, dict) else message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"'{where}' must be from 'user' or 'system' (author.role or role).",
                param=f"{where}.author.role",
                code="invalid_value",
            )
        content = message.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        if (
            not isinstance(content, dict)
            or content.get("content_type", "text") != "text"
            or not isinstance(parts, list)
            or not all(isinstance(p, str) for p in parts)
        ):
            raise InvalidRequest(
                f'\'{where}.content\' must be {{"content_type": "text", "parts": [strings]}}.',
                param=f"{where}.content",
                code="invalid_type",
            )
        out.append({"role": role, "content": "\n".join(parts)})
    return out


def _parent_in(conversation_id: Any, parent: Any) -> str:
    """The parent a follow-up names, checked to be a message of ``conversation_id`` that the
    caller may continue; anything else is 404, worded as for a message that does not exist."""
    relay = state()
    owner = g.api_key["id"] if g.get("api_key") else ""
    guessing.check()
    position = relay.conversations.find(parent, owner) if isinstance(parent, str) else None
    if position is None or position.conversation_id != conversation_id:
        guessing.failed()  # a message id is a secret: an unknown one may be a guess
        raise NotFound(
            "No message with that parent_message_id exists in that conversation.",
            param="parent_message_id",
            code="message_not_found",
        )
    return str(parent)


def conversation_events(events: Iterator[LiveEvent | None], turn: Turn) -> Iterator[bytes]:
    """The job's chunks as ChatGPT's conversation events: the whole text so far in each."""
    text = ""

    def event(status: str, end_turn: bool | None, error: str | None = None,
              finish: str | None = None) -> bytes:  # fmt: skip
        message: dict[str, Any] = {
            "id": turn.message_id,
            "author": {"role": "assistant", "name": None, "metadata": {}},
            "content": {"content_type": "text", "parts": [text]},
            "status": status,
            "end_turn": end_turn,
            "weight": 1.0,
            "metadata": {"finish_details": {"type": finish}} if finish else {},
            "recipient": "all",
        }
        payload = {"message": message, "conversation_id": turn.conversation_id, "error": error}
        return b"data: " + dumps(payload).encode() + b"\n\n"

    for live in events:
        if live is None:
            yield format_comment("keep-alive")
            continue
        if live.done:
            yield b"data: [DONE]\n\n"
            return
        chunk = loads(live.data)
        if (why := failure(chunk)) is not None:
            yield event("finished_with_error", True, why)
            continue
        choice = (chunk.get("choices") or [{}])[0]
        delta = (choice.get("delta") or {}).get("content") or ""
        finish = choice.get("finish_reason")
        if not delta and not finish:
            continue  # the role chunk, a usage chunk
        text += delta
        if finish:
            yield event("finished_successfully", True, finish=finish)
        else:
            yield event("in_progress", None)
