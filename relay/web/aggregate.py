"""Folding a job's chunks into one ``chat.completion`` object (``stream: false`` answers)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from relay.core.chunks import (
    DONE_BYTES,
    REASONING_FIELDS,
    completion_id,
    error_body,
    loads,
    malformed,
)


class Aggregate:
    """The completion built so far from ``chat.completion.chunk`` objects."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict) or (problem := malformed(chunk)):
            # Workers refuse such chunks; one in the log anyway ends the answer as an error.
            why = problem if isinstance(chunk, dict) else "not an object"
            self.error = error_body(
                f"The upstream sent a chunk of an unexpected shape: {why}.",
                code="upstream_malformed",
            )["error"]
            return
        if chunk.get("error"):
            self.error = chunk["error"]
            return
        for name in ("id", "created", "model", "system_fingerprint"):
            if name in chunk and name not in self.meta:
                self.meta[name] = chunk[name]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        into = self.choices.setdefault(
            index,
            {"index": index, "message": {"role": "assistant", "content": None}, "logprobs": None,
             "finish_reason": None},
        )  # fmt: skip
        message = into["message"]
        delta = choice.get("delta") or {}
        if delta.get("role"):
            message["role"] = delta["role"]
        if delta.get("content") is not None:
            message["content"] = (message["content"] or "") + delta["content"]
        if delta.get("refusal") is not None:
            message["refusal"] = (message.get("refusal") or "") + delta["refusal"]
        for name in REASONING_FIELDS:  # a reasoning model's thinking, kept beside content
            if isinstance(delta.get(name), str):
                message[name] = (message.get(name) or "") + delta[name]
        for call in delta.get("tool_calls") or ():
            self._add_tool_call(message, call)
        if choice.get("finish_reason"):
            into["finish_reason"] = choice["finish_reason"]

    @staticmethod
    def _add_tool_call(message: dict[str, Any], call: dict[str, Any]) -> None:
        # Tool calls stream as fragments keyed by index: the first names the call, the rest
        # append to its JSON arguments.
        calls = message.setdefault("tool_calls", [])
        index = call.get("index", len(calls))
        while len(calls) <= index:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        into = calls[index]
        if call.get("id"):
            into["id"] = call["id"]
        function = call.get("function") or {}
        into["function"]["name"] += function.get("name") or ""
        into["function"]["arguments"] += function.get("arguments") or ""

    def completion(self, job_id: str) -> dict[str, Any]:
        return {
            "id": self.meta.get("id", completion_id(job_id)),
            "object": "chat.completion",
            "created": self.meta.get("created", 0),
            "model": self.meta.get("model", ""),
            "system_fingerprint": self.meta.get("system_fingerprint"),
            "choices": [self.choices[i] for i in sorted(self.choices)],
            "usage": self.usage,
        }


def aggregate(events: Iterable[bytes]) -> Aggregate:
    """Fold event data (up to ``[DONE]``) into an :class:`Aggregate`."""
    result = Aggregate()
    for data in events:
        if data == DONE_BYTES:
            break
        result.add(loads(data))
    return result
