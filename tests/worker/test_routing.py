"""Several upstreams from a routes file (RELAY_UPSTREAMS_FILE), against real processes: models
routed to their upstreams, fallback before the first chunk and never after it, a cap on one
upstream's streams across workers, and /v1/models.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from relay.dev.simulator import reply_text
from tests.conftest import Stack, free_port, wait_for
from tests.conftest import simulator_process as upstream
from tests.helpers import chat_body, children, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def sim_models(base: str) -> list[str]:
    return [r.get("model") for r in requests.get(f"{base}/_sim/requests", timeout=5).json()]


def routes_file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "routes.toml"
    path.write_text(text)
    return {"RELAY_UPSTREAMS_FILE": str(path)}


def job_for(base: str, model: str, **simulator: object) -> dict:
    body = {**chat_body(f"for {model}", **simulator), "model": model}
    if not model:
        del body["model"]
    response = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.fixture
def two(log_dir: Path) -> Iterator[tuple[str, str]]:
    with upstream(log_dir, "sim-a", "--interval", "0.01", "--models", "alpha,alpha-mini") as (a, _):
        with upstream(log_dir, "sim-b", "--interval", "0.01", "--models", "beta") as (b, _):
            yield a, b


def test_each_model_goes_to_its_upstream_and_the_status_says_which(stack: Stack, two, tmp_path):
    a, b = two
    stack.env.update(
        routes_file(
            tmp_path,
            f"""
