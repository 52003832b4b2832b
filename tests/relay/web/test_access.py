"""Who may watch and cancel a job: its read token, its cancel token, or the key that made it.

Everything else (no key, a wrong or revoked key, another key, a missing or wrong token) is
answered like an unknown job, and no refusal carries anything of the job.
"""

from __future__ import annotations

import urllib.parse

import fakeredis
import pytest
import requests

from relay.core import apikeys
from relay.core.jobs import JobStore
from relay.web.access import Access, load
from tests.helpers import chat_body, read_stream


def test_tokens_are_unguessable_and_each_grants_only_its_own_action():
    one, two = Access.new("key1"), Access.new()
    assert one.read_token != two.read_token and len(one.read_token) >= 32
    assert one.may_watch(one.read_token, None) and not one.may_cancel(one.read_token, None)
    assert one.may_cancel(one.cancel_token, None) and one.may_watch(None, "key1")
    assert not one.may_watch(two.read_token, None) and not one.may_watch(None, "key2")
    assert not one.may_watch("", None) and not one.may_watch(None, "")
    assert not two.may_watch(None, "") and not two.may_cancel(None, ""), "open mode: no owner"


def near_misses(token: str) -> list[str]:
    """Tokens that a check comparing only part of the string would accept."""
    return [token[:1], token[:3], token[:-1], token + "x", token + token, token.upper(),
            token[:-1] + ("A" if token[-1] != "A" else "B"), " " + token, token + "\n"]  # fmt: skip


def test_only_the_whole_token_grants_anything():
    grant = Access.new()
    for near in near_misses(grant.read_token):
        assert not grant.may_watch(near, None), near
    for near in near_misses(grant.cancel_token):
        assert not grant.may_cancel(near, None), near
    assert grant.may_watch(grant.read_token, None) and grant.may_cancel(grant.cancel_token, None)


def test_a_jobs_tokens_live_and_die_with_the_job():
    redis = fakeredis.FakeRedis()
    store = JobStore(redis, retention=60, max_age=600)
    grant = Access.new("k")
    job_id = store.create({"model": "m", "messages": []}, grant=grant.fields())
    assert load(redis, job_id) == grant
    redis.delete(f"relay:{{{job_id}}}:job")
    assert load(redis, job_id) is None


