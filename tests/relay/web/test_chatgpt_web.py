"""chatgpt-web's back-end API, read as its front end reads it."""

from __future__ import annotations

import json

import pytest
import requests

from relay.dev.simulator import reply_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def chat_process(base: str, body: dict, headers: dict | None = None) -> tuple[list[dict], dict]:
    """Like the front end's onDownloadProgress: on every read, parse the last complete line."""
    seen: list[dict] = []
    with requests.post(
        f"{base}/api/chat-process", json=body, headers=headers, stream=True, timeout=20
    ) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/octet-stream"
        text = ""
        for block in response.iter_content(chunk_size=None):
            text += block.decode()
            last = text.rfind("\n", 0, len(text) - 1)
            chunk = text if last == -1 else text[last:]
            try:
                seen.append(json.loads(chunk))
            except json.JSONDecodeError:
                pass  # the front end ignores a read that ends mid-object too
    final = json.loads(text.split("\n")[-1])
    return seen, final


def recorded(stack) -> list[dict]:
    return requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()


def test_chat_process_streams_progress_and_continues_a_conversation(running_stack):
    stack, base = running_stack
    sim = {"tokens": 15, "interval": 0.03}
    seen, final = chat_process(base, {"prompt": "Hello!", "options": {}, "simulator": sim})
    expected = reply_text({"simulator": sim})
    assert final["role"] == "assistant"
    assert final["text"] == expected
    assert final["detail"]["choices"][0]["finish_reason"] == "stop"
    assert len({s["text"] for s in seen}) >= 3, "the reply grew in several visible steps"
    assert all(expected.startswith(s["text"]) for s in seen)
    assert all(set(s) == {"role", "id", "parentMessageId", "text", "delta", "detail"} for s in seen)

    follow = {"prompt": "Tell me more", "options": {"parentMessageId": final["id"]},
              "systemMessage": "You are terse.", "temperature": 0.5, "top_p": 1,
              "simulator": {"tokens": 3}}  # fmt: skip
    _, second = chat_process(base, follow)
    assert second["parentMessageId"] != final["id"] and second["id"] != final["id"]
    sent = next(
        r for r in reversed(recorded(stack)) if r["messages"][-1]["content"] == "Tell me more"
    )
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "Tell me more"},
    ]
    assert sent["temperature"] == 0.5 and sent["top_p"] == 1


def test_chat_process_reports_upstream_failure_as_a_fail_line(running_stack):
    base = running_stack[1]
    _, final = chat_process(base, {"prompt": "x", "simulator": {"fail": "status_500"}})
    assert final["status"] == "Fail" and "500" in final["message"]


def test_chat_process_unknown_parent_is_a_json_error(running_stack):
    base = running_stack[1]
    response = requests.post(
        f"{base}/api/chat-process",
        json={"prompt": "x", "options": {"parentMessageId": "gone"}},
        timeout=5,
    )
    assert response.status_code == 404
    body = response.json()
    assert body["status"] == "Fail" and body["error"]["param"] == "parentMessageId"


def test_start_up_endpoints_without_a_secret(running_stack):
    base = running_stack[1]
    session = requests.post(f"{base}/api/session", timeout=5)
    assert session.json() == {
        "status": "Success",
        "message": "",
        "data": {"auth": False, "model": "ChatGPTAPI"},
    }
    assert "Access-Control-Allow-Origin" not in session.headers  # no other site, by default
    config = requests.post(f"{base}/api/config", timeout=5).json()
    assert config["status"] == "Success" and config["data"]["apiModel"] == "ChatGPTAPI"


def test_a_front_end_served_elsewhere_is_allowed_by_the_cors_setting(stack):
    base = stack.start_web(env={"RELAY_CORS_ORIGINS": "https://chat.example.com"})
    for origin, allowed in (("https://chat.example.com", True), ("https://evil.example", False)):
        preflight = requests.options(
            f"{base}/api/chat-process", timeout=5,
            headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"},
        )  # fmt: skip
        assert preflight.ok
        if allowed:
            assert preflight.headers["Access-Control-Allow-Origin"] == origin
            assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
        else:
            assert "Access-Control-Allow-Origin" not in preflight.headers


def test_a_secret_gates_chat_process_and_verify(stack):
    base = stack.start_web(env={"RELAY_CHATGPT_WEB_SECRET": "s3cret"})
    stack.start_worker()
    assert requests.post(f"{base}/api/session", timeout=5).json()["data"]["auth"] is True
    assert requests.post(f"{base}/api/verify", json={"token": "nope"}, timeout=5).status_code == 401
    assert requests.post(f"{base}/api/verify", json={"token": "s3cret"}, timeout=5).json() == {
        "status": "Success",
        "message": "Verify successfully",
        "data": None,
    }
    refused = requests.post(f"{base}/api/chat-process", json={"prompt": "x"}, timeout=5)
    assert refused.status_code == 401 and refused.json()["status"] == "Unauthorized"
    _, final = chat_process(
        base,
        {"prompt": "x", "simulator": {"tokens": 2}},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert final["detail"]["choices"][0]["finish_reason"] == "stop"


def test_with_api_keys_the_front_end_signs_in_with_a_key_and_owns_its_conversations(stack):
    """The unchanged front end: /api/session says auth is needed, the user types a relay key as
    the "secret key", /api/verify accepts it, and every request carries it as a Bearer token.
    A chatgpt-web secret set as well never stands in for a key."""
    keys = {"RELAY_API_KEYS": "cw-key-a-1,cw-key-b-1", "RELAY_CHATGPT_WEB_SECRET": "s3cret"}
    base = stack.start_web(env=keys)
    stack.start_worker()
    session = requests.post(f"{base}/api/session", timeout=5).json()
    assert session["data"]["auth"] is True
    for wrong in ("nope", "s3cret"):
        refused = requests.post(f"{base}/api/verify", json={"token": wrong}, timeout=5)
        assert refused.status_code == 401 and refused.json()["status"] == "Unauthorized"
    verified = requests.post(f"{base}/api/verify", json={"token": "cw-key-a-1"}, timeout=5)
    assert verified.json()["status"] == "Success"
    for headers in ({}, {"Authorization": "Bearer s3cret"}):
        refused = requests.post(f"{base}/api/chat-process", json={"prompt": "x"},
                                headers=headers, timeout=5)  # fmt: skip
        assert refused.status_code == 401 and refused.json()["status"] == "Unauthorized"

    as_a, as_b = {"Authorization": "Bearer cw-key-a-1"}, {"Authorization": "Bearer cw-key-b-1"}
    parent, prompts = None, ["one", "two", "three"]
    for prompt in prompts:
        options = {"parentMessageId": parent} if parent else {}
        body = {"prompt": prompt, "options": options, "simulator": {"tokens": 2}}
        _, final = chat_process(base, body, headers=as_a)
        parent = final["id"]
    reply = reply_text({"simulator": {"tokens": 2}})
    sent = next(r for r in reversed(recorded(stack)) if r["messages"][-1]["content"] == "three")
    assert [m["content"] for m in sent["messages"]] == ["one", reply, "two", reply, "three"]
    theft = {"prompt": "x", "options": {"parentMessageId": parent}}
    stolen = requests.post(f"{base}/api/chat-process", json=theft, headers=as_b, timeout=5)
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "message_not_found"
