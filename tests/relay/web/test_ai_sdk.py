"""The Vercel AI SDK's OpenAI-compatible provider (``@ai-sdk/openai-compatible`` with ``ai``'s
``streamText`` and ``generateText``: what Chatbox and many Next.js chat front ends run) pointed
at a relay that requires keys. Its chunk schemas are strict, so it checks the relay's stream
shape as a real client reads it: text deltas, usage, finish reasons, and errors mid-stream and
before it.
"""

from __future__ import annotations

import pytest

from relay.dev.simulator import reply_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_ai_sdk_streams_reads_usage_and_sees_failures(node_clients, stack):
    base = stack.start_web(env={"RELAY_API_KEYS": "sdk-key"})
    stack.start_worker()
    out = node_clients.run("ai_sdk.mjs", base, "sdk-key", "simulator")
    expected = reply_text({})

    streamed = out["streamed"]
    assert streamed["text"] == expected and len(streamed["deltas"]) >= 3
    assert streamed["finishReason"] == "stop" and streamed["errors"] == []
    usage = streamed["usage"]  # the relay asks the upstream for it and hands it on
    assert usage["inputTokens"] > 0 and usage["outputTokens"] > 0
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]

    assert out["whole"]["text"] == expected and out["whole"]["finishReason"] == "stop"

    broken = out["broken"]  # the relay's error chunk, then [DONE]: the SDK's error part
    assert broken["finishReason"] == "error"
    assert expected.startswith(broken["text"]) and 0 < len(broken["text"]) < len(expected)
    assert [e["code"] for e in broken["errors"]] == ["simulated"]
    assert "simulated mid-stream error" in broken["errors"][0]["message"]

    refused = out["refused"]  # a wrong key: the relay's 401 as the SDK's API call error
    assert refused["text"] == "" and refused["finishReason"] is None  # nothing came
    assert [e["status"] for e in refused["errors"]] == [401]