[upstreams.a]
base_url = "{a}/v1"
[upstreams.b]
base_url = "{b}/v1"
[[routes]]
model = "fast"
upstreams = ["b"]
rename = {{ b = "beta" }}
[[routes]]
model = "alpha*"
upstreams = ["a"]
""",
        )
    )
    base = stack.start_web()
    stack.start_worker()
    # No route takes RELAY_DEFAULT_MODEL (gpt-4o-mini): a request without a model gets the
    # first route's.
    cases = (("alpha-mini", "a", "alpha-mini"), ("fast", "b", "beta"), ("", "b", "beta"))
    for model, served_by, sent_as in cases:
        job = job_for(base, model, tokens=5)
        received, _ = read_stream(job["events_url"])
        assert received.done and not received.errors
        assert received.text == reply_text({"simulator": {"tokens": 5}})
        status = requests.get(job["status_url"], timeout=5).json()
        assert status["upstream"] == served_by and status["model"] == (model or "fast")
        assert sent_as in sim_models(a if served_by == "a" else b)
    refused = requests.post(f"{base}/v1/jobs", json={**chat_body(), "model": "gamma"}, timeout=5)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert refused.json()["error"]["param"] == "model"
    # The model list names that default, beside OpenAI's body, for a picker's "Default".
    listed = requests.get(f"{base}/v1/models", timeout=10)
    assert listed.headers["X-Relay-Default-Model"] == "fast"


def test_an_upstream_that_refuses_stream_options_is_sent_none(stack: Stack, log_dir, tmp_path):
    """Some servers answer 400 to ``stream_options``, which the relay adds to ask for usage:
    ``stream_options = false`` in the routes file keeps it (and the client's own) from them."""
    with upstream(log_dir, "sim-strict", "--refuse-stream-options") as (strict, _):
        stack.env.update(routes_file(tmp_path, f"""
[upstreams.strict]
base_url = "{strict}/v1"
stream_options = false
[[routes]]
model = "*"
upstreams = ["strict"]
"""))  # fmt: skip
        base = stack.start_web()
        stack.start_worker()
        body = {**chat_body("strict", tokens=5), "model": "m", "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        received, _ = read_stream(f"{base}/v1/chat/completions", method="POST", json_body=body)
        assert received.done and not received.errors, received.errors
        assert received.text == reply_text({"simulator": {"tokens": 5}})
        (sent,) = requests.get(f"{strict}/_sim/requests", timeout=5).json()
        assert "stream_options" not in sent and sent["stream"] is True
        # The simulator does refuse them: without the setting, the same job fails.
        requests.delete(f"{strict}/_sim/requests", timeout=5)
        direct = requests.post(f"{strict}/v1/chat/completions", json=body, timeout=5)
        assert direct.status_code == 400 and "stream_options" in direct.json()["error"]["message"]


@pytest.mark.parametrize(
    "failure", ["refused", "status_429", "status_500", "hang", "echo_key", "status_404"]
)
def test_a_failure_before_the_first_chunk_moves_the_job_to_the_next_upstream(
    stack: Stack, two, tmp_path, failure: str
):
    a, b = two
    first = f"http://127.0.0.1:{free_port()}/v1" if failure == "refused" else f"{a}/v1"
    headers = "" if failure == "refused" else f'headers = {{ "X-Sim-Fail" = "{failure}" }}'
    if failure == "hang":  # silent until its read timeout: a second, not the stack's three
        headers += "\nread_timeout = 1"
    stack.env.update(
        routes_file(
            tmp_path,
            f"""
[upstreams.first]
base_url = "{first}"
{headers}
[upstreams.second]
base_url = "{b}/v1"
[[routes]]
model = "*"
upstreams = ["first", "second"]
""",
        )
    )
    base = stack.start_web()
    stack.start_worker()
    job = job_for(base, "anything", tokens=8)
    received, _ = read_stream(job["events_url"])
    assert received.done and not received.errors
    assert received.ids == list(range(1, len(received.ids) + 1))  # one clean stream
    assert received.text == reply_text({"simulator": {"tokens": 8}})
    assert requests.get(job["status_url"], timeout=5).json()["upstream"] == "second"
    klass = {"refused": "unreachable", "status_429": "http_429", "status_500": "http_5xx",
             "hang": "timeout", "echo_key": "http_4xx", "status_404": "http_4xx"}  # fmt: skip

    def counted() -> bool:
        """The job's counters, written after its first chunk (off the first token's path)."""
        metrics = requests.get(f"{base}/metrics", timeout=5).text
        return (
            'relay_upstream_fallbacks_total{upstream="first"} 1.0' in metrics
            and 'relay_upstream_requests_total{upstream="second"} 1.0' in metrics
            and re.search(rf'relay_upstream_failures_total{{(class="{klass[failure]}",'
                          rf'upstream="first"|upstream="first",class="{klass[failure]}")}}',
                          metrics) is not None
        )  # fmt: skip

    wait_for(counted, 5, "the fallback, the second upstream's request and the first's failure")


@pytest.mark.parametrize("failure", ["after_the_first_chunk", "the_requests_own"])
def test_a_failure_after_the_first_chunk_or_of_the_request_stays_where_it_is(
    stack: Stack, two, tmp_path, failure: str
):
    a, b = two
    stack.env.update(
        routes_file(
            tmp_path,
            f"""
[upstreams.first]
base_url = "{a}/v1"
[upstreams.second]
base_url = "{b}/v1"
[[routes]]
model = "*"
upstreams = ["first", "second"]
""",
        )
    )
    base = stack.start_web()
    stack.start_worker()
    requests.delete(f"{b}/_sim/requests", timeout=5)
    if failure == "after_the_first_chunk":
        job = job_for(base, "anything", tokens=8, fail="error_after", fail_after=3)
    else:  # a 400: the request's fault, which the next upstream would refuse as well
        job = job_for(base, "anything", tokens=8, fail="status_400")
    received, _ = read_stream(job["events_url"])
    assert received.done and received.errors  # the viewer sees the failure...
    if failure == "the_requests_own":
        assert received.errors[0]["message"].endswith("simulated bad request")
    assert sim_models(b) == []  # ...and the second upstream never saw the job
    assert requests.get(job["status_url"], timeout=5).json()["status"] == "failed"


def test_a_changed_routes_file_takes_effect_on_hup_and_a_broken_one_changes_nothing(
    stack: Stack, two, tmp_path
):
    """Operators edit the routes file, then HUP gunicorn and the workers (``systemctl reload``).
    Until then, every web process serves the routes gunicorn started with, even one started
    again after a crash; a file broken by the edit is refused, and the relay keeps serving."""
    a, b = two
    table = f'[upstreams.a]\nbase_url = "{a}/v1"\n[upstreams.b]\nbase_url = "{b}/v1"\n'
    env = routes_file(tmp_path, table + '[[routes]]\nmodel = "m"\nupstreams = ["a"]\n')
    path = Path(env["RELAY_UPSTREAMS_FILE"])
    stack.env.update(env)
    base = stack.start_web()
    web = stack.procs[-1]
    worker = stack.start_worker()

    def served_by(model: str) -> str:
        job = job_for(base, model, tokens=3)
        received, _ = read_stream(job["events_url"])
        assert received.done and not received.errors, received.errors
        return requests.get(job["status_url"], timeout=5).json()["upstream"]

    def replaced(old: set[int]) -> bool:
        """gunicorn's processes are all new ones, and answer."""
        now = children(web.popen.pid)
        return bool(now) and not now & old and requests.get(f"{base}/healthz", timeout=1).ok

    def refused(model: str) -> bool:
        response = requests.post(f"{base}/v1/jobs", json={**chat_body(), "model": model}, timeout=5)
        return response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"

    assert served_by("m") == "a"
    path.write_text(table + '[[routes]]\nmodel = "*"\nupstreams = ["b"]\n')
    crashed = children(web.popen.pid)
    for pid in crashed:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: replaced(crashed), 20, "gunicorn to start its process again")
    assert refused("n")  # the routes gunicorn started with, not the file's

    for process in (worker, web):
        os.kill(process.popen.pid, signal.SIGHUP)
    before = children(web.popen.pid)
    wait_for(lambda: "routes reloaded" in worker.output(), 10, "the worker's reload")
    wait_for(lambda: "routes reloaded" in web.output() and replaced(before), 20, "gunicorn's")
    assert served_by("n") == "b" and served_by("m") == "b"

    path.write_text("[upstreams\n")  # an edit that broke it
    for process in (worker, web):
        os.kill(process.popen.pid, signal.SIGHUP)
    before = children(web.popen.pid)
    wait_for(lambda: "routes not reloaded" in worker.output(), 10, "the worker's refusal")
    wait_for(lambda: "routes not reloaded" in web.output() and replaced(before), 20, "gunicorn's")
    crashed = children(web.popen.pid)
    for pid in crashed:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: replaced(crashed), 20, "gunicorn to start its process again")
    assert web.alive() and worker.alive()
    assert served_by("n") == "b" and "not valid TOML" in worker.output()


