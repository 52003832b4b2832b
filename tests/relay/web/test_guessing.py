"""Guessing is throttled, and a guess learns nothing from timing.

Failed credential checks (API keys, job tokens, chatgpt-web's secret, conversation message ids)
count per client address; past the limit the address is refused (429) whatever it sends. A
wrong token costs the relay the same work whether or not the job exists, with or without an
``Authorization`` header: compared here by the Redis commands each request makes.
"""

from __future__ import annotations

import pytest
import requests

from tests.helpers import chat_body

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEY, OTHER = "guess-test-key-1", "guess-test-key-2"


def as_client(address: str, key: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-For": address}  # RELAY_TRUSTED_PROXIES=1: the client's address
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def test_failed_checks_block_their_address_and_only_it(stack):
    base = stack.start_web(env={"RELAY_AUTH_FAILURES_PER_MINUTE": "5",
                                "RELAY_API_KEYS": f"{KEY},{OTHER}",
                                "RELAY_TRUSTED_PROXIES": "1"})  # fmt: skip
    body = chat_body("x")
    job = requests.post(f"{base}/v1/jobs", json=body, headers=as_client("10.0.0.9", OTHER),
                        timeout=5).json()  # fmt: skip
    jobs, guesser = f"{base}/v1/jobs", as_client("10.0.0.1")
    keyed_guesser = as_client("10.0.0.1", KEY)
    attempts = [
        ("POST", jobs, {"json": body}, as_client("10.0.0.1", "wrong-key")),
        ("GET", f"{jobs}/{job['id']}", {"params": {"token": "rt-guess"}}, guesser),
        ("GET", f"{jobs}/{job['id']}/events", {"params": {"token": "rt-x"}}, guesser),
        ("POST", f"{jobs}/{job['id']}/cancel", {"params": {"token": "ct-x"}}, keyed_guesser),
        ("POST", jobs, {"json": {**body, "parentMessageId": "guessed-id"}}, keyed_guesser),
    ]
    for method, url, kwargs, headers in attempts:
        answer = requests.request(method, url, headers=headers, timeout=5, **kwargs)
        assert answer.status_code in (401, 404), (url, answer.status_code)
    # The address is now blocked: even the right key and token are refused, for a while.
    for url, headers in ((job["status_url"], as_client("10.0.0.1")),
                         (f"{base}/v1/jobs/{job['id']}", as_client("10.0.0.1", KEY))):  # fmt: skip
        blocked = requests.get(url, headers=headers, timeout=5)
        assert blocked.status_code == 429, blocked.text
        assert blocked.json()["error"]["code"] == "too_many_failures"
        assert 0 < int(blocked.headers["Retry-After"]) <= 60
    assert requests.post(f"{base}/v1/jobs", json=body, headers=as_client("10.0.0.1", KEY),
                         timeout=5).status_code == 429  # fmt: skip
    # Another address is not affected.
    assert requests.get(job["status_url"], headers=as_client("10.0.0.2"), timeout=5).ok


def test_chatgpt_web_verify_is_rate_limited(stack):
    base = stack.start_web(env={"RELAY_AUTH_FAILURES_PER_MINUTE": "3",
                                "RELAY_CHATGPT_WEB_SECRET": "s3cret"})  # fmt: skip
    answers = [requests.post(f"{base}/api/verify", json={"token": guess}, timeout=5).status_code
               for guess in ("a", "b", "c", "s3cret")]  # fmt: skip
    assert answers == [401, 401, 401, 429]  # the right secret, once blocked, is refused too


def redis_commands(stack, request: callable) -> dict[str, int]:
    """The Redis commands (by name, with their counts) that one request made."""
    redis = stack.redis()
    redis.config_resetstat()
    request()
    stats = redis.info("commandstats")
    return {name: int(v["calls"]) for name, v in stats.items() if name not in
            ("cmdstat_info", "cmdstat_config|resetstat")}  # fmt: skip


def test_a_wrong_token_costs_the_same_whether_or_not_the_job_exists(stack):
    base = stack.start_web(env={"RELAY_API_KEYS": f"{KEY},{OTHER}",
                                "RELAY_AUTH_FAILURES_PER_MINUTE": "1000"})  # fmt: skip
    job = requests.post(f"{base}/v1/jobs", json=chat_body("x"), headers=as_client("x", OTHER),
                        timeout=5).json()  # fmt: skip
    missing = "job_" + "Z" * 24
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer nope"}):
        for suffix in ("", "/events"):
            costs = []
            for job_id in (job["id"], missing):
                url = f"{base}/v1/jobs/{job_id}{suffix}"
                costs.append(redis_commands(stack, lambda u=url, h=headers: requests.get(
                    u, params={"token": "rt-wrong"}, headers=h, timeout=5)))  # fmt: skip
            assert costs[0] == costs[1], (headers, suffix, costs)
