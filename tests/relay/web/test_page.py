"""The browser pages end to end: real redis-server, simulators, gunicorn and worker processes,
driven by a real headless Chromium through Playwright's sync API.

Stacks are shared by the module's tests (each test gets a fresh browser context, so its own
localStorage): a *slow* one whose simulator writes a long reply word by word (typewriter, Stop,
Share live, reconnect), a *fast* one on the session simulator, a *markdown* one whose simulator
always answers with hostile Markdown, and a *broken* one whose upstream is a closed port.
Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    expect,
)

from relay.dev.simulator import reply_text
from tests.conftest import (
    ROOT,
    free_port,
    relay_stack,
    simulator_process,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ARTIFACTS = ROOT / "test-artifacts"
expect.set_options(timeout=10_000)  # generous for a loaded 2-core machine

SLOW_INTERVAL, SLOW_TOKENS = 0.05, 60  # a 3 s reply, 60 visible steps
SLOW_REPLY = reply_text({"simulator": {"tokens": SLOW_TOKENS}})
FAST_REPLY = reply_text({})  # the session simulator's default reply (12 words)
HOSTILE_REPLY = """\
## Rendered, not run

Markdown **works**, with `inline code` and a block:

```python
def greet(name: str) -> str:
    return f"Hello, {name}!"  # a long line: it scrolls in its block on a phone, not the page
```

- <script>window.__pwned=1</script>
- <img src=x onerror="window.__pwned=1">
- [click](javascript:window.__pwned=1)
- [a safe link](https://example.com/)
"""

# A reasoning model's thinking (2 s of it at the slow pace), with markup that must stay text.
THOUGHTS = '<img src=x onerror="window.__pwned=1"> ' + " ".join(f"step{n}" for n in range(40))
ANSWER = "The answer is **42**."


# ---- processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_sim(log_dir: Path) -> Iterator[str]:
    args = ("--interval", str(SLOW_INTERVAL), "--tokens", str(SLOW_TOKENS))
    with simulator_process(log_dir, "simulator-slow", *args) as (base, _):
        yield base


@pytest.fixture(scope="module")
def slow(redis_server: str, slow_sim: str, log_dir: Path) -> Iterator[str]:
    """The slow stack's base URL; a dropped viewer retries after 300 ms."""
    with relay_stack(redis_server, f"{slow_sim}/v1", log_dir, RELAY_RETRY_MS="300") as (_, base):
        yield base


@pytest.fixture(scope="module")
def fast(redis_server: str, simulator: str, log_dir: Path) -> Iterator[str]:
    with relay_stack(redis_server, simulator, log_dir) as (_, base):
        yield base


PAGE_KEY = "sk-relay-page-test-key"


@pytest.fixture(scope="module")
def keyed(redis_server: str, slow_sim: str, log_dir: Path) -> Iterator[str]:
    """A slow stack that needs an API key (``PAGE_KEY``) for every POST."""
    env = {"RELAY_API_KEYS": PAGE_KEY}
    with relay_stack(redis_server, f"{slow_sim}/v1", log_dir, **env) as (_, base):
        yield base


@pytest.fixture(scope="module")
def markdown(redis_server: str, log_dir: Path) -> Iterator[str]:
    sim_args = ("--interval", "0.01", "--reply", HOSTILE_REPLY)
    with simulator_process(log_dir, "simulator-markdown", *sim_args) as (sim, _):
        with relay_stack(redis_server, f"{sim}/v1", log_dir) as (_, base):
            yield base


@pytest.fixture(scope="module")
def thinking(redis_server: str, log_dir: Path) -> Iterator[str]:
    """A stack whose upstream is a reasoning model: THOUGHTS streamed, then ANSWER."""
    sim_args = ("--interval", str(SLOW_INTERVAL), "--reasoning", THOUGHTS, "--reply", ANSWER)
    with simulator_process(log_dir, "simulator-thinking", *sim_args) as (sim, _):
        with relay_stack(redis_server, f"{sim}/v1", log_dir) as (_, base):
            yield base


@pytest.fixture(scope="module")
def broken(redis_server: str, log_dir: Path) -> Iterator[str]:
    """A stack whose upstream refuses connections: every job ends with an error chunk."""
    with relay_stack(redis_server, f"http://127.0.0.1:{free_port()}/v1", log_dir) as (_, base):
        yield base


# ---- the browser -------------------------------------------------------------------------


def open_page(context: BrowserContext, url: str) -> tuple[Page, list[str]]:
    """A new page at ``url``, with the list of script errors and CSP or Trusted Types
    violations it reports (the tests expect none)."""
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))

    def console(message) -> None:
        if re.search(r"Content Security Policy|Trusted ?Type", message.text, re.I):
            problems.append(f"console: {message.text}")

    page.on("console", console)
    page.goto(url)
    return page, problems


