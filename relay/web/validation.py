"""Checks a Chat Completions request body before it is stored, so that bad input is refused
with a clear 400 at the door instead of failing later in the worker.

Parameters the relay does not know are passed through to the upstream unchanged, so newer
OpenAI parameters and server-specific ones (vLLM, llama.cpp) keep working. A parameter it knows
given as ``null`` is one not given, as OpenAI takes it: clients built on Python's ``None`` send
``"stop": null`` or ``"seed": null``. It is dropped, so no upstream that chokes on a null
(several OpenAI-compatible servers do) ever sees one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.core.errors import InvalidRequest
from relay.core.tokens import content_text

ROLES = ("system", "developer", "user", "assistant", "tool", "function")

_NUMBER = (int, float)
# name -> (accepted types, description used in the error message)
_PARAMS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"),
    "stream": ((bool,), "a boolean"),
    "temperature": (_NUMBER, "a number"),
    "top_p": (_NUMBER, "a number"),
    "n": ((int,), "an integer"),
    "max_tokens": ((int,), "an integer"),
    "max_completion_tokens": ((int,), "an integer"),
    "presence_penalty": (_NUMBER, "a number"),
    "frequency_penalty": (_NUMBER, "a number"),
    "seed": ((int,), "an integer"),
    "user": ((str,), "a string"),
    "stop": ((str, list), "a string or an array of strings"),
    "stream_options": ((dict,), "an object"),
    "response_format": ((dict,), "an object"),
    "logit_bias": ((dict,), "an object"),
    "logprobs": ((bool,), "a boolean"),
    "top_logprobs": ((int,), "an integer"),
    "tools": ((list,), "an array"),
    "tool_choice": ((str, dict), "a string or an object"),
    "parallel_tool_calls": ((bool,), "a boolean"),
    "metadata": ((dict,), "an object"),
    # Conversations by message id (the chatgpt npm package's model); not sent upstream.
    "parentMessageId": ((str,), "a string"),
    "systemMessage": ((str,), "a string"),
    "prompt": ((str,), "a string"),
}
_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "n": (1, 1),
    "max_tokens": (1, 1 << 31),
    "max_completion_tokens": (1, 1 << 31),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
    "top_logprobs": (0, 20),
}


def _check_param(name: str, value: Any) -> None:
    types, described = _PARAMS[name]
    # bool is an int in Python, but JSON true is not a valid number or integer.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise InvalidRequest(f"'{name}' must be {described}.", param=name, code="invalid_type")
    if name in _RANGES:
        low, high = _RANGES[name]
        if not low <= value <= high:  # type: ignore[operator]  # a number, checked above
            hint = " (the relay streams one choice per job)" if name == "n" else ""
            raise InvalidRequest(
                f"'{name}' must be between {low} and {high}{hint}.",
                param=name,
                code="invalid_value",
            )
    # Any number of stop strings: OpenAI takes 4, but local servers (llama.cpp, vLLM) take more
    # and editors' completions send 9 or more; an upstream with a limit answers for itself.
    if name == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
        raise InvalidRequest(
            "'stop' must be a string or an array of strings.", param=name, code="invalid_value"
        )


def _check_message(index: int, message: Any) -> None:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param, code="invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"'{param}.role' must be one of {', '.join(ROLES)} (got {role!r}).",
            param=f"{param}.role",
            code="invalid_value",
        )
    content = message.get("content")
    if content is None:
        # Only an assistant turn that calls tools may leave content out.
        if role == "assistant" and ("tool_calls" in message or "function_call" in message):
            return
        raise InvalidRequest(
            f"'{param}.content' is required.", param=f"{param}.content", code="missing_required"
        )
    if isinstance(content, list):
        if not all(
            isinstance(part, dict) and isinstance(part.get("type"), str) for part in content
        ):
            raise InvalidRequest(
                f"'{param}.content' parts must be objects with a 'type'.",
                param=f"{param}.content",
                code="invalid_type",
            )
        for number, part in enumerate(content):
            if "text" in part and not isinstance(part["text"], str):
                raise InvalidRequest(
                    f"'{param}.content[{number}].text' must be a string.",
                    param=f"{param}.content[{number}].text",
                    code="invalid_type",
                )
    elif not isinstance(content, str):
        raise InvalidRequest(
            f"'{param}.content' must be a string or an array of content parts.",
            param=f"{param}.content",
            code="invalid_type",
        )


@dataclass(frozen=True)
class Limits:
    """Ceilings on one request (0: no ceiling), beside the body size the app enforces."""

    max_messages: int = 0
    max_input_chars: int = 0
    max_tokens: int = 0


def _check_limits(body: dict[str, Any], messages: list[Any], limits: Limits) -> None:
    if limits.max_messages and len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"Too many messages: {len(messages)} (at most {limits.max_messages}).",
            param="messages",
            code="too_many_messages",
        )
    if limits.max_input_chars:
        texts = [content_text(m.get("content")) for m in messages]
        texts += [v for k in ("prompt", "systemMessage") if isinstance(v := body.get(k), str)]
        total = sum(len(t) for t in texts)
        if total > limits.max_input_chars:
            raise InvalidRequest(
                f"The input is {total} characters long (at most {limits.max_input_chars}).",
                param="messages",
                code="input_too_long",
            )
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if limits.max_tokens and isinstance(value, int) and value > limits.max_tokens:
            raise InvalidRequest(
                f"'{name}' is {value}; this relay allows at most {limits.max_tokens}.",
                param=name,
                code="max_tokens_too_large",
            )


def validate_chat_request(
    body: Any, *, default_model: str = "", limits: Limits = Limits()
) -> dict[str, Any]:
    """The request to store, or :class:`InvalidRequest` naming the first thing wrong with it."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    body = {name: value for name, value in body.items() if value is not None or name not in _PARAMS}
    messages = body.get("messages")
    if messages is None and isinstance(body.get("prompt"), str):
        messages = []  # the prompt is the new user message
    elif messages is None:
        raise InvalidRequest(
            "'messages' is a required property.", param="messages", code="missing_required"
        )
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array.", param="messages", code="invalid_type")
    if not messages and "prompt" not in body:
        raise InvalidRequest(
            "'messages' must contain at least one message.", param="messages", code="empty_array"
        )
    for index, message in enumerate(messages):
        _check_message(index, message)
    for name, value in body.items():
        if name in _PARAMS:
            _check_param(name, value)
    _check_limits(body, messages, limits)
    request = dict(body)
    if not request.get("model"):
        if not default_model:
            raise InvalidRequest("'model' is required.", param="model", code="missing_required")
        request["model"] = default_model
    return request
