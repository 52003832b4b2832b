"""Property-based fuzzing of the HTTP endpoints against a real gunicorn: whatever the body or
header, the answer is never a 5xx and never a hang, and every refusal is OpenAI-shaped JSON."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FUZZ = settings(
    max_examples=400,  # x 6 tests: 2,400 generated requests per run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot", "", None])
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": json_values})
    | st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), json_values),
    max_size=4,
)
params = st.dictionaries(
    st.sampled_from(
        ["model", "temperature", "top_p", "n", "max_tokens", "stop", "stream", "stream_options",
         "parentMessageId", "systemMessage", "prompt", "seed", "user", "tools", "logit_bias"]
    ),
    json_values,
    max_size=5,
)  # fmt: skip
chat_bodies = st.builds(lambda m, p: {"messages": m, **p}, messages, params) | json_values


def assert_clean(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["message"]


def post(url: str, payload: bytes) -> requests.Response:
    # stream=True: a valid request may answer with an event stream; its status is enough.
    response = requests.post(
        url, data=payload, headers={"Content-Type": "application/json"}, timeout=20, stream=True
    )
    response.close()
    return response


@FUZZ
@given(body=chat_bodies)
def test_post_jobs_never_fails_on_any_json(base, body):
    response = requests.post(
        f"{base}/v1/jobs",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=20,
    )
    assert_clean(response)


@FUZZ
@given(body=chat_bodies, stream=st.booleans())
def test_chat_completions_never_fails_on_any_json(base, body, stream):
    if isinstance(body, dict) and stream:
        body["stream"] = True
    response = post(f"{base}/v1/chat/completions", json.dumps(body).encode())
    assert response.status_code < 500


@FUZZ
@given(payload=st.binary(max_size=300))
def test_any_bytes_are_a_clean_refusal(base, payload):
    for path in ("/v1/jobs", "/v1/chat/completions", "/api/chat-process"):
        response = post(f"{base}{path}", payload)
        assert response.status_code < 500


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {"prompt": json_values, "options": json_values}, optional={"systemMessage": json_values}
    )
)
def test_chat_process_never_fails_on_any_json(base, body):
    response = post(f"{base}/api/chat-process", json.dumps(body).encode())
    assert response.status_code < 500


@pytest.fixture(scope="module")
def job(base):
    response = requests.post(
        f"{base}/v1/jobs", json={"messages": [{"role": "user", "content": "x"}]}, timeout=10
    )
    return response.json()


@FUZZ
@given(
    job_id=st.text(max_size=40),
    # What an HTTP client can send in a header: visible ASCII (requests refuses the rest).
    last_event_id=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
    query=st.text(max_size=30),
)
def test_job_urls_and_resume_headers_never_fail(base, job, job_id, last_event_id, query):
    safe_id = requests.utils.quote(job_id, safe="")
    for path in (f"/v1/jobs/{safe_id}", f"/v1/jobs/{safe_id}/events", f"/v1/jobs/{safe_id}/cancel"):
        method = "POST" if path.endswith("cancel") else "GET"
        response = requests.request(method, base + path, timeout=10, stream=True)
        response.close()
        assert response.status_code < 500
    headers = {"Last-Event-ID": last_event_id}
    response = requests.get(
        job["events_url"], headers=headers, params={"lastEventId": query}, timeout=10, stream=True
    )
    response.close()
    assert response.status_code in (200, 400)


visible = st.characters(min_codepoint=33, max_codepoint=126)


@FUZZ
@given(
    token=st.text(max_size=60),
    authorization=st.builds(
        str.__add__, st.sampled_from(["", "Bearer ", "bearer ", "Basic "]), st.text(visible)
    ),
)
def test_guessed_tokens_and_keys_never_fail_and_never_grant(base, job, token, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for method, suffix in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
        response = requests.request(
            method,
            f"{base}/v1/jobs/{job['id']}{suffix}",
            params={"token": token},
            headers=headers,
            timeout=10,
            stream=True,
        )
        response.close()
        assert response.status_code == 404, (method, suffix, response.status_code)