def query(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def path_of(url: str) -> str:
    return urllib.parse.urlsplit(url).path


def assert_refused_like_unknown(response: requests.Response, job_id: str, secret: str) -> None:
    """404 in OpenAI's shape, worded exactly as for a job that does not exist."""
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error == {
        "message": f"No job with id '{job_id}' (it may have expired).",
        "type": "invalid_request_error",
        "param": "id",
        "code": "not_found",
    }
    assert not secret or secret not in response.text


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_keys_and_tokens_decide_who_may_watch_and_cancel(stack):
    stack.env["RELAY_API_KEYS"] = "seed-key-abc"
    base = stack.start_web()
    stack.start_worker()
    redis = stack.redis()
    key_a, key_b = apikeys.create(redis, "a"), apikeys.create(redis, "b")
    as_a, as_b = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
    body = chat_body("a secret reply", tokens=40, interval=0.02)
    made = requests.post(f"{base}/v1/jobs", json=body, headers=as_a, timeout=5)
    assert made.status_code == 202
    job = made.json()
    job_id, read_token, cancel_token = job["id"], job["read_token"], job["cancel_token"]
    assert query(job["events_url"]) == {"token": read_token}
    assert query(job["status_url"]) == {"token": read_token}
    assert query(job["watch_url"]) == {"token": read_token}
    assert query(job["cancel_url"]) == {"token": cancel_token}
    assert path_of(job["watch_url"]) == f"/watch/{job_id}"

    # The creating key watches without a token; the read token watches without a key.
    by_key, _ = read_stream(f"{base}/v1/jobs/{job_id}/events", headers=as_a)
    by_token, _ = read_stream(job["events_url"])
    assert by_key.done and by_token.data == by_key.data and by_key.text
    secret_text = by_key.text

    status, events, cancel = (
        f"{base}/v1/jobs/{job_id}",
        f"{base}/v1/jobs/{job_id}/events",
        f"{base}/v1/jobs/{job_id}/cancel",
    )
    refused = {
        "no token": ("GET", status, {}, {}),
        "no token (events)": ("GET", events, {}, {}),
        "wrong token": ("GET", events, {"token": "rt-" + "x" * 32}, {}),
        "the cancel token does not grant watching": ("GET", events, {"token": cancel_token}, {}),
        "another key": ("GET", status, {}, as_b),
        "another key (events)": ("GET", events, {}, as_b),
        "another key cancelling": ("POST", cancel, {}, as_b),
        "the read token does not grant cancelling": ("POST", cancel, {"token": read_token}, as_b),
        "a wrong cancel token": ("POST", cancel, {"token": "ct-" + "y" * 32}, as_b),
    }
    for what, (method, url, params, headers) in refused.items():
        response = requests.request(method, url, params=params, headers=headers, timeout=5)
        assert response.status_code == 404, what
        assert_refused_like_unknown(response, job_id, secret_text)
    # The model list is the API's, not the job's: any key reads it, the watch link does not.
    for path in ("/v1/models", "/v1/models/simulator"):
        assert requests.get(f"{base}{path}", headers=as_b, timeout=5).status_code == 200
        for params, headers in (({"token": read_token}, {}),
                                ({}, {"Authorization": f"Bearer {read_token}"})):  # fmt: skip
            refused_models = requests.get(f"{base}{path}", params=params, headers=headers,
                                          timeout=5)  # fmt: skip
            assert refused_models.status_code == 401, path
            assert refused_models.json()["error"]["code"] == "invalid_api_key"
    # An unknown job gets the very same answer, so a refusal does not confirm existence.
    unknown = "job_" + "Q" * 24
    assert_refused_like_unknown(requests.get(f"{base}/v1/jobs/{unknown}", timeout=5), unknown, "")

    # Revoking key A: A can no longer create, watch or cancel by key; the read token still works.
    apikeys.revoke(redis, apikeys.authenticate(redis, f"Bearer {key_a}")["id"])  # type: ignore[index]
    again = requests.post(f"{base}/v1/jobs", json=body, headers=as_a, timeout=5)
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_api_key"
    assert_refused_like_unknown(requests.get(status, headers=as_a, timeout=5), job_id, secret_text)
    assert requests.get(job["status_url"], timeout=5).json()["text"] == secret_text

    # Key B's own running job: A (revoked) cannot cancel it, B can, by key and without a token.
    mine = requests.post(
        f"{base}/v1/jobs", json=chat_body("b's", tokens=400, interval=0.02), headers=as_b, timeout=5
    ).json()
    assert (
        requests.post(f"{base}/v1/jobs/{mine['id']}/cancel", headers=as_a, timeout=5).status_code
        == 401
    )
    stopped = requests.post(f"{base}/v1/jobs/{mine['id']}/cancel", headers=as_b, timeout=5)
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"

    logs = "".join(p.output() for p in stack.procs)
    for secret in (key_a, key_b, read_token, cancel_token):
        assert secret not in logs, "keys and tokens never appear in logs"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_open_mode_the_job_id_alone_grants_nothing(running_stack):
    _, base = running_stack
    job = requests.post(
        f"{base}/v1/jobs", json=chat_body("open", tokens=400, interval=0.02), timeout=5
    ).json()
    job_id = job["id"]
    for method, suffix in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
        response = requests.request(method, f"{base}/v1/jobs/{job_id}{suffix}", timeout=5)
        assert_refused_like_unknown(response, job_id, job["read_token"])
    read_only = requests.post(
        f"{base}/v1/jobs/{job_id}/cancel?token={job['read_token']}", timeout=5
    )
    assert_refused_like_unknown(read_only, job_id, job["cancel_token"])
    # Truncated, padded or prefix-only tokens are unknown tokens, on every URL.
    for near in near_misses(job["read_token"]):
        for suffix in ("", "/events"):
            response = requests.get(f"{base}/v1/jobs/{job_id}{suffix}", params={"token": near},
                                    timeout=5)  # fmt: skip
            assert_refused_like_unknown(response, job_id, job["read_token"])
    for near in near_misses(job["cancel_token"]):
        response = requests.post(f"{base}/v1/jobs/{job_id}/cancel", params={"token": near},
                                 timeout=5)  # fmt: skip
        assert_refused_like_unknown(response, job_id, job["cancel_token"])
    # The cancel token, given only to the creator, cancels; the status shows no cancel URL.
    assert requests.post(job["cancel_url"], timeout=5).json()["status"] == "cancelled"
    status = requests.get(job["status_url"], timeout=5).json()
    assert status["status"] == "cancelled" and "cancel_url" not in status
    assert job["cancel_token"] not in str(status)
    received, _ = read_stream(job["events_url"])
    assert received.done and received.finish_reasons == ["cancelled"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_streamed_completion_tells_its_creator_where_to_watch_and_cancel(running_stack):
    _, base = running_stack
    body = {**chat_body("headers", tokens=300, interval=0.02), "stream": True}
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=10) as r:
        assert r.status_code == 200
        events_url = r.headers["X-Relay-Events-Url"]
        watch_url, cancel_url = r.headers["X-Relay-Watch-Url"], r.headers["X-Relay-Cancel-Url"]
        assert query(events_url)["token"] == query(watch_url)["token"]
        assert query(cancel_url)["token"].startswith("ct-")
        assert requests.post(cancel_url, timeout=5).json()["status"] == "cancelled"
        mine, _ = read_stream(events_url)
    assert mine.finish_reasons == ["cancelled"] and mine.done
