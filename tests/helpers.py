"""Client-side helpers for tests: read an SSE stream with the worker's own strict decoder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from relay.core import keys
from worker.sse_decoder import SSEDecoder


@dataclass
class Received:
    ids: list[int]
    data: list[str]
    comments_or_retry_seen: bool = False

    @property
    def done(self) -> bool:
        return bool(self.data) and self.data[-1] == "[DONE]"

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(d) for d in self.data if d != "[DONE]"]

    @property
    def text(self) -> str:
        """The assistant text reassembled from the chunks' deltas."""
        out = []
        for chunk in self.chunks:
            for choice in chunk.get("choices") or ():
                out.append((choice.get("delta") or {}).get("content") or "")
        return "".join(out)

    @property
    def errors(self) -> list[dict]:
        return [c["error"] for c in self.chunks if c.get("error")]

    @property
    def finish_reasons(self) -> list[str]:
        return [
            ch["finish_reason"]
            for c in self.chunks
            for ch in c.get("choices") or ()
            if ch.get("finish_reason")
        ]


def read_stream(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    max_events: int | None = None,
    timeout: float = 20.0,
    method: str = "GET",
    json_body: dict | None = None,
) -> tuple[Received, requests.Response]:
    """Read events until ``[DONE]``, ``max_events``, or the end; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    response = requests.request(
        method, url, headers=headers, json=json_body, stream=True, timeout=(5, timeout)
    )
    received = Received([], [])
    if response.status_code != 200:
        response.close()
        return received, response
    decoder = SSEDecoder()
    try:
        for block in response.iter_content(chunk_size=None):
            for event in decoder.feed(block):
                received.ids.append(int(event.id) if event.id else -1)
                received.data.append(event.data)
                if event.data == "[DONE]" or (max_events and len(received.data) >= max_events):
                    return received, response
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {url} did not end within {timeout}s: {received}")
    finally:
        response.close()
    return received, response


def pipelined(redis: Any) -> Callable[[list[tuple[Any, ...]]], list[Any]]:
    """Run commands as one redis-py pipeline, errors as values: an executor for
    ``JobStore.publish_many`` on fakeredis (production sends them on a RawConnection)."""

    def execute(commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)

    return execute


def publish(store: Any, job_id: str, attempt: int, events: list[str], text: str = "") -> int:
    """One job's publish through ``JobStore.publish_many``: its last event id, or 0."""
    (result,) = store.publish_many([(job_id, attempt, events, text)], pipelined(store.redis))
    if isinstance(result, Exception):
        raise result
    return result


def stored_message(conversations: Any, message_id: str, owner: str = "") -> dict | None:
    """The message a handed-out id names, as stored: ``{"role", "content", "parent"}``."""
    position = conversations.find(message_id, owner)
    if position is None:
        return None
    record = conversations.redis.hget(
        keys.conversation(position.conversation_id), f"m:{position.number}"
    )
    if record is None:
        return None
    _tokens, parent, role, content = record.decode().split(" ", 3)
    return {"role": role, "content": json.loads(content), "parent": parent}


def sdk_text(chunks: Any) -> tuple[str, list[str]]:
    """The text and finish reasons of an ``openai`` SDK stream of chunks."""
    text, reasons = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return text, reasons


def chat_body(content: str = "Hello", **simulator: object) -> dict:
    """A Chat Completions request; ``simulator`` options steer the test upstream."""
    body: dict = {"model": "simulator", "messages": [{"role": "user", "content": content}]}
    if simulator:
        body["simulator"] = simulator
    return body


def create_job(base: str, body: dict) -> dict:
    """POST /v1/jobs and return the 202 answer."""
    response = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def status_url(response: requests.Response) -> str:
    """The tokened status URL of the job behind a streamed ``/v1/chat/completions`` answer."""
    return response.headers["X-Relay-Events-Url"].replace("/events?", "?", 1)
