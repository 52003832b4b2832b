"""The payloads of relayed events, shared by the worker (which writes them) and the relay.

An event's data is the upstream's ``chat.completion.chunk`` JSON, relayed as received (compacted
to one line), an error chunk in OpenAI's shape, or the literal ``[DONE]``. Its SSE id is its
position in the job's replay log, counting from 1.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

DONE = "[DONE]"
DONE_BYTES = b"[DONE]"
# A reasoning model's thinking in a delta, under the name its server uses: llama.cpp, vLLM and
# DeepSeek send reasoning_content; Ollama and OpenRouter, reasoning. It is not the answer.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def dumps(obj: Any) -> str:
    """Compact JSON: one line, so an event's data never spans several ``data:`` lines."""
    return orjson.dumps(obj).decode()


def loads(data: str | bytes) -> Any:
    return orjson.loads(data)


def completion_id(job_id: str) -> str:
    """The ``id`` of every chunk of a job's stream: public, like the job id (it grants nothing,
    unlike the reply's message id, which only the creator is given)."""
    return f"chatcmpl-{job_id}"


def error_body(
    message: str, type: str = "server_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_chunk(
    job_id: str,
    message: str,
    *,
    type: str = "server_error",
    code: str | None = None,
    model: str = "",
) -> str:
    """A terminal error event: a chunk with no choices and an OpenAI ``error`` object.

    The ``error`` key makes the official SDKs raise ``APIError`` mid-stream, exactly as they do
    for OpenAI's own mid-stream errors; ``object``/``choices`` keep chunk parsers happy.
    """
    chunk = {
        "id": completion_id(job_id),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
    }
    chunk.update(error_body(message, type=type, code=code))
    return dumps(chunk)


MAX_CHOICES = 16  # the relay asks for one choice (n=1); a few more are tolerated
MAX_TOOL_CALLS = 128  # tool calls in one reply: their index sizes a list, so it is bounded
_OPTIONAL_TEXT = (str, type(None))


def failure(chunk: Any) -> str | None:
    """What a relayed chunk says went wrong, for renderers of other formats: the message of
    its error object, or why its shape is unusable (workers refuse those); None for a good
    chunk."""
    problem = malformed(chunk) if isinstance(chunk, dict) else "not an object"
    if problem:
        return f"The upstream's reply was malformed: {problem}."
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        return str(message or "The upstream failed.")
    return None


def malformed(chunk: dict[str, Any]) -> str | None:
    """What is wrong with a ``chat.completion.chunk``'s shape, or None if nothing is.

    Valid JSON can still be unusable: ``"choices": [1]``, ``"content": 5``, a tool call at
    index 200000 (whose list would be allocated). Such a chunk must end the job with an error
    event rather than reach the code that folds chunks into a reply.
    """
    choices = chunk.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list) or len(choices) > MAX_CHOICES:
        return "'choices' is not a short list"
    for choice in choices:
        if not isinstance(choice, dict):
            return "a choice is not an object"
        index = choice.get("index", 0)
        if not _small_index(index, MAX_CHOICES):
            return "a choice's 'index' is not a small whole number"
        if not isinstance(choice.get("finish_reason"), _OPTIONAL_TEXT):
            return "'finish_reason' is not a string"
        delta = choice.get("delta")
        if delta is None:
            continue
        if not isinstance(delta, dict):
            return "'delta' is not an object"
        for name in ("content", "role", "refusal"):
            if not isinstance(delta.get(name), _OPTIONAL_TEXT):
                return f"'delta.{name}' is not a string"
        calls = delta.get("tool_calls")
        if calls is not None and (reason := _malformed_tool_calls(calls)):
            return reason
    return None


def _malformed_tool_calls(calls: Any) -> str | None:
    if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
        return "'tool_calls' is not a short list"
    for call in calls:
        if not isinstance(call, dict) or not _small_index(call.get("index", 0), MAX_TOOL_CALLS):
            return f"a tool call is not an object with an 'index' below {MAX_TOOL_CALLS}"
        function = call.get("function")
        if function is not None and not (
            isinstance(function, dict)
            and isinstance(function.get("name"), _OPTIONAL_TEXT)
            and isinstance(function.get("arguments"), _OPTIONAL_TEXT)
        ):
            return "a tool call's 'function' is not an object of strings"
        if not isinstance(call.get("id"), _OPTIONAL_TEXT):
            return "a tool call's 'id' is not a string"
    return None


def _small_index(value: Any, bound: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


CANCELLED = "cancelled"
"""The ``finish_reason`` of the final chunk of a cancelled job."""


def final_chunk(
    completion_id: str, finish_reason: str, model: str = "", content: str | None = None
) -> str:
    """A last chunk written by the relay itself (not the upstream), with its finish_reason
    and, for a refusal, the assistant's content."""
    delta = {} if content is None else {"role": "assistant", "content": content}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
    )


def decode_live(message: bytes) -> tuple[int, bytes]:
    """A live-channel message, ``"<id> <data>"`` (written by the Lua scripts), as ``(id, data)``."""
    seq, _, data = message.partition(b" ")
    return int(seq), data
