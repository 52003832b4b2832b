"""Other sites cannot use the relay through their visitors' browsers (a real Chromium page on
another origin), and requests naming another host are refused (DNS rebinding)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from playwright.sync_api import BrowserContext

from tests.helpers import chat_body

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"<!doctype html><title>another site</title><p>nothing to see"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def other_site() -> Iterator[str]:
    """A page on another origin (localhost, where the relay is 127.0.0.1)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


ATTEMPTS = """async (relay) => {
  const body = JSON.stringify({model: "simulator", messages: [{role: "user", content: "hi"}]});
  const chat = JSON.stringify({prompt: "hi"});
  const tries = {
    plain: [relay + "/v1/jobs", {method: "POST", headers: {"Content-Type": "text/plain"}, body}],
    noCors: [relay + "/v1/jobs", {method: "POST", mode: "no-cors", body}],
    json: [relay + "/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                 body}],
    chatProcess: [relay + "/api/chat-process", {method: "POST", body: chat,
                                                 headers: {"Content-Type": "text/plain"}}],
    completions: [relay + "/v1/chat/completions", {method: "POST", mode: "no-cors", body}],
  };
  const out = {};
  for (const [name, [url, init]] of Object.entries(tries)) {
    try {
      const response = await fetch(url, init);
      out[name] = {status: response.status, type: response.type,
                   text: response.type === "opaque" ? "" : await response.text()};
    } catch (error) {
      out[name] = {error: String(error)};
    }
  }
  return out;
}"""


def jobs_created(stack) -> int:
    return int(stack.redis().hget("relay:metrics", "jobs_created") or 0)


def test_another_sites_page_can_create_and_read_nothing(stack, context: BrowserContext, other_site):
    base = stack.start_web()
    stack.start_worker()
    page = context.new_page()
    page.goto(other_site)
    results = page.evaluate(ATTEMPTS, base)
    print("\nfrom another origin:", results)
    assert jobs_created(stack) == 0, results
    for name, result in results.items():
        # Refused before anything was made, and nothing readable came back.
        assert "error" in result or result["type"] == "opaque" or result["status"] == 415, name
        assert "job_" not in result.get("text", ""), name


def test_an_allowed_origin_may_use_the_relay_from_a_browser(
    stack, context: BrowserContext, other_site
):
    base = stack.start_web(env={"RELAY_CORS_ORIGINS": other_site})
    stack.start_worker()
    page = context.new_page()
    page.goto(other_site)
    made = page.evaluate(
        """async (relay) => {
          const response = await fetch(relay + "/v1/jobs", {method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({model: "simulator", messages: [{role: "user", content: "hi"}]})});
          return {status: response.status, job: await response.json()};
        }""",
        base,
    )
    assert made["status"] == 202 and made["job"]["id"].startswith("job_")
    assert jobs_created(stack) == 1


def test_json_endpoints_refuse_bodies_not_declared_json(running_stack):
    _, base = running_stack
    body = '{"model": "simulator", "messages": [{"role": "user", "content": "hi"}]}'
    for path in ("/v1/jobs", "/v1/chat/completions", "/api/chat-process", "/api/verify"):
        for headers in (
            {"Content-Type": "text/plain"},
            {},
            {"Content-Type": "application/x-www-form-urlencoded"},
        ):
            refused = requests.post(f"{base}{path}", data=body, headers=headers, timeout=5)
            assert refused.status_code == 415, (path, headers, refused.text)
            assert refused.json()["error"]["code"] == "unsupported_media_type"


def test_requests_for_other_hosts_are_refused_and_links_use_the_public_url(stack):
    base = stack.start_web(env={"RELAY_PUBLIC_URL": "https://chat.example.com"})
    stack.start_worker()
    evil = {"Host": "evil.example"}
    refused = requests.post(f"{base}/v1/jobs", json=chat_body("x"), headers=evil, timeout=5)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed"
    assert requests.get(f"{base}/", headers=evil, timeout=5).status_code == 400
    assert requests.get(f"{base}/healthz", headers=evil, timeout=5).ok  # load balancers' probes
    for host in ("chat.example.com", "127.0.0.1:8000"):  # the public name, or a local one
        made = requests.post(f"{base}/v1/jobs", json=chat_body("x"), headers={"Host": host},
                             timeout=5)  # fmt: skip
        assert made.status_code == 202, made.text
        job = made.json()
        for name in ("events_url", "status_url", "watch_url", "cancel_url"):
            assert job[name].startswith("https://chat.example.com/"), job[name]


def test_every_answer_says_it_varies_by_origin_keeping_what_it_varied_by():
    """Caches must not serve one origin's CORS answer to another: Vary names Origin, added to
    any Vary the answer had."""
    from flask import Response

    from relay.web.app import create_app

    app = create_app({"redis_url": "redis://127.0.0.1:1/0", "cors_origins": ("http://a.test",)})

    @app.get("/_varies")
    def varies() -> Response:
        return Response("x", headers={"Vary": "Accept-Encoding"})

    client = app.test_client()
    other = client.get("/v1/models/x", headers={"Origin": "http://b.test"})
    assert other.headers["Vary"] == "Origin"
    answer = client.get("/_varies", headers={"Origin": "http://a.test"})
    assert answer.headers["Vary"] == "Accept-Encoding, Origin"
    assert answer.headers["Access-Control-Allow-Origin"] == "http://a.test"
    # A front end on an allowed origin may read the relay's own headers.
    exposed = {h.strip() for h in answer.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-Relay-Watch-Url", "X-Relay-Cancel-Url", "X-Relay-Default-Model"} <= exposed
