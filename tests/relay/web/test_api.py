"""The HTTP API against real processes: gunicorn -k gevent, a worker, redis-server, and the
simulator over HTTP."""

from __future__ import annotations

import json
import socket
import struct
import threading

import openai
import pytest
import requests

from relay.dev.simulator import reply_text
from tests.helpers import chat_body, create_job, read_stream, sdk_text, status_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_three_viewers_start_mid_stream_and_resume_see_the_same_sequence(base):
    body = chat_body("three viewers", tokens=40, interval=0.03)
    job = create_job(base, body)
    url = job["events_url"]
    results: dict[str, object] = {}

    def watch(name: str, **kwargs) -> None:
        results[name] = read_stream(url, **kwargs)[0]

    first = threading.Thread(target=watch, args=("first",))
    first.start()
    # The mid-stream viewer joins once the stream is well under way.
    partial, _ = read_stream(url, max_events=15)
    late = threading.Thread(target=watch, args=("late",))
    late.start()
    # The third drops after a few events and reconnects with Last-Event-ID.
    dropped, _ = read_stream(url, max_events=5)
    resumed, _ = read_stream(url, headers={"Last-Event-ID": str(dropped.ids[-1])})
    first.join(30)
    late.join(30)

    expected = reply_text(body)
    whole = results["first"]
    assert whole.done and whole.text == expected
    assert whole.ids == list(range(1, len(whole.ids) + 1))
    assert results["late"].ids == whole.ids and results["late"].data == whole.data
    assert dropped.ids + resumed.ids == whole.ids
    assert dropped.data + resumed.data == whole.data
    assert partial.ids == whole.ids[:15]
    assert whole.finish_reasons == ["stop"]


def test_a_viewer_after_completion_gets_the_whole_stream_and_status(base):
    body = chat_body("late", tokens=8)
    job = create_job(base, body)
    first, _ = read_stream(job["events_url"])
    again, _ = read_stream(job["events_url"])
    assert again.data == first.data and again.ids == first.ids and again.done
    status = requests.get(job["status_url"], timeout=5).json()
    assert status["status"] == "completed"
    assert status["text"] == reply_text(body)
    assert status["finish_reason"] == "stop"
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]


def test_last_event_id_query_parameter_resumes_a_first_connect(base):
    job = create_job(base, chat_body("query resume", tokens=6))
    whole, _ = read_stream(job["events_url"])
    resumed, _ = read_stream(job["events_url"] + "&lastEventId=3")
    assert resumed.ids == whole.ids[3:] and resumed.data == whole.data[3:]
    # The header wins over the query parameter, as for a reconnecting EventSource.
    header, _ = read_stream(job["events_url"] + "&lastEventId=1", headers={"Last-Event-ID": "5"})
    assert header.ids == whole.ids[5:]


def test_stream_headers_and_retry_hint(base):
    job = create_job(base, chat_body("headers", tokens=3))
    with requests.get(job["events_url"], stream=True, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        body = b"".join(response.iter_content(chunk_size=None))
    opening, first, *rest = body.strip().split(b"\n\n")
    assert opening.startswith(b": ")  # a comment flushes the headers at once
    assert first.startswith(b"retry: ") and b"\nid: 1\n" in first
    assert body.endswith(b"data: [DONE]\n\n")
    assert all(block.startswith(b"id: ") for block in rest), "every event carries an id"


def test_keep_alive_comments_while_idle(base):
    # The stack's keep-alive is 1 s (read timeout 3 s); the upstream waits 2.5 s to start.
    job = create_job(base, chat_body("idle", tokens=2, first_delay=2.5))
    with requests.get(job["events_url"], stream=True, timeout=10) as response:
        body = b"".join(response.iter_content(chunk_size=None))
    assert b": keep-alive\n\n" in body
    assert body.endswith(b"data: [DONE]\n\n")


def test_unknown_jobs_are_404_in_openai_shape(base):
    for path in ("/v1/jobs/job_" + "A" * 24, "/v1/jobs/nope/events", "/v1/jobs/job_x/events"):
        response = requests.get(base + path, timeout=5)
        assert response.status_code == 404
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}


