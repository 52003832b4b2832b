"""deploy/nginx.conf in front of a real gunicorn: streams keep the upstream's pace through
nginx (and a buffering config visibly breaks that), errors keep the relay's JSON shape, static
files come from nginx itself.

nginx runs in the foreground from a temporary prefix with a minimal main config that includes
a copy of deploy/nginx.conf, in which only the ports and paths are substituted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlsplit

import pytest
import requests

from tests.conftest import Proc, Stack, free_port, start_process, wait_for
from tests.deploy.nginx_site import nginx_binary, render_site, write_nginx_prefix
from worker.sse_decoder import SSEDecoder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TOKENS = 10
INTERVAL = 0.3
# The simulator pauses INTERVAL before each content chunk: first to last is 2.7 s.
UPSTREAM_SPREAD = (TOKENS - 1) * INTERVAL
SLOW = {"tokens": TOKENS, "interval": INTERVAL}
MIB = 1024 * 1024


@dataclass
class Nginx:
    base: str
    prefix: Path
    static_root: Path
    proc: Proc

    def log(self) -> str:
        """Everything nginx wrote to its error logs (the main one and the site's)."""
        paths = [self.prefix / "logs" / name for name in ("error.log", "site.error.log")]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def logs(self) -> str:
        """Every log nginx wrote: error and access logs."""
        return "".join(p.read_text(errors="replace") for p in (self.prefix / "logs").glob("*"))


@pytest.fixture
def start_nginx(tmp_path: Path, log_dir: Path) -> Iterator[Callable[..., Nginx]]:
    """Start nginx in front of a gunicorn base URL with deploy/nginx.conf (``streaming``: the
    streamed locations' buffering directives, see ``render_site``); stopped at teardown."""
    binary = nginx_binary()
    if binary is None:
        pytest.fail("nginx is not installed: run the tests with deploy/test.sh (it installs it)")
    started: list[Proc] = []

    def start(web_base: str, streaming: str = "proxy_buffering off;") -> Nginx:
        port = free_port()
        prefix = tmp_path / f"nginx-{port}"
        static_root = prefix / "static"
        static_root.mkdir(parents=True)
        (static_root / "probe.txt").write_text("served by nginx\n")
        site = render_site(
            upstream=urlparse(web_base).netloc,
            listen=f"127.0.0.1:{port}",
            static_root=static_root,
            streaming=streaming,
        )
        conf = write_nginx_prefix(prefix, site)
        cmd = [binary, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        proc = start_process(f"nginx-{port}", cmd, log_dir)
        started.append(proc)
        server = Nginx(f"http://127.0.0.1:{port}", prefix, static_root, proc)

        def ready() -> bool:
            if not proc.alive():
                pytest.fail(f"nginx exited:\n{proc.output()}\n{server.log()}")
            return requests.get(f"{server.base}/static/probe.txt", timeout=1).ok

        wait_for(ready, 10, f"nginx ({proc.log})")
        return server

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def content_of(chunk: dict) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or ())


def sse_arrivals(response: requests.Response, timeout: float = 20.0) -> list[tuple[float, str]]:
    """(arrival time, data) of each SSE event until [DONE], as the bytes come off the socket."""
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + timeout
    decoder = SSEDecoder()
    arrivals: list[tuple[float, str]] = []
    with response:
        for block in response.iter_content(chunk_size=None):
            now = time.monotonic()
            for event in decoder.feed(block):
                arrivals.append((now, event.data))
                if event.data == "[DONE]":
                    return arrivals
            assert now < deadline, f"stream did not end within {timeout}s: {arrivals}"
    raise AssertionError(f"stream ended without [DONE]: {arrivals}")


def sse_content_times(response: requests.Response) -> list[float]:
    arrivals = sse_arrivals(response)
    return [t for t, data in arrivals if data != "[DONE]" and content_of(json.loads(data))]


def chat_process_content_times(response: requests.Response, timeout: float = 20.0) -> list[float]:
    """Arrival times of chatgpt-web's JSON lines that add text (``delta``)."""
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + timeout
    pending = b""
    times: list[float] = []
    with response:
        for block in response.iter_content(chunk_size=None):
            now = time.monotonic()
            pending += block
            *complete, pending = pending.split(b"\n")
            # The last line has no newline after it until the next one starts: take it as soon
            # as it parses (a truncated JSON object never does).
            try:
                json.loads(pending)
                complete.append(pending)
                pending = b""
            except ValueError:
                pass
            times.extend(now for line in complete if line and json.loads(line).get("delta"))
            assert now < deadline, f"stream did not end within {timeout}s"
    return times


def distinct_arrivals(times: list[float], window: float = 0.05) -> int:
    """How many separate moments the chunks arrived at (arrivals within ``window`` merge)."""
    moments = 0
    last = None
    for t in sorted(times):
        if last is None or t - last > window:
            moments += 1
        last = t
    return moments


def open_stream(base: str, endpoint: str) -> tuple[requests.Response, Callable]:
    """Start a slow reply through ``base`` on one of the streamed endpoints."""
    messages = [{"role": "user", "content": "slow"}]
    if endpoint == "events":
        body = {"model": "simulator", "messages": messages, "simulator": SLOW}
        job = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
        assert job.status_code == 202, job.text
        # events_url is built from the Host header nginx passes on: it points at nginx.
        events_url = job.json()["events_url"]
        assert events_url.startswith(f"{base}/v1/jobs/{job.json()['id']}/events?token=")
        return requests.get(events_url, stream=True, timeout=(5, 20)), sse_content_times
    if endpoint == "chat-completions":
        body = {"model": "simulator", "messages": messages, "simulator": SLOW, "stream": True}
        url = f"{base}/v1/chat/completions"
        return requests.post(url, json=body, stream=True, timeout=(5, 20)), sse_content_times
    body = {"prompt": "slow", "simulator": SLOW}
    url = f"{base}/api/chat-process"
    return requests.post(url, json=body, stream=True, timeout=(5, 20)), chat_process_content_times


# The relay's own `X-Accel-Buffering: no` turns nginx's buffering off per response; ignoring
# it leaves the decision to the config alone.
IGNORE_HEADER = "proxy_ignore_headers X-Accel-Buffering;"
STREAM_CASES = [
    # The production config.
    pytest.param("events", "proxy_buffering off;", False, id="events-production"),
    # The production config without help from the relay's header: its own settings keep
    # every streamed endpoint flowing.
    pytest.param("events", f"proxy_buffering off; {IGNORE_HEADER}", False, id="events-config"),
    pytest.param(
        "chat-completions",
        f"proxy_buffering off; {IGNORE_HEADER}",
        False,
        id="chat-completions-config",
    ),
    pytest.param(
        "chat-process", f"proxy_buffering off; {IGNORE_HEADER}", False, id="chat-process-config"
    ),
    # The mistake the config avoids: nginx's defaults, buffering on and HTTP/1.0 to the
    # upstream (so gunicorn's response is delimited by the connection's end, not chunked).
    # (Buffering on with HTTP/1.1 still passes each complete upstream chunk on at once.)
    pytest.param(
        "events",
        f"proxy_buffering on; {IGNORE_HEADER} proxy_http_version 1.0;",
        True,
        id="events-buffered",
    ),
]


@pytest.mark.parametrize(("endpoint", "streaming", "buffered"), STREAM_CASES)
def test_streams_keep_the_upstream_pace_through_nginx(
    stack: Stack,
    start_nginx: Callable[..., Nginx],
    endpoint: str,
    streaming: str,
    buffered: bool,
) -> None:
    web = stack.start_web()
    stack.start_worker()
    proxy = start_nginx(web, streaming=streaming)

    response, content_times = open_stream(proxy.base, endpoint)
    assert "Content-Encoding" not in response.headers  # gzip off, although the client accepts it
    assert "X-Accel-Buffering" not in response.headers  # nginx keeps it to itself
    times = content_times(response)

    assert len(times) == TOKENS
    spread = times[-1] - times[0]
    moments = distinct_arrivals(times)
    report = f"{len(times)} content chunks over {spread:.3f}s at {moments} distinct moments"
    print(f"\n{endpoint} [{streaming}]: {report} (upstream: {UPSTREAM_SPREAD:.1f}s)")
    if endpoint == "events":  # the job's read token stays out of the access log
        log = proxy.prefix / "logs" / "site.access.log"
        wait_for(lambda: "/events " in log.read_text(), 5, "the stream's access log line")
        assert "token" not in log.read_text()
    if buffered:
        # Everything arrives in one lump when the reply ends: no typewriter effect.
        assert spread < 0.3, f"chunks spread over {spread:.3f}s although nginx buffers"
        assert moments <= 2
    else:
        # Each chunk arrives when the upstream sends it.
        assert spread >= 0.7 * UPSTREAM_SPREAD, f"chunks spread over only {spread:.3f}s"
        assert moments >= TOKENS - 2, f"chunks arrived at only {moments} distinct moments"


def test_nginx_errors_health_static_and_metrics(
    stack: Stack, start_nginx: Callable[..., Nginx]
) -> None:
    web = stack.start_web()
    proxy = start_nginx(web)

    health = requests.get(f"{proxy.base}/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json()["ok"] is True

    # Just over the relay's 1 MiB limit: nginx lets it through, the relay answers its own 413.
    # Far over: nginx refuses it itself, in the same JSON shape.
    for size, answered_by in ((MIB + 1, "relay"), (3 * MIB, "nginx")):
        body = b'{"messages": "' + b"x" * (size - 16) + b'"}'
        assert len(body) == size
        response = requests.post(
            f"{proxy.base}/v1/jobs",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 413, (answered_by, response.text)
        assert response.headers["Content-Type"].startswith("application/json"), answered_by
        error = response.json()["error"]
        assert error["code"] == "request_too_large", (answered_by, error)
        assert error["type"] == "invalid_request_error"
    # nginx refused only the large one itself (it logs each body it refuses).
    refused = proxy.log().count("client intended to send too large body")
    assert refused == 1, proxy.log()

    # Static files come from nginx's alias, not from Flask (which does not have this file).
    static = requests.get(f"{proxy.base}/static/probe.txt", timeout=5)
    assert static.status_code == 200
    assert static.text == "served by nginx\n"
    assert static.headers["Cache-Control"] == "no-cache"
    assert requests.get(f"{proxy.base}/static/missing.js", timeout=5).status_code == 404

    # Prometheus metrics are open to the local/monitoring network.
    metrics = requests.get(f"{proxy.base}/metrics", timeout=5)
    assert metrics.status_code == 200, metrics.text
    assert metrics.headers["Content-Type"].startswith("text/plain")

    # gunicorn gone: nginx answers 503 in the relay's JSON shape, with Retry-After.
    stack.stop()
    down = requests.get(f"{proxy.base}/healthz", timeout=10)
    assert down.status_code == 503
    assert down.headers["Retry-After"] == "2"
    assert down.json()["error"]["code"] == "service_unavailable"


def test_tokens_stay_out_of_nginx_error_logs_as_well(
    stack: Stack, start_nginx: Callable[..., Nginx]
) -> None:
    """nginx's error messages quote the whole request line: a viewer that hangs up, or a relay
    that is down, would put ?token= into the error log. The token locations log only
    critical errors (the main log here is at level info, the strictest test)."""
    web = stack.start_web()
    stack.start_worker()
    proxy = start_nginx(web)
    job = requests.post(f"{proxy.base}/v1/jobs", json={
        "model": "simulator", "messages": [{"role": "user", "content": "hi"}],
        "simulator": {"tokens": 50, "interval": 0.05}}, timeout=5).json()  # fmt: skip
    token, cancel_token = job["read_token"], job["cancel_token"]
    events = job["events_url"].replace(web, proxy.base)
    with requests.get(events, stream=True, timeout=5) as response:
        next(response.iter_content(64))  # a viewer that hangs up mid-stream
    for url in (events, job["status_url"], job["watch_url"], job["cancel_url"]):
        requests.get(url.replace(web, proxy.base), timeout=5)
    stack.stop()  # the relay goes away: every request now fails upstream
    for url in (events, job["status_url"], job["watch_url"]):
        assert requests.get(url.replace(web, proxy.base), timeout=10).status_code == 503
    assert requests.post(job["cancel_url"].replace(web, proxy.base), timeout=10).status_code == 503
    requests.get(f"{proxy.base}/healthz", timeout=10)  # an error that is logged (no token)
    wait_for(lambda: "connect() failed" in proxy.log(), 5, "nginx logging the failures")
    logs = proxy.logs()
    assert token not in logs and cancel_token not in logs and "token=" not in logs


def established_to(port: int) -> set[int]:
    """The client ports of the TCP connections established to ``port`` on this host."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                ports.add(int(remote.rsplit(":", 1)[1], 16))
    return ports


def test_nginx_keeps_its_connection_to_the_relay_alive(
    stack: Stack, start_nginx: Callable[..., Nginx]
):
    web = stack.start_web()
    proxy = start_nginx(web)
    port = urlsplit(web).port
    seen: set[int] = set()
    for _ in range(10):
        assert requests.get(f"{proxy.base}/healthz", timeout=5).ok
        seen |= established_to(port)
    assert len(seen) == 1, f"one upstream connection reused, not {len(seen)}"
    time.sleep(6)  # idle past nginx's keepalive_timeout (5 s), within gunicorn's (10 s)
    assert requests.get(f"{proxy.base}/healthz", timeout=5).ok