def send(page: Page, prompt: str) -> None:
    page.locator("#prompt").fill(prompt)
    page.locator("#send").click()


def last_reply(page: Page):
    return page.locator(".msg.assistant").last


def wait_words(page: Page, words: int) -> None:
    """Until the last reply shows at least ``words`` words (it is still being written)."""
    page.wait_for_function(
        """n => {
            const replies = document.querySelectorAll('.msg.assistant .body');
            const text = replies.length ? replies[replies.length - 1].textContent : '';
            return text.split(/\\s+/).filter(Boolean).length >= n;
        }""",
        arg=words,
    )


def screenshot(page: Page, name: str, capsys: pytest.CaptureFixture) -> Path:
    """Save a screenshot into test-artifacts/ and print its path, past pytest's capture."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}", flush=True)
    return path


def sim_requests(sim: str) -> list[dict]:
    return requests.get(f"{sim}/_sim/requests", timeout=5).json()


def token_of(url: str) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]


def job_status(base: str, reply: Locator) -> dict:
    """The job behind a reply on the page, read with its share link's token."""
    query = urllib.parse.urlsplit(reply.locator("a.share").get_attribute("href")).query
    job_id = reply.get_attribute("data-job-id")
    return requests.get(f"{base}/v1/jobs/{job_id}?{query}", timeout=5).json()


# ---- the tests ---------------------------------------------------------------------------


def test_pages_are_served_with_a_strict_csp_and_nosniff(fast: str):
    for path in ("/", "/watch/job_unknown"):
        response = requests.get(f"{fast}{path}", timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/html")
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert "object-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert '<meta name="viewport"' in response.text
        assert "<script>" not in response.text  # only <script type="module" src=...>
    for name in ("chat.js", "vendor/marked.esm.js", "vendor/purify.es.js", "app.css"):
        response = requests.get(f"{fast}/static/{name}", timeout=5)
        assert response.status_code == 200, name
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        expected = "text/css" if name.endswith(".css") else "text/javascript"
        assert response.headers["Content-Type"].startswith(expected), name


def test_a_reply_types_in_over_several_visible_steps(context: BrowserContext, slow: str):
    page, problems = open_page(context, f"{slow}/")
    # Record the reply's length at every change of the conversation's DOM.
    page.evaluate(
        """() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const replies = document.querySelectorAll('.msg.assistant .body');
                const last = replies[replies.length - 1];
                if (last) window.__lengths.push(last.textContent.trim().length);
            }).observe(document.getElementById('messages'),
                       {childList: true, subtree: true, characterData: true});
        }"""
    )
    send(page, "Tell me about foxes")
    expect(page.locator(".msg.user .body")).to_have_text("Tell me about foxes")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "done", timeout=20_000)
    expect(reply.locator(".body")).to_have_text(SLOW_REPLY)
    lengths: list[int] = page.evaluate("window.__lengths")
    steps = sorted({n for n in lengths if 0 < n < len(SLOW_REPLY)})
    assert len(steps) >= 3, lengths
    assert lengths == sorted(lengths)  # it only ever grows
    assert lengths[-1] == len(SLOW_REPLY)
    assert not problems


def test_a_follow_up_continues_the_conversation(context: BrowserContext, fast: str, simulator: str):
    page, problems = open_page(context, f"{fast}/")
    questions = [f"{n} question, follow-up test" for n in ("First", "Second", "Third")]
    for count, question in enumerate(questions, start=1):
        send(page, question)
        expect(page.locator(".msg.assistant")).to_have_count(count)
        expect(last_reply(page)).to_have_attribute("data-status", "done")
    expect(last_reply(page).locator(".body")).to_have_text(FAST_REPLY)

    sim = simulator.removesuffix("/v1")
    bodies = [b for b in sim_requests(sim) if "follow-up test" in str(b.get("messages"))]
    assert len(bodies) == 3
    assert bodies[2]["messages"] == [
        {"role": "user", "content": questions[0]},
        {"role": "assistant", "content": FAST_REPLY},
        {"role": "user", "content": questions[1]},
        {"role": "assistant", "content": FAST_REPLY},
        {"role": "user", "content": questions[2]},
    ]
    assert not problems