def test_openai_sdk_streams_through_chat_completions(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    body = chat_body("sdk", tokens=12)
    raw = client.chat.completions.with_raw_response.create(
        model="simulator",
        messages=body["messages"],
        stream=True,
        extra_body={"simulator": body["simulator"]},
    )
    events_url = raw.headers["X-Relay-Events-Url"]
    text, reasons = sdk_text(raw.parse())
    assert text == reply_text(body)
    assert reasons == ["stop"]
    # Others can watch the same job with its tokened events URL.
    watched, _ = read_stream(events_url)
    assert watched.text == text and watched.done


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[]", 400, None),
        (b'{"model": "m"}', 400, "messages"),
        (b'{"model": "m", "messages": []}', 400, "messages"),
        (
            b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "messages[0].role",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "x"}',
            400,
            "temperature",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "'
            + b"x" * 2_000_000
            + b'"}]}',
            413,
            None,
        ),
    ],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions"])
def test_malformed_requests_get_json_errors_and_the_service_keeps_working(
    base, path, payload, status, param
):
    if path.endswith("completions") and status == 400 and param is not None:
        payload = payload[:-1] + b', "stream": true}'
    response = requests.post(
        base + path, data=payload, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert requests.get(f"{base}/healthz", timeout=5).ok


def test_stream_false_through_the_openai_sdk_returns_the_upstreams_text(base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    body = chat_body("whole", tokens=9)
    raw = client.chat.completions.with_raw_response.create(
        model="simulator", messages=body["messages"], extra_body={"simulator": body["simulator"]}
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == reply_text(body)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    # The job behind it is an ordinary job: watchable, with the same text.
    watched, _ = read_stream(raw.headers["X-Relay-Events-Url"])
    assert watched.text == reply_text(body)


def test_stream_false_upstream_failure_is_a_json_error(base):
    response = requests.post(
        f"{base}/v1/chat/completions", json=chat_body("x", fail="status_500"), timeout=20
    )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_http_500"


def test_usage_reaches_the_status_and_clients_that_asked(base):
    asked = {
        **chat_body("usage", tokens=5),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    received, response = read_stream(f"{base}/v1/chat/completions", method="POST", json_body=asked)
    usage_chunks = [c for c in received.chunks if not c["choices"] and c.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["usage"]["completion_tokens"] == 5
    job = requests.get(status_url(response), timeout=5).json()
    assert job["usage"] == usage_chunks[0]["usage"]

    not_asked = {**chat_body("usage", tokens=5), "stream": True}
    received, response = read_stream(
        f"{base}/v1/chat/completions", method="POST", json_body=not_asked
    )
    assert not [c for c in received.chunks if not c["choices"]], "no usage chunk unasked"
    job = requests.get(status_url(response), timeout=5).json()
    assert job["usage"]["completion_tokens"] == 5  # stored all the same

    job = create_job(base, chat_body("usage", tokens=5))  # a job's viewers did not ask either
    received, _ = read_stream(job["events_url"])
    assert not [c for c in received.chunks if not c["choices"]]
    assert requests.get(job["status_url"], timeout=5).json()["usage"]["completion_tokens"] == 5


def test_unknown_route_and_method_are_json(base):
    nothing = requests.get(f"{base}/v2/nothing", timeout=5).json()["error"]
    assert nothing["code"] == "not_found" and "/v1" not in nothing["message"]
    response = requests.delete(f"{base}/v1/jobs", timeout=5)
    assert response.status_code == 405 and "error" in response.json()


def test_a_base_url_without_v1_or_with_it_twice_is_told_the_path_it_meant(base):
    """Front ends ask for a base URL and append ``/models``; users leave out ``/v1`` or type it
    twice. The 404 names the path the relay serves, for the request's own method."""
    without = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        without.models.list()
    assert "did you mean GET /v1/models?" in str(info.value)
    twice = requests.post(f"{base}/v1/v1/chat/completions", json=chat_body("x"), timeout=5)
    assert twice.status_code == 404
    assert "did you mean POST /v1/chat/completions?" in twice.json()["error"]["message"]
    # Only a path served for that method is suggested (GET /v1/chat/completions is a 405).
    wrong_method = requests.get(f"{base}/chat/completions", timeout=5)
    assert wrong_method.status_code == 404 and "/v1" not in wrong_method.json()["error"]["message"]


def test_bad_last_event_id_is_a_400(base):
    job = create_job(base, chat_body("x", tokens=1))
    response = requests.get(job["events_url"], headers={"Last-Event-ID": "abc"}, timeout=5)
    assert response.status_code == 400


def test_a_chunked_body_over_the_limit_is_a_413_too(base):
    def body():  # no Content-Length: the limit must hold while reading
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}]}'

    response = requests.post(
        f"{base}/v1/jobs", data=body(), headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_input_limits_are_enforced_over_http(base):
    too_many = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 501}
    response = requests.post(f"{base}/v1/jobs", json=too_many, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_messages"


def test_a_non_ascii_digit_last_event_id_is_a_400_not_a_500(base):
    job = create_job(base, chat_body("x", tokens=1))
    response = requests.get(job["events_url"], params={"lastEventId": "²"}, timeout=5)
    assert response.status_code == 400


@pytest.mark.parametrize("public_url", ["", "https://relay.example/"])
def test_job_links_are_what_url_for_makes_under_a_mount_point_too(public_url):
    """The links are built from templates (url_for costs 25 us each): the same URLs as
    url_for's, on the public URL or the request's host, under the app's mount point, and for
    values a template must not take (those go through url_for itself)."""
    from flask import url_for

    from relay.web.access import Access
    from relay.web.api import job_links
    from relay.web.app import create_app

    app = create_app({"redis_url": "redis://127.0.0.1:1/0", "public_url": public_url,
                      "allowed_hosts": "relay.test"})  # fmt: skip
    grant = Access.new(owner="")
    odd = Access("", "rt-a~t~b", "ct-x y")  # never made by the relay, but must stay right
    for root in ("", "/sub", "/a/b"):
        for job_id, access in (("job_" + "x" * 24, grant), ("job_" + "y" * 24, grant),
                               ("job_~j~", odd)):  # fmt: skip
            with app.test_request_context("/", base_url=f"http://relay.test{root}"):
                base = public_url.rstrip("/") or f"http://relay.test{root}".removesuffix(root)
                read = {"job_id": job_id, "token": access.read_token}
                cancel = {"job_id": job_id, "token": access.cancel_token}
                assert job_links(job_id, access, creator=True) == {
                    "events_url": base + url_for("relay.job_events", **read),
                    "status_url": base + url_for("relay.job_status", **read),
                    "watch_url": base + url_for("pages.watch", **read),
                    "cancel_url": base + url_for("relay.cancel_job", **cancel),
                }


def test_job_link_templates_stay_bounded_whatever_mount_points_requests_name():
    """A mount point can come with a request (a SCRIPT_NAME header from a trusted proxy): the
    templates kept stop at their cap, and links past it are url_for's, just as right."""
    from flask import url_for

    from relay.web import api
    from relay.web.access import Access
    from relay.web.app import create_app

    app = create_app({"redis_url": "redis://127.0.0.1:1/0"})
    grant, job_id = Access.new(owner=""), "job_" + "x" * 24
    for n in range(api.URL_TEMPLATES_MAX + 4):  # the cap is reached, links stay right
        with app.test_request_context("/", base_url=f"http://localhost/p{n}"):
            links = api.job_links(job_id, grant, creator=True)
            read = {"job_id": job_id, "token": grant.read_token}
            assert links["events_url"] == "http://localhost" + url_for("relay.job_events", **read)
    assert len(app.extensions["relay"].url_templates) == api.URL_TEMPLATES_MAX


def data_segments_in(sock: socket.socket) -> int:
    """Segments with data this socket has received (Linux's ``tcpi_data_segs_in``)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 152)[0]  # its offset in struct tcp_info


def test_a_streams_head_and_opening_comment_come_in_one_packet(base):
    """gunicorn writes the head and the first bytes separately; corked, they reach the client
    as one segment (one wake-up, here and at every proxy between), ahead of the first event."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({**chat_body("hi", first_delay=1.0), "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (base.removeprefix("http://").encode(),
                                                       len(body), body))  # fmt: skip
        received = b""
        while b": stream open" not in received:
            more = sock.recv(65536)
            assert more, received
            received += more
        assert received.startswith(b"HTTP/1.1 200")
        assert data_segments_in(sock) == 1
