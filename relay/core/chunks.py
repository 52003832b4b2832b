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
