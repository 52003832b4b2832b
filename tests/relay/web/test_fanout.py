"""The per-process fan-out: forced races, slow viewers, reconnects, and connection counts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
import requests

from relay.dev.simulator import reply_text
from tests.conftest import ROOT, wait_for
from tests.helpers import chat_body, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SCENARIOS = Path(__file__).with_name("fanout_scenarios.py")


def run_scenario(redis_url: str, name: str) -> list[int]:
    result = subprocess.run(
        [sys.executable, str(SCENARIOS), redis_url, name],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_resume_after_gap_between_backlog_and_live(redis_url):
    # 3 events before; 3 published after subscribing but before the log is read (they arrive
    # twice: in the log and live); 3 more + [DONE] after the log was read (live only).
    assert run_scenario(redis_url, "backlog_live_race") == list(range(1, 11))


def test_a_slow_viewer_overflows_and_catches_up_from_the_log(redis_url):
    assert run_scenario(redis_url, "slow_viewer") == list(range(1, 52))


def test_a_full_mailbox_turns_its_viewer_stale_and_it_catches_up_at_once(redis_url):
    assert run_scenario(redis_url, "mailbox_overflow") == list(range(1, 22))


def test_a_lost_subscription_is_re_established_without_losing_events(redis_url):
    assert run_scenario(redis_url, "pubsub_reconnect") == list(range(1, 32))


def test_a_creator_subscribed_only_after_its_job_was_stored_misses_nothing(redis_url):
    # 2 events published before the subscription took effect (log), 1 after it, then [DONE].
    assert run_scenario(redis_url, "late_creator_subscription") == [1, 2, 3, 4]


def test_a_creator_whose_subscription_never_takes_effect_gets_a_503_and_its_job_ends(redis_url):
    assert run_scenario(redis_url, "creator_never_subscribed") == []


def test_a_job_created_on_one_gunicorn_is_watched_live_on_another(stack):
    web_a = stack.start_web()
    web_b = stack.start_web()
    stack.start_worker()
    body = chat_body("two instances", tokens=30, interval=0.03)
    job = requests.post(f"{web_a}/v1/jobs", json=body, timeout=5).json()
    received, _ = read_stream(job["events_url"].replace(web_a, web_b, 1))
    assert received.done and received.text == reply_text(body)
    assert received.ids == list(range(1, len(received.ids) + 1))


def connections(client: redis.Redis, db: int) -> int:
    return sum(1 for c in client.client_list() if int(c["db"]) == db and c["name"] != "probe")


def test_200_viewers_on_one_process_share_a_fixed_number_of_redis_connections(stack):
    # A small pool makes the bound visible: connections may not grow with viewers.
    base = stack.start_web(workers=1, env={"RELAY_REDIS_MAX_CONNECTIONS": "8"})
    # The upstream is silent for 5 s while the viewers connect: allow for it.
    stack.start_worker(env={"RELAY_UPSTREAM_READ_TIMEOUT": "15"})
    probe = stack.redis()
    probe.client_setname("probe")
    db = probe.connection_pool.connection_kwargs["db"]
    viewers = 200
    body = chat_body("fan-out", tokens=30, interval=0.02, first_delay=5)
    job = requests.post(f"{base}/v1/jobs", json=body, timeout=5).json()
    results: list = [None] * viewers
    barrier_seen: dict[str, int] = {}

    def watch(i: int) -> None:
        results[i] = read_stream(job["events_url"], timeout=60)[0]

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(viewers)]
    for t in threads:
        t.start()
    # While all 200 are attached, count the connections the web and worker processes hold.
    wait_for(
        lambda: requests.get(f"{base}/healthz", timeout=5).json()["viewers"] >= viewers,
        30,
        "200 attached viewers",
    )
    barrier_seen["during"] = connections(probe, db)
    for t in threads:
        t.join(60)
    expected = reply_text(body)
    assert all(r is not None and r.done and r.text == expected for r in results)
    ids = results[0].ids
    assert all(r.ids == ids for r in results)
    # gunicorn: one subscription + at most 8 pooled; the worker: claim, heartbeat, publish.
    assert barrier_seen["during"] <= 8 + 1 + 6, barrier_seen
