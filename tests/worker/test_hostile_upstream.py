"""A hostile or broken upstream against the real stack: viewers get a clean error and
``[DONE]``, never a 500, a cut stream, a hang, or the relay's own credentials."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.conftest import wait_for
from tests.helpers import chat_body, create_job, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

UPSTREAM_KEY = "sk-relay-own-key-0123456789abcdef"


@pytest.fixture
def relay(stack) -> tuple:
    base = stack.start_web()
    stack.start_worker(env={"RELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
                            "RELAY_UPSTREAM_MAX_RETRIES": "1"})  # fmt: skip
    return stack, base


def test_a_chunk_of_an_odd_shape_is_an_error_on_every_endpoint(relay):
    _, base = relay
    odd = {"fail": "odd_chunk", "fail_after": 2}
    received, _ = read_stream(create_job(base, chat_body("odd", **odd))["events_url"])
    assert received.done and received.errors[0]["code"] == "upstream_malformed"

    answer = requests.post(f"{base}/v1/chat/completions", json=chat_body("odd", **odd), timeout=20)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "upstream_malformed"

    with requests.post(f"{base}/api/chat-process", timeout=20,
                       json={"prompt": "odd", "simulator": odd}) as streamed:  # fmt: skip
        lines = streamed.content.split(b"\n")
    assert streamed.status_code == 200
    last = json.loads(lines[-1])
    assert last["status"] == "Fail" and "unexpected shape" in last["message"]


def test_retry_after_nan_does_not_hang_a_job(relay):
    _, base = relay
    started = time.monotonic()
    job = create_job(base, chat_body("wait", fail="retry_after_nan"))
    received, _ = read_stream(job["events_url"], timeout=15)
    assert received.done and received.errors[0]["code"] == "rate_limit_exceeded"
    assert time.monotonic() - started < 10  # one retry after the default backoff, not forever


def test_credentials_an_upstream_echoes_never_reach_viewers(relay):
    stack, base = relay
    job = create_job(base, chat_body("who am I", fail="echo_key"))
    received, _ = read_stream(job["events_url"])
    status = requests.get(job["status_url"], timeout=5).text
    assert received.done and "Incorrect API key provided" in received.errors[0]["message"]
    for seen in (json.dumps(received.chunks), status):
        assert UPSTREAM_KEY not in seen and "0123456789abcdef" not in seen
    # A job's counters are written once it has ended: after [DONE].
    wait_for(lambda: 'code="upstream_http_401"' in metrics_text(base), 5, "the job's counters")


def test_metric_labels_from_upstream_codes_come_from_a_bounded_set(relay):
    _, base = relay
    job = create_job(base, chat_body("x", fail="error_after", fail_after=1))
    assert read_stream(job["events_url"])[0].errors[0]["code"] == "simulated"
    metrics = wait_for(
        lambda: 'code="upstream_other"' in (text := metrics_text(base)) and text,
        5,
        "the job's counters",
    )
    assert 'code="simulated"' not in metrics


def metrics_text(base: str) -> str:
    return requests.get(f"{base}/metrics", timeout=5).text
