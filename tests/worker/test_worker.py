"""The worker against real processes: upstream failures, and workers killed mid-job."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

from relay.dev.simulator import reply_text
from tests.conftest import free_port, wait_for
from tests.helpers import chat_body, create_job, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def status_of(job: dict) -> dict:
    return requests.get(job["status_url"], timeout=5).json()


@pytest.mark.parametrize(
    ("sim_options", "code"),
    [
        ({"fail": "status_500"}, "upstream_http_500"),
        ({"fail": "json_error"}, None),
        ({"fail": "hang", "fail_after": 0}, "upstream_timeout"),
        ({"fail": "hang", "fail_after": 3}, "upstream_timeout"),
        ({"fail": "drop_after", "fail_after": 3}, "upstream_disconnected"),
        ({"fail": "error_after", "fail_after": 3}, "simulated"),
    ],
    ids=["500", "json-error", "hang-before-first", "hang-mid-stream", "drop", "error-mid-stream"],
)
def test_upstream_failures_end_in_an_error_event_and_done(base, sim_options, code):
    job = create_job(base, chat_body("fail", tokens=10, **sim_options))
    started = time.monotonic()
    received, _ = read_stream(job["events_url"], timeout=30)
    assert received.done, received
    assert received.data.count("[DONE]") == 1
    (error,) = received.errors
    assert set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code
    assert received.chunks[-1].get("error"), "the error is the last event before [DONE]"
    # The read timeout is 3 s in the test stack: a hang must not last longer than that.
    assert time.monotonic() - started < 10
    status = status_of(job)
    assert status["status"] == "failed"
    assert status["error"]["message"] == error["message"]


@pytest.mark.parametrize("reason", ["length", "content_filter"])
def test_finish_reasons_reach_viewers_and_status(base, reason):
    body = chat_body("finish", tokens=5, finish_reason=reason)
    received, _ = read_stream(create_job(base, body)["events_url"])
    assert received.finish_reasons == [reason]


def test_max_tokens_truncation_is_length(base):
    body = {**chat_body("long", tokens=20), "max_tokens": 4}
    job = create_job(base, body)
    received, _ = read_stream(job["events_url"])
    assert received.finish_reasons == ["length"]
    assert status_of(job)["finish_reason"] == "length"
    assert status_of(job)["text"] == reply_text(body)


def test_worker_killed_before_the_first_chunk_another_worker_completes_the_job(stack):
    base = stack.start_web()
    doomed = stack.start_worker()
    body = chat_body("rerun", tokens=6, first_delay=2)
    job = create_job(base, body)
    wait_for(lambda: status_of(job)["status"] == "running", 10, "the job to be claimed")
    doomed.signal(signal.SIGKILL)
    stack.start_worker()
    received, _ = read_stream(job["events_url"], timeout=30)
    assert received.done and received.text == reply_text(body) and not received.errors
    status = status_of(job)
    assert status["status"] == "completed"
    assert status["attempts"] >= 2  # the first claim was fenced off, the job ran again


def test_worker_killed_mid_stream_viewers_get_an_error_and_done_within_the_lease(stack):
    lease = 3.0
    base = stack.start_web()
    doomed = stack.start_worker()
    job = create_job(base, chat_body("lost", tokens=400, interval=0.05))
    first, _ = read_stream(job["events_url"], max_events=5)
    assert len(first.ids) == 5
    result: dict = {}

    def watch() -> None:
        result["r"] = read_stream(job["events_url"], headers={"Last-Event-ID": "5"}, timeout=30)[0]
        result["at"] = time.monotonic()

    viewer = threading.Thread(target=watch)
    viewer.start()
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    stack.start_worker()  # the janitor runs in any live worker
    viewer.join(30)
    received = result["r"]
    assert received.done and received.data.count("[DONE]") == 1
    assert received.errors[0]["code"] == "worker_lost"
    assert result["at"] - killed_at <= lease + 0.5
    assert received.ids == list(range(6, 6 + len(received.ids)))
    assert status_of(job)["status"] == "failed"


@pytest.mark.parametrize("fmt", ["crlf", "multiline", "comments", ["crlf", "multiline"]])
def test_upstream_stream_formats_relay_the_exact_text(base, fmt):
    body = chat_body("formats", tokens=8, format=fmt)
    received, _ = read_stream(create_job(base, body)["events_url"])
    assert received.done and not received.errors
    assert received.text == reply_text(body)


def test_one_worker_process_runs_200_streaming_jobs_at_once(stack):
    base = stack.start_web()
    stack.start_worker(concurrency=256)
    stats_url = stack.upstream.removesuffix("/v1") + "/_sim/stats"
    # Each job streams for 4 s: run one after another, 200 would take over 13 minutes.
    bodies = [chat_body(f"job {i}", tokens=20, interval=0.2) for i in range(200)]
    jobs = [create_job(base, body) for body in bodies]
    peak = wait_for(
        lambda: (n := requests.get(stats_url, timeout=5).json()["active_streams"]) >= 200 and n,
        20,
        "200 upstream streams open at once",
    )
    assert peak >= 200
    for job, body in zip(jobs, bodies, strict=True):
        wait_for(lambda job=job: status_of(job)["status"] != "running", 20, "job end")
        status = status_of(job)
        assert status["status"] == "completed" and status["text"] == reply_text(body)


@pytest.mark.parametrize(
    ("fail", "code", "least_seconds"),
    [("status_429", "rate_limit_exceeded", 2.0), ("status_500", "upstream_http_500", 1.5)],
)
def test_retryable_failures_before_the_first_chunk_are_retried_with_backoff_then_end(
    stack, fail, code, least_seconds
):
    base = stack.start_web()
    stack.start_worker(env={"RELAY_UPSTREAM_MAX_RETRIES": "2"})
    marker = f"retry-{fail}-{time.monotonic_ns()}"
    started = time.monotonic()
    job = create_job(base, chat_body(marker, fail=fail))
    received, _ = read_stream(job["events_url"], timeout=30)
    elapsed = time.monotonic() - started
    assert received.done and received.errors[0]["code"] == code
    # 429 honours Retry-After (1 s, twice); 5xx backs off 0.5 s then 1 s. Bounded: 3 attempts.
    assert least_seconds <= elapsed < least_seconds + 5
    bodies = requests.get(stack.upstream.removesuffix("/v1") + "/_sim/requests", timeout=5).json()
    assert sum(1 for b in bodies if marker in str(b.get("messages"))) == 3


def test_connection_refused_ends_in_an_error_event(stack):
    stack.upstream = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    base = stack.start_web()
    stack.start_worker(env={"RELAY_UPSTREAM_MAX_RETRIES": "1"})
    received, _ = read_stream(create_job(base, chat_body("refused"))["events_url"], timeout=30)
    assert received.done and received.errors[0]["code"] == "upstream_unreachable"


def test_a_worker_refuses_to_start_on_a_redis_older_than_7(redis_url, monkeypatch):
    from relay.core.settings import Settings
    from worker import main

    monkeypatch.setattr(main, "oldest_version", lambda client: (6, 2))
    worker = main.Worker(Settings.from_env({"RELAY_REDIS_URL": redis_url}), worker_id="old")
    try:
        with pytest.raises(SystemExit, match=r"Redis 6\.2 at .*needs Redis 7\.0 or later"):
            worker.work()
    finally:
        worker.redis.close()


def test_the_token_counters_encoding_is_loaded_as_a_process_starts(monkeypatch):
    """Loading cl100k takes ~0.2 s of CPU: on a process's event loop at its first count, it
    would stall every stream the process serves (the worker's other jobs at its first job's
    end; the web's first request before its job is stored). Both load it as they start."""
    import runpy
    from types import SimpleNamespace

    from relay.core import tokens
    from relay.core.settings import Settings
    from tests.conftest import GUNICORN_CONF
    from worker import main

    tokens._encoder.cache_clear()
    worker = main.Worker(Settings(redis_url="redis://127.0.0.1:1/0"), worker_id="w-load")
    assert tokens._encoder.cache_info().currsize == 1
    worker.redis.close()

    tokens._encoder.cache_clear()
    hooks = runpy.run_path(str(GUNICORN_CONF))
    hooks["post_worker_init"](SimpleNamespace(wsgi=object(), age=2))  # not the relay's app
    assert tokens._encoder.cache_info().currsize == 1


def test_reloading_the_routes_takes_the_new_file_and_a_broken_one_keeps_the_last_good(
    tmp_path, monkeypatch, caplog
):
    from relay.core.settings import Settings
    from worker import main, runner

    path = tmp_path / "routes.toml"
    table = "[upstreams.{0}]\nbase_url='http://{0}/v1'\napi_key_env='{1}'\n[[routes]]\nmodel='m'\n"
    path.write_text(table.format("a", "KEY_A") + "upstreams=['a']")
    monkeypatch.setenv("KEY_A", "sk-old-a")
    monkeypatch.setenv("KEY_B", "sk-new-b")
    settings = Settings(redis_url="redis://127.0.0.1:1/0", upstreams_file=str(path))
    worker = main.Worker(settings, worker_id="w-hup")
    try:
        assert worker.ctx.routes.targets("m")[0].upstream.name == "a"
        path.write_text(table.format("b", "KEY_B") + "upstreams=['b']")
        worker.reload_routes()
        assert worker.ctx.routes.targets("m")[0].upstream.name == "b"
        # A job still streaming from the old upstream may have its key echoed in an error.
        assert {"sk-old-a", "sk-new-b"} <= set(runner._secrets(worker.ctx))
        path.write_text("[upstreams\n")
        with caplog.at_level("ERROR", logger="worker.main"):
            worker.reload_routes()
        assert worker.ctx.routes.targets("m")[0].upstream.name == "b"
        assert "routes not reloaded, the worker keeps the last good ones" in caplog.text
        assert "not valid TOML" in caplog.text
    finally:
        worker.redis.close()
