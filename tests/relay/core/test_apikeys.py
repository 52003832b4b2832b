"""API keys: stored as digests, managed by a CLI, required on POST once any exists."""

from __future__ import annotations

import subprocess
import sys
import time

import fakeredis
import pytest
import requests

from relay.core import apikeys
from relay.core.settings import Settings
from tests.conftest import ROOT
from tests.helpers import chat_body, read_stream


def test_keys_are_stored_as_digests_and_can_be_revoked():
    redis = fakeredis.FakeRedis()
    assert not apikeys.configured(redis)
    key = apikeys.create(redis, "team", rpm=60)
    assert apikeys.configured(redis)
    assert key.startswith("rk-") and len(key) > 40
    dump = b"".join(
        v for k in redis.keys("*") if redis.type(k) == b"hash" for v in redis.hvals(k)
    ) + b"".join(redis.keys("*"))
    assert key.encode() not in dump, "the clear key is never stored"
    record = apikeys.authenticate(redis, f"Bearer {key}")
    assert record is not None and record["label"] == "team" and record["rpm"] == "60"
    assert apikeys.authenticate(redis, "Bearer rk-wrong") is None
    assert apikeys.authenticate(redis, key) is None  # not a Bearer header
    (listed,) = apikeys.listing(redis)
    assert key not in str(listed) and listed["id"] == record["id"]
    assert apikeys.revoke(redis, listed["id"]) == 1
    assert apikeys.authenticate(redis, f"Bearer {key}") is None


def test_seeding_is_idempotent():
    redis = fakeredis.FakeRedis()
    apikeys.seed(redis, Settings.from_env({"RELAY_API_KEYS": "one, two,"}).api_keys)
    apikeys.seed(redis, ("one", "two"))
    assert len(apikeys.listing(redis)) == 2
    assert apikeys.authenticate(redis, "Bearer two") is not None


def cli(redis_url: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "relay.apikeys", "--redis-url", redis_url, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_post_endpoints_need_a_valid_key_once_keys_exist(stack):
    base = stack.start_web(env={"RELAY_API_KEYS": "seeded-key-123"})
    stack.start_worker()
    body = chat_body("keyed", tokens=2)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "seeded-key-123"}):
        refused = requests.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=5)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/chat/completions", "/api/chat-process"):
        assert requests.post(f"{base}{path}", json=body, timeout=5).status_code == 401

    seeded = {"Authorization": "Bearer seeded-key-123"}
    job = requests.post(f"{base}/v1/jobs", json=body, headers=seeded, timeout=5).json()
    assert read_stream(job["events_url"])[0].done  # watching is by job id (tokens: later)

    key = cli(stack.redis_url, "create", "--label", "ci")
    mine = {"Authorization": f"Bearer {key}"}
    assert requests.post(f"{base}/v1/jobs", json=body, headers=mine, timeout=5).status_code == 202
    listed = cli(stack.redis_url, "list")
    assert "ci" in listed and key not in listed
    key_id = next(line for line in listed.splitlines() if '"ci"' in line).split('"id": "')[1][:12]
    assert cli(stack.redis_url, "revoke", key_id) == "revoked 1 key(s)"
    assert requests.post(f"{base}/v1/jobs", json=body, headers=mine, timeout=5).status_code == 401
    logs = "".join(p.output() for p in stack.procs)
    assert key not in logs and "seeded-key-123" not in logs, "keys never appear in logs"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_relay_seeded_with_keys_never_runs_open_after_redis_loses_its_data(stack):
    base = stack.start_web(env={"RELAY_API_KEYS": "seeded-key-456"})
    body = chat_body("keyed", tokens=2)
    seeded = {"Authorization": "Bearer seeded-key-456"}
    assert requests.post(f"{base}/v1/jobs", json=body, headers=seeded, timeout=5).ok
    stack.redis().flushdb()  # as a restart without persistence would
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # closed at every moment, and the seeded key comes back
        assert requests.post(f"{base}/v1/jobs", json=body, timeout=5).status_code == 401
        if requests.post(f"{base}/v1/jobs", json=body, headers=seeded, timeout=5).ok:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the seeded key did not come back")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_relay_says_at_start_whether_it_runs_open(stack):
    stack.start_web()
    open_log = stack.procs[-1]
    stack.start_web(env={"RELAY_API_KEYS": "seeded-key-789"})
    keyed_log = stack.procs[-1]
    # Said before any request that creates a job (only /healthz has been asked so far).
    assert "anyone may create jobs (RELAY_OPEN_ACCESS=true)" in open_log.output()
    assert "API keys required to create jobs" in keyed_log.output()
    assert "anyone may" not in keyed_log.output()
    stack.start_web(env={"RELAY_OPEN_ACCESS": "false"})
    assert "creating jobs is refused until a key is made" in stack.procs[-1].output()


def test_seeded_keys_mirror_the_setting_and_cli_keys_stay():
    redis = fakeredis.FakeRedis()
    made = apikeys.create(redis, "by hand")
    apikeys.seed(redis, ("one", "two"))
    apikeys.seed(redis, ("two",))  # "one" was taken out of RELAY_API_KEYS
    assert apikeys.authenticate(redis, "Bearer one") is None
    assert apikeys.authenticate(redis, "Bearer two") is not None
    assert apikeys.authenticate(redis, f"Bearer {made}") is not None
    assert sorted(k["label"] for k in apikeys.listing(redis)) == ["RELAY_API_KEYS", "by hand"]


def test_the_cli_refuses_bad_limits_and_ids_with_a_message(redis_url: str):
    for args, says in (
        (("create", "--label", "x", "--rpm", "0"), "must be at least 1"),
        (("create", "--label", "x", "--concurrency", "-3"), "must be at least 1"),
        (("create", "--label", "x", "--rpm", "many"), "not a whole number"),
        (("revoke", "abc"), "at least 8 characters"),
        (("delete", "abc"), "at least 8 characters"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "relay.apikeys", "--redis-url", redis_url, *args],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    key = cli(redis_url, "create", "--label", "temp", "--rpm", "5")
    key_id = apikeys.digest(key)[:12]
    assert cli(redis_url, "delete", key_id).startswith("deleted 1 key(s)")
    assert cli(redis_url, "list") == ""


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_relay_whose_cli_keys_were_lost_refuses_instead_of_running_open(stack):
    base = stack.start_web(env={"RELAY_OPEN_ACCESS": "false"})
    body = chat_body("keyed", tokens=2)
    assert requests.post(f"{base}/v1/jobs", json=body, timeout=5).status_code == 401
    key = cli(stack.redis_url, "create", "--label", "ops")
    made = {"Authorization": f"Bearer {key}"}
    assert requests.post(f"{base}/v1/jobs", json=body, headers=made, timeout=5).status_code == 202
    stack.redis().flushdb()  # a restart without persistence: the CLI's key is gone
    refusals = []
    deadline = time.monotonic() + 5  # past the processes' cached view of whether keys exist
    while time.monotonic() < deadline:
        refusals.append(requests.post(f"{base}/v1/jobs", json=body, timeout=5).status_code)
        time.sleep(0.2)
    assert set(refusals) == {401}
