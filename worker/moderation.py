"""The moderation pre-check: the user's new input goes to the upstream's ``/moderations``
endpoint before the chat call, and flagged input never reaches the chat upstream."""

from __future__ import annotations

from typing import Any

import orjson
import requests

from relay.tokens import content_text

from .upstream import Upstream, UpstreamError

REFUSAL = "I can't help with that request: it was flagged by the content policy."


def new_input(body: dict[str, Any]) -> str:
    """The text of the last user message: the new turn (earlier turns were checked before)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def is_flagged(session: requests.Session, upstream: Upstream, text: str, model: str = "") -> bool:
    """Ask the moderation endpoint; :class:`UpstreamError` if it cannot answer."""
    headers = {"Content-Type": "application/json"}
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    payload: dict[str, Any] = {"input": text}
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
