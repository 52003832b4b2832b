"""The API of the chatgpt-web project's back end, so its front end works against the relay.

``POST /api/chat-process`` answers ``application/octet-stream``: JSON objects separated by
``\\n`` — the first without one before it, as chatgpt-web's own server writes them — each
``{"role", "id", "parentMessageId", "text", "delta", "detail"}``; the front end splits on newlines
and parses the last complete line, and sends ``id`` back as the next
``options.parentMessageId``. Jobs made here are ordinary jobs: watchable, cancellable, stored
in the conversation.

Who may use it: once the relay has API keys, a key (the front end's "secret key" setting, sent
as ``Authorization: Bearer``), and its conversations are that key's; ``RELAY_CHATGPT_WEB_SECRET``
gates an open relay (no keys) and never stands in for a key.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from relay.core import apikeys
from relay.core.chunks import dumps, failure, loads
from relay.core.conversations import Turn
from relay.core.errors import InvalidRequest, RelayError, Unauthorized
from relay.web import guessing
from relay.web.api import link_headers
from relay.web.auth import keys_required, require_api_key
from relay.web.fanout import LiveEvent
from relay.web.state import settings, state
from relay.web.streams import open_stream, stream_response
from relay.web.submission import json_body, submit_job

chatgpt_web = Blueprint("chatgpt_web", __name__, url_prefix="/api")


def _reply(status: str, message: str = "", data: Any = None, http_status: int = 200) -> Response:
    response = jsonify({"status": status, "message": message, "data": data})
    response.status_code = http_status
    return response


def _secret() -> str:
    return settings().chatgpt_web_secret


def _check_secret() -> None:
    """A relay API key once keys exist; otherwise chatgpt-web's secret, when one is set."""
    if require_api_key() is not None:
        return
    secret = _secret()
    if not secret:
        return
    guessing.check()
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), secret.encode()):
        guessing.failed()
        raise Unauthorized(
            "Error: No access rights (set the secret key in the page's settings).",
            code="invalid_secret",
        )


@chatgpt_web.errorhandler(RelayError)
def _error(error: RelayError) -> Response:
    """chatgpt-web's ``{"status": "Fail", ...}`` shape, plus OpenAI's ``error`` object."""
    status = "Unauthorized" if isinstance(error, Unauthorized) else "Fail"
    response = jsonify(
        {"status": status, "message": error.message, "data": None, **error.to_dict()}
    )
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


@chatgpt_web.post("/session")
def session() -> Response:
    # auth: true makes the front end ask for a "secret key" and send it as a Bearer token.
    auth = keys_required() or bool(_secret())
    return _reply("Success", data={"auth": auth, "model": "ChatGPTAPI"})


@chatgpt_web.post("/verify")
def verify() -> Response:
    """Check what the front end's user typed as its secret key: a relay API key once keys
    exist, else chatgpt-web's secret."""
    body = json_body()
    token = body.get("token") if isinstance(body, dict) else None
    if not token or not isinstance(token, str):
        raise InvalidRequest("Secret key is empty", param="token", code="missing_required")
    guessing.check()
    guessing.failed()  # every attempt counts: this endpoint answers nothing but "right or not"
    if keys_required():
        valid = apikeys.authenticate(state().redis, f"Bearer {token}") is not None
    else:
        valid = hmac.compare_digest(token.encode(), _secret().encode())
    if not valid:
        raise Unauthorized("Secret key is invalid", code="invalid_secret")
    return _reply("Success", "Verify successfully")


@chatgpt_web.post("/config")
def config() -> Response:
    _check_secret()
    data = {
        "apiModel": "ChatGPTAPI",
        "reverseProxy": "-",
        "timeoutMs": int(settings().upstream_read_timeout * 1000),
        "socksProxy": "-",
        "httpsProxy": "-",
        "balance": "-",
    }
    return _reply("Success", data=data)


@chatgpt_web.post("/chat-process")
def chat_process() -> Response:
    _check_secret()
    body = json_body()
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise InvalidRequest("'prompt' must be a string.", param="prompt", code="invalid_type")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be an object.", param="options", code="invalid_type")
    # Other fields (temperature, top_p, ...) pass through to the upstream like any parameter.
    job = {k: v for k, v in body.items() if k != "options" and v not in (None, "")}
    job["stream"] = True
    if options.get("parentMessageId"):
        job["parentMessageId"] = options["parentMessageId"]
    submission = submit_job(job, watch=lambda job_id, _: open_stream(job_id))
    return stream_response(
        submission.job_id,
        0,
        lambda events, _viewer: chat_process_lines(events, submission.turn),
        mimetype="application/octet-stream",
        headers=link_headers(submission),
        owner=True,  # the front end's Stop button aborts the request: that cancels the job
        opened=submission.opened,
    )


def chat_process_lines(events: Iterator[LiveEvent | None], turn: Turn) -> Iterator[bytes]:
    """One JSON object per chunk that adds text (and for the finishing one), as chatgpt's
    ``onProgress`` reports them: ``text`` so far, ``delta``, and the chunk as ``detail``."""
    text = ""
    separator = b""
    for event in events:
        if event is None:
            continue  # this format has no keep-alive
        if event.done:
            return
        chunk = loads(event.data)
        # A chunk of an odd shape (workers refuse them) ends the stream as an error too.
        if (why := failure(chunk)) is not None:
            line: dict[str, Any] = {"status": "Fail", "message": why, "data": None}
        else:
            choice = (chunk.get("choices") or [{}])[0]
            delta = (choice.get("delta") or {}).get("content") or ""
            if not delta and not choice.get("finish_reason"):
                continue  # the role chunk, a usage chunk
            text += delta
            line = {
                "role": "assistant",
                "id": turn.message_id,
                "parentMessageId": turn.parent_message_id,
                "text": text,
                "delta": delta,
                "detail": chunk,
            }
        yield separator + dumps(line).encode()
        separator = b"\n"