def test_a_capped_upstream_never_carries_more_than_its_cap(stack: Stack, log_dir, tmp_path):
    with upstream(log_dir, "sim-capped", "--interval", "0.05") as (capped, _):
        stack.env.update(
            routes_file(
                tmp_path,
                f"""
[upstreams.small]
base_url = "{capped}/v1"
max_streams = 2
[[routes]]
model = "*"
upstreams = ["small"]
""",
            )
        )
        base = stack.start_web()
        stack.start_worker()
        stack.start_worker()  # the cap holds across worker processes
        jobs = [job_for(base, "m", tokens=10) for _ in range(6)]
        results: list = []
        threads = [threading.Thread(target=lambda j=j: results.append(read_stream(
            j["events_url"], timeout=60)[0])) for j in jobs]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 6 and all(r.done and not r.errors for r in results)
        stats = requests.get(f"{capped}/_sim/stats", timeout=5).json()
        print(f"\nfigure: 6 jobs on an upstream capped at 2: peak {stats['peak_streams']} streams")
        assert stats["peak_streams"] == 2 and stats["total_requests"] == 6


def test_v1_models_lists_both_upstreams_and_survives_one_being_down(
    stack: Stack, log_dir, tmp_path
):
    down = f"http://127.0.0.1:{free_port()}/v1"
    with upstream(log_dir, "sim-a", "--models", "alpha,alpha-mini,other") as (a, _):
        with upstream(log_dir, "sim-b", "--models", "beta") as (b, b_proc):
            stack.env.update(
                routes_file(
                    tmp_path,
                    f"""
[upstreams.a]
base_url = "{a}/v1"
[upstreams.b]
base_url = "{b}/v1"
[upstreams.down]
base_url = "{down}"
[[routes]]
model = "alpha*"
upstreams = ["a"]
[[routes]]
model = "beta"
upstreams = ["b"]
[[routes]]
model = "offline-model"
upstreams = ["down"]
""",
                )
            )
            web = stack.start_web()
            listed = requests.get(f"{web}/v1/models", timeout=10)
            assert listed.status_code == 200
            body = listed.json()
            assert body["object"] == "list"
            ids = [m["id"] for m in body["data"]]
            # alpha and alpha-mini from a ("other" routes nowhere), beta from b, and the
            # down upstream's model because a route names it.
            assert ids == ["alpha", "alpha-mini", "beta", "offline-model"]
            # The first route is a pattern that gpt-4o-mini does not match: a request without
            # a model is refused, so there is no default to name.
            assert "X-Relay-Default-Model" not in listed.headers
            assert {m["owned_by"] for m in body["data"]} == {"a", "b", "down"}
            client = openai.OpenAI(base_url=f"{web}/v1", api_key="unused", max_retries=0)
            assert [m.id for m in client.models.list()] == ids
            assert client.models.retrieve("beta").owned_by == "b"
            missing = requests.get(f"{web}/v1/models/gpt-9", timeout=5)
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "model_not_found"
            b_proc.stop()  # b goes away: its last list is kept
        again = requests.get(f"{web}/v1/models", timeout=10)
        assert again.status_code == 200
        assert [m["id"] for m in again.json()["data"]] == ids
    assert "upstream down: model list unavailable" in stack.procs[0].output()
    # With keys configured, listing models needs one.
    stack.redis().sadd("relay:apikeys", "0" * 64)
    wait_for(lambda: requests.get(f"{web}/v1/models", timeout=5).status_code == 401, 5,
             "models to need a key")  # fmt: skip
    assert json.loads(requests.get(f"{web}/v1/models", timeout=5).text)["error"]["code"] == (
        "invalid_api_key"
    )


def test_jobs_to_one_upstream_reuse_one_connection(stack: Stack, log_dir):
    with upstream(log_dir, "sim-warm", "--interval", "0.001") as (sim, _):
        stack.upstream = f"{sim}/v1"
        base = stack.start_web()
        stack.start_worker()
        before = requests.get(f"{sim}/_sim/stats", timeout=5).json()["connections"]
        for n in range(5):
            job = job_for(base, "m", tokens=3)
            received, _ = read_stream(job["events_url"])
            assert received.done and not received.errors, n
        after = requests.get(f"{sim}/_sim/stats", timeout=5).json()["connections"]
        # One connection for five jobs (the stats request itself is one more).
        assert after - before - 1 == 1
