"""Folding logged chunks into one ``chat.completion`` (``stream: false``), and chatgpt-web's
lines: a chunk of an odd shape is an error answer, never an exception or a huge allocation."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from relay.core.chunks import dumps
from relay.core.conversations import Turn
from relay.web.aggregate import aggregate
from relay.web.chatgpt_web import chat_process_lines
from relay.web.fanout import LiveEvent


def chunk(**delta: object) -> bytes:
    return dumps(
        {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    ).encode()


def test_text_and_tool_calls_fold_into_one_message():
    call = {"index": 1, "id": "t", "function": {"name": "f", "arguments": "{}"}}
    result = aggregate([chunk(role="assistant"), chunk(content="Hi"), chunk(tool_calls=[call]),
                        b"[DONE]"])  # fmt: skip
    message = result.completion("job_x")["choices"][0]["message"]
    assert message["content"] == "Hi" and message["tool_calls"][1]["function"]["name"] == "f"
    assert result.error is None


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning"])
def test_a_reasoning_models_thinking_folds_beside_its_content(name: str):
    """Under the name its server streamed it: llama.cpp and vLLM, or Ollama and OpenRouter."""
    thoughts = [chunk(role="assistant"), chunk(**{name: "Let me"}), chunk(**{name: " think."})]
    result = aggregate([*thoughts, chunk(content="Yes."), b"[DONE]"])
    message = result.completion("job_x")["choices"][0]["message"]
    assert (message[name], message["content"]) == ("Let me think.", "Yes.")
    plain = aggregate([chunk(content="Yes."), b"[DONE]"]).completion("job_x")
    assert name not in plain["choices"][0]["message"]


@pytest.mark.parametrize(
    "odd",
    [b'{"choices": [1]}', b"[1, 2]", chunk(content=5),
     chunk(tool_calls=[{"index": 200000, "function": {"arguments": "x"}}])],
    ids=["choice-int", "not-object", "content-int", "tool-index"],
)  # fmt: skip
def test_an_odd_chunk_is_an_error_answer(odd: bytes):
    tracemalloc.start()
    try:
        result = aggregate([chunk(content="Hi"), odd, b"[DONE]"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.error is not None and result.error["code"] == "upstream_malformed"
    assert peak < 1_000_000  # index 200000 once allocated 89 MB


def test_chatgpt_web_lines_end_with_a_fail_line_for_an_odd_chunk():
    turn = Turn("c", "m", "p", 2, 1)
    data = [chunk(content="Hi"), b'{"choices": [1]}', b"[DONE]"]
    events = [LiveEvent(i, d, b"", d == b"[DONE]") for i, d in enumerate(data, start=1)]
    lines = [
        json.loads(line) for line in b"".join(chat_process_lines(iter(events), turn)).split(b"\n")
    ]
    assert lines[0]["text"] == "Hi"
    assert lines[-1]["status"] == "Fail" and "malformed" in lines[-1]["message"]