def test_stop_ends_a_long_reply(context: BrowserContext, slow: str):
    page, problems = open_page(context, f"{slow}/")
    send(page, "Say a lot")
    wait_words(page, 3)
    page.locator("#stop").click()
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "stopped")
    expect(reply.locator(".notice")).to_have_text("Stopped")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()

    job = job_status(slow, reply)
    assert job["status"] == "cancelled" and job["finish_reason"] == "cancelled"
    shown = reply.locator(".body").text_content().strip()
    # The job is over, so nothing more can arrive: the page shows exactly its final text,
    # a proper prefix of the whole reply.
    assert shown == job["text"]
    assert shown and SLOW_REPLY.startswith(shown) and len(shown) < len(SLOW_REPLY)

    watcher, watcher_problems = open_page(context, reply.locator("a.share").get_attribute("href"))
    expect(watcher.locator("#status")).to_have_text("cancelled")
    expect(watcher.locator("#reply")).to_have_text(shown)
    assert not problems and not watcher_problems


def test_share_live_shows_the_same_reply_live_and_late(browser: Browser, slow: str, capsys):
    author = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    live = browser.new_context()
    late = browser.new_context(viewport={"width": 900, "height": 560})
    try:
        page, problems = open_page(author, f"{slow}/")
        send(page, "Something to share")
        wait_words(page, 2)
        link = last_reply(page).locator("a.share")
        href = link.get_attribute("href")
        job_id = last_reply(page).get_attribute("data-job-id")
        assert href == f"{slow}/watch/{job_id}?token={token_of(href)}"  # absolute, to copy
        assert token_of(href).startswith("rt-")  # the read token: watching only
        last_reply(page).get_by_role("button", name="Copy link").click()
        expect(last_reply(page).get_by_role("button", name="Copied")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == href

        watcher, watcher_problems = open_page(live, href)  # while the reply is streaming
        expect(watcher.locator("#status")).to_have_text("live")
        expect(watcher.locator("#status")).to_have_text("finished", timeout=20_000)
        expect(watcher.locator("#reply")).to_have_text(SLOW_REPLY)
        expect(last_reply(page)).to_have_attribute("data-status", "done")
        assert page.locator(".msg.assistant .body").last.text_content().strip() == SLOW_REPLY

        latecomer, late_problems = open_page(late, href)  # after the end
        expect(latecomer.locator("#status")).to_have_text("finished")
        expect(latecomer.locator("#reply")).to_have_text(SLOW_REPLY)
        screenshot(latecomer, "watch-page.png", capsys)
        assert not problems and not watcher_problems and not late_problems
    finally:
        for ctx in (author, live, late):
            ctx.close()


def test_the_conversation_survives_a_reload(context: BrowserContext, slow: str, slow_sim: str):
    page, problems = open_page(context, f"{slow}/")
    send(page, "Remember this, reload test")
    wait_words(page, 3)
    page.reload()  # mid-reply: the page follows the job again from its start
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "done", timeout=20_000)
    expect(reply.locator(".body")).to_have_text(SLOW_REPLY)

    page.reload()
    expect(page.locator(".msg.user .body")).to_have_text(["Remember this, reload test"])
    expect(page.locator(".msg.assistant .body")).to_have_text([SLOW_REPLY])
    expect(last_reply(page).locator("a.share")).to_be_visible()

    send(page, "And now? reload test")  # continues from the saved messageId
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(last_reply(page)).to_have_attribute("data-status", "done", timeout=20_000)
    follow_up = [b for b in sim_requests(slow_sim) if "And now? reload test" in str(b)]
    assert follow_up and follow_up[-1]["messages"][:2] == [
        {"role": "user", "content": "Remember this, reload test"},
        {"role": "assistant", "content": SLOW_REPLY},
    ]

    page.locator("#new-chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    page.reload()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    assert not problems


class DroppingProxy:
    """A TCP proxy in front of the relay whose open connections can be cut: a dropped network
    for the browser, with the relay itself untouched."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self.lock:
                self.sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def drop_all(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()
        self.drop_all()


def test_the_watch_page_keeps_going_across_a_dropped_connection(context: BrowserContext, slow: str):
    job = requests.post(f"{slow}/v1/jobs", json={"prompt": "Keep going"}, timeout=5).json()
    proxy = DroppingProxy(int(slow.rsplit(":", 1)[1]))
    try:
        resumed_after: list[str | None] = []

        def on_request(request) -> None:
            if "/events?" in request.url:
                resumed_after.append(request.all_headers().get("last-event-id"))

        watcher, problems = open_page(
            context, f"http://127.0.0.1:{proxy.port}/watch/{job['id']}?token={job['read_token']}"
        )
        watcher.on("request", on_request)
        watcher.evaluate(
            """() => {
                window.__statuses = [];
                const badge = document.getElementById('status');
                new MutationObserver(() => window.__statuses.push(badge.dataset.status))
                    .observe(badge, {attributes: true});
            }"""
        )
        expect(watcher.locator("#status")).to_have_text("live")
        watcher.wait_for_function(
            "() => document.getElementById('reply').textContent.split(' ').length >= 5"
        )
        before = watcher.locator("#reply").text_content().strip()
        proxy.drop_all()  # the browser's connection dies mid-stream

        expect(watcher.locator("#status")).to_have_text("finished", timeout=20_000)
        final = watcher.locator("#reply").text_content().strip()
        assert final == SLOW_REPLY  # complete, nothing repeated
        assert final.startswith(before)
        statuses = watcher.evaluate("window.__statuses")
        assert "reconnecting" in statuses, statuses
        assert statuses.index("reconnecting") < len(statuses) - 1
        # The browser reconnected by itself and resumed after the last event it had.
        resumes = [value for value in resumed_after if value]
        assert resumes and int(resumes[0]) >= 5, resumed_after
        assert requests.get(job["status_url"], timeout=5).json()["status"] == "completed"
        assert not problems
    finally:
        proxy.close()


def test_model_output_is_rendered_harmlessly(browser: Browser, markdown: str, capsys):
    # CSP would block inline handlers and javascript: URLs by itself; bypass it here so that
    # the test proves the sanitizing alone keeps the page safe.
    context = browser.new_context(bypass_csp=True, viewport={"width": 900, "height": 900})
    try:
        page, _ = open_page(context, f"{markdown}/")
        send(page, "Show me some Markdown")
        reply = last_reply(page)
        expect(reply).to_have_attribute("data-status", "done")
        body = reply.locator(".body")
        expect(body.locator("h2")).to_have_text("Rendered, not run")
        expect(body.locator("pre code")).to_contain_text('return f"Hello, {name}!"')
        expect(body.locator("strong")).to_have_text("works")
        # Raw HTML from the model is shown as text; the javascript: link has no href.
        expect(body).to_contain_text("<script>window.__pwned=1</script>")
        expect(body).to_contain_text('<img src=x onerror="window.__pwned=1">')
        assert body.locator("script").count() == 0
        assert body.locator("img[onerror], [onerror], [onclick]").count() == 0
        body.get_by_text("click", exact=True).click()
        hrefs = body.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert hrefs == [None, "https://example.com/"]
        safe = body.get_by_text("a safe link")
        expect(safe).to_have_attribute("rel", "noopener noreferrer")
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.evaluate("document.querySelectorAll('script:not([src])').length") == 0
        screenshot(page, "chat-page.png", capsys)
    finally:
        context.close()


def test_a_reasoning_models_thinking_shows_first_then_folds_away(
    browser: Browser, thinking: str, capsys
):
    author, watcher = browser.new_context(), browser.new_context()
    try:
        page, problems = open_page(author, f"{thinking}/")
        send(page, "What is six times seven?")
        reply = last_reply(page)
        details = reply.locator("details.thinking")
        label = details.locator("summary")
        expect(label).to_have_text("Thinking…")  # while it thinks, open and growing
        expect(details).to_have_attribute("open", "")
        expect(reply.locator(".body")).to_have_text("")
        expect(reply).to_have_attribute("data-status", "done")
        expect(label).to_have_text("Thought")  # once it answered, folded away
        expect(details).not_to_have_attribute("open", "")
        expect(reply.locator(".reasoning")).to_have_text(THOUGHTS)  # markup shown as text
        expect(reply.locator(".body strong")).to_have_text("42")
        assert reply.locator("img").count() == 0
        assert page.evaluate("typeof window.__pwned") == "undefined"
        # The conversation's text is the answer alone, as the next turn's history will be.
        assert job_status(thinking, reply)["text"] == ANSWER

        share = reply.locator("a.share").get_attribute("href")
        view, view_problems = open_page(watcher, share)
        expect(view.locator("#status")).to_have_text("finished")
        expect(view.locator("#thinking summary")).to_have_text("Thought")
        expect(view.locator("#thinking .reasoning")).to_have_text(THOUGHTS)
        expect(view.locator("#reply strong")).to_have_text("42")
        assert view.locator("img").count() == 0

        page.reload()  # the thinking is kept with the conversation
        expect(last_reply(page).locator(".reasoning")).to_have_text(THOUGHTS)
        screenshot(page, "chat-reasoning.png", capsys)
        assert not problems and not view_problems
    finally:
        author.close()
        watcher.close()

    # An API client that does not stream gets the thinking beside the answer.
    whole = requests.post(
        f"{thinking}/v1/chat/completions", timeout=30,
        json={"messages": [{"role": "user", "content": "Again?"}], "stream": False},
    ).json()["choices"][0]["message"]  # fmt: skip
    assert (whole["reasoning_content"], whole["content"]) == (THOUGHTS, ANSWER)


def test_errors_are_shown(context: BrowserContext, fast: str):
    page, problems = open_page(context, f"{fast}/")
    error = {
        "error": {
            "message": "Something about your request was wrong.",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": None,
        }
    }
    page.route(
        "**/v1/jobs",
        lambda route: (
            route.fulfill(status=400, json=error)
            if route.request.method == "POST"
            else route.fallback()
        ),
    )
    send(page, "Rejected")
    notice = last_reply(page).locator(".notice.error")
    expect(notice).to_have_text("Something about your request was wrong.")
    expect(page.locator("#prompt")).to_have_value("Rejected")  # ready to send again
    page.unroute("**/v1/jobs")

    page.route("**/v1/jobs", lambda route: route.abort("connectionrefused"))
    send(page, "Unreachable")
    expect(last_reply(page).locator(".notice.error")).to_contain_text("Could not reach the relay")
    page.unroute("**/v1/jobs")

    page.route("**/events*", lambda route: route.abort("connectionrefused"))
    send(page, "Stream unreachable")
    expect(last_reply(page).locator(".notice.error")).to_have_text(
        "Could not reach the relay to follow the reply."
    )
    page.unroute("**/events*")

    send(page, "Works again")
    expect(last_reply(page)).to_have_attribute("data-status", "done")
    expect(last_reply(page).locator(".body")).to_have_text(FAST_REPLY)
    expect(page.locator(".msg.assistant[data-status=failed]")).to_have_count(3)

    watcher, watcher_problems = open_page(context, f"{fast}/watch/job_unknown")
    expect(watcher.locator("#status")).to_have_text("failed")
    expect(watcher.locator("#problem")).to_contain_text("unknown or expired job")
    assert not problems and not watcher_problems


def test_the_page_asks_for_a_key_and_sends_the_one_it_was_given(browser: Browser, keyed: str):
    context = browser.new_context()
    page, problems = open_page(context, f"{keyed}/")
    expect(page.locator("#model")).to_be_hidden()  # /v1/models needs the key too
    sent: list[str | None] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")
            and sent.append(r.headers.get("authorization")))  # fmt: skip
    send(page, "Without a key")
    expect(last_reply(page)).to_have_attribute("data-status", "failed")
    expect(last_reply(page).locator(".notice.error")).to_contain_text("This relay needs an API key")
    expect(page.locator("#key-dialog")).to_be_visible()  # opened where the key goes
    expect(page.locator("#key-help")).to_contain_text("needs an API key")
    expect(page.locator("#prompt")).to_have_value("Without a key")

    page.locator("#key-input").fill("sk-relay-wrong")
    page.locator("#key-save").click()
    page.locator("#send").click()
    expect(last_reply(page).locator(".notice.error")).to_contain_text("refused this API key")

    page.locator("#key-input").fill(PAGE_KEY)
    page.locator("#key-save").click()
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#model")).to_be_visible()  # the key shows the relay's models
    page.locator("#send").click()
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "done")
    expect(reply.locator(".body")).to_have_text(SLOW_REPLY)
    assert sent == [None, "Bearer sk-relay-wrong", f"Bearer {PAGE_KEY}"]
    share = reply.locator("a.share").get_attribute("href")

    send(page, "Stop this one")  # Stop is a POST too: it carries the key
    wait_words(page, 2)
    page.locator("#stop").click()
    expect(last_reply(page)).to_have_attribute("data-status", "stopped")

    # The share link works with its token alone, in a browser that has no key.
    stranger = browser.new_context()
    watcher, watcher_problems = open_page(stranger, urllib.parse.urljoin(keyed, share))
    expect(watcher.locator("#status")).to_have_text("finished")
    expect(watcher.locator("#reply")).to_have_text(SLOW_REPLY)

    # Kept across a reload; "Forget" removes it.
    page.reload()
    expect(page.locator("#key-button")).to_have_class(re.compile(r"\bhas-key\b"))
    page.locator("#key-button").click()
    expect(page.locator("#key-input")).to_have_value(PAGE_KEY)
    page.locator("#key-forget").click()
    expect(page.locator("#key-button")).not_to_have_class(re.compile(r"\bhas-key\b"))
    assert page.evaluate("localStorage.getItem('chat-relay:api-key')") is None
    assert not problems and not watcher_problems
    context.close()
    stranger.close()


def test_the_model_picker_lists_the_relays_models_and_remembers_the_choice(
    context: BrowserContext, fast: str
):
    page, problems = open_page(context, f"{fast}/")
    picker = page.locator("#model")
    expect(picker).to_be_visible()
    # "Default" names the model a request without one gets (RELAY_DEFAULT_MODEL here).
    expect(picker.locator("option")).to_have_text(["Default (gpt-4o-mini)", "simulator"])
    expect(picker).to_have_value("simulator")  # the relay serves one model: its name shows
    posted: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")
            and posted.append(r.post_data_json))  # fmt: skip
    send(page, "With the one model")
    expect(last_reply(page)).to_have_attribute("data-status", "done")
    picker.select_option("")  # "Default": the relay's own choice
    page.reload()
    expect(page.locator("#model")).to_have_value("")  # remembered, over the one model
    send(page, "With the default")
    expect(last_reply(page)).to_have_attribute("data-status", "done")
    assert posted[0]["model"] == "simulator" and "model" not in posted[1]
    assert not problems


def test_an_error_in_the_stream_is_shown(context: BrowserContext, broken: str):
    page, problems = open_page(context, f"{broken}/")
    send(page, "Hello?")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "failed")
    job = job_status(broken, reply)
    assert job["status"] == "failed" and job["error"]["code"] == "upstream_unreachable"
    expect(reply.locator(".notice.error")).to_have_text(job["error"]["message"])
    expect(page.locator("#send")).to_be_visible()
    assert not problems


def test_phone_width(browser: Browser, markdown: str, capsys):
    context = browser.new_context(
        viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True
    )
    try:
        page, problems = open_page(context, f"{markdown}/")
        expect(page.locator("#prompt")).to_be_in_viewport()
        expect(page.locator("#send")).to_be_in_viewport()
        send(page, "A long code line, on a phone")
        expect(last_reply(page)).to_have_attribute("data-status", "done")
        no_scroll = "document.documentElement.scrollWidth <= window.innerWidth"
        assert page.evaluate(no_scroll)
        assert page.evaluate("document.body.scrollWidth <= window.innerWidth")
        expect(page.locator("#prompt")).to_be_in_viewport()
        expect(page.locator("#send")).to_be_in_viewport()
        expect(page.locator("#new-chat")).to_be_in_viewport()
        screenshot(page, "chat-phone.png", capsys)
        assert not problems
    finally:
        context.close()


def test_vendored_libraries_match_their_manifest():
    vendor = ROOT / "relay" / "web" / "static" / "vendor"
    sums = re.findall(r"^([0-9a-f]{64})  (\S+)$", (vendor / "VERSIONS").read_text(), re.M)
    assert {name for _, name in sums} == {"marked.esm.js", "purify.es.js"}
    for digest, name in sums:  # deploy/vendor.sh wrote them; nobody edited them by hand
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
