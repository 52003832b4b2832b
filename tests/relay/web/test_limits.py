"""Rate, concurrency and queue limits, enforced through Redis across web processes.

No worker runs in these tests unless one is started: submitted jobs stay queued, which is what
the concurrency and queue limits count.
"""

from __future__ import annotations

import pytest
import requests

from relay.core import apikeys
from tests.helpers import chat_body, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def assert_openai_429(response: requests.Response, code: str) -> int:
    """A 429 in OpenAI's shape with a usable Retry-After; its value in seconds."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    return retry_after


def test_n_plus_one_requests_in_a_minute_across_two_processes_get_exactly_one_429(stack):
    web_a, web_b = stack.start_web(), stack.start_web()
    limit = 12
    key = apikeys.create(stack.redis(), "limited", rpm=limit)
    headers = {"Authorization": f"Bearer {key}"}
    statuses = []
    for n in range(limit + 1):
        base = (web_a, web_b)[n % 2]
        response = requests.post(f"{base}/v1/jobs", json=chat_body(), headers=headers, timeout=5)
        statuses.append(response.status_code)
    assert statuses == [202] * limit + [429]
    assert_openai_429(response, "rate_limit_exceeded")
    # Another key is not affected by this one's limit.
    other = {"Authorization": f"Bearer {apikeys.create(stack.redis(), 'other', rpm=limit)}"}
    assert requests.post(f"{web_b}/v1/jobs", json=chat_body(), headers=other, timeout=5).ok


def test_refused_requests_do_not_use_up_the_rate(stack):
    base = stack.start_web()

    def post(key: str, body: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return requests.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=5)

    key = apikeys.create(stack.redis(), "three a minute", rpm=3)
    unknown_parent = "00000000-0000-4000-8000-000000000000"
    refused = [
        post(key, {"messages": []}),  # 400: no messages
        post(key, {"messages": [{"role": "wizard", "content": "x"}]}),  # 400: a bad role
        post(key, {**chat_body(), "max_tokens": -1}),  # 400: a bad parameter
        post(key, {"prompt": "hi", "parentMessageId": unknown_parent}),  # 404
    ]
    assert [r.status_code for r in refused] == [400, 400, 400, 404]
    assert [post(key, chat_body()).status_code for _ in range(3)] == [202] * 3
    assert_openai_429(post(key, chat_body()), "rate_limit_exceeded")

    # Refused for concurrency (no worker runs: the first job stays queued): not counted either.
    key = apikeys.create(stack.redis(), "one at once, two a minute", rpm=2, concurrency=1)
    first = post(key, chat_body())
    for _ in range(3):
        assert_openai_429(post(key, chat_body()), "concurrency_limit_exceeded")
    cancel = requests.post(first.json()["cancel_url"], headers={"Authorization": f"Bearer {key}"},
                           timeout=5)  # fmt: skip
    assert cancel.ok  # frees the slot
    assert post(key, chat_body()).status_code == 202
    assert_openai_429(post(key, chat_body()), "rate_limit_exceeded")


def test_open_mode_limits_each_client_address_by_the_default_rate(stack):
    base = stack.start_web(env={"RELAY_RATE_LIMIT_RPM": "3"})
    answers = [requests.post(f"{base}/v1/jobs", json=chat_body(), timeout=5) for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    # Every endpoint that creates a job draws on the same budget...
    response = requests.post(f"{base}/v1/chat/completions", json=chat_body(), timeout=5)
    assert_openai_429(response, "rate_limit_exceeded")
    # ...while reading is not throttled: a watcher may reconnect as often as it needs.
    status_url = answers[0].json()["status_url"]
    assert all(requests.get(status_url, timeout=5).ok for _ in range(5))


def test_concurrent_jobs_per_key_are_capped_until_one_ends(stack):
    base = stack.start_web()
    key = apikeys.create(stack.redis(), "two at once", concurrency=2)
    headers = {"Authorization": f"Bearer {key}"}

    def submit() -> requests.Response:
        return requests.post(f"{base}/v1/jobs", json=chat_body(), headers=headers, timeout=5)

    first, second = submit().json(), submit().json()
    refused = submit()
    assert assert_openai_429(refused, "concurrency_limit_exceeded") == 1
    # Ending a job (here: cancelling it) frees its slot at once.
    assert requests.post(first["cancel_url"], headers=headers, timeout=5).ok
    third = submit()
    assert third.status_code == 202
    # Completed jobs free their slots too: a worker runs the queued ones to the end.
    stack.start_worker()
    for job in (second, third.json()):
        assert read_stream(job["events_url"])[0].done
    assert submit().status_code == 202


def test_a_full_queue_answers_503_with_retry_after_and_keeps_what_it_has(stack):
    base = stack.start_web(env={"RELAY_MAX_QUEUED_JOBS": "3", "RELAY_QUEUE_FULL_RETRY_AFTER": "7"})
    jobs = [requests.post(f"{base}/v1/jobs", json=chat_body(), timeout=5) for _ in range(3)]
    assert [j.status_code for j in jobs] == [202] * 3
    redis = stack.redis()

    def stored() -> set[bytes]:
        """Every key of a job or a conversation turn."""
        return {k for k in redis.scan_iter("relay:*") if k.endswith((b":job", b":text",
                b":conversation", b":message"))}  # fmt: skip

    before = stored()
    full = requests.post(f"{base}/v1/jobs", json=chat_body(), timeout=5)
    assert full.status_code == 503 and full.headers["Retry-After"] == "7"
    assert full.json()["error"]["code"] == "queue_full"
    assert redis.llen("relay:{queue}:pending") == 3
    assert stored() == before  # the refused request's conversation turn was taken back
    stack.start_worker()  # the queue drains, every stored job completes, and new ones are taken
    for job in jobs:
        assert read_stream(job.json()["events_url"])[0].done
    assert requests.post(f"{base}/v1/jobs", json=chat_body(), timeout=5).status_code == 202


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget(stack):
    base = stack.start_web(env={"RELAY_RATE_LIMIT_RPM": "1", "RELAY_TRUSTED_PROXIES": "1"})

    def submit(client: str) -> int:
        headers = {"X-Forwarded-For": client}
        return requests.post(
            f"{base}/v1/jobs", json=chat_body(), headers=headers, timeout=5
        ).status_code

    assert [submit("203.0.113.1"), submit("203.0.113.2"), submit("203.0.113.1")] == [202, 202, 429]
