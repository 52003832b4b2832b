"""The moderation pre-check: everything new in a request goes to the upstream's ``/moderations``
endpoint before the chat call, and flagged input never reaches the chat upstream."""

from __future__ import annotations

from typing import Any

import orjson
import requests

from relay.core.conversations import Turn
from relay.core.tokens import content_text

from .upstream import Upstream, UpstreamError

REFUSAL = "I can't help with that request: it was flagged by the content policy."


def new_input(body: dict[str, Any], turn: Turn | None) -> list[str]:
    """The texts the upstream has not seen in this conversation: every message the client sent
    (whatever its role, earlier turns and a new system prompt included), not the history the
    relay rebuilt from checked turns."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if turn is not None:
        tail = messages[len(messages) - turn.new_tail :] if turn.new_tail else []
        messages = messages[: turn.new_head] + tail
    texts = (content_text(m.get("content")) for m in messages)
    return [text for text in texts if text]


def is_flagged(
    session: requests.Session, upstream: Upstream, texts: list[str], model: str = ""
) -> bool:
    """Ask the moderation endpoint about ``texts`` at once; :class:`UpstreamError` if it
    cannot answer. Nothing to check is not flagged."""
    if not texts:
        return False
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    payload: dict[str, Any] = {"input": texts}
    if model:
        payload["model"] = model
    url = upstream.base_url.rstrip("/") + "/moderations"
    try:
        response = session.post(
            url,
            data=orjson.dumps(payload),
            headers=headers,
            timeout=(upstream.connect_timeout, upstream.read_timeout),
        )
        response.raise_for_status()
        results = response.json()["results"]
        return any(bool(result.get("flagged")) for result in results)
    except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UpstreamError(
            f"The moderation check is unavailable ({exc.__class__.__name__}); the request was "
            "not sent to the model.",
            code="moderation_unavailable",
        ) from None
