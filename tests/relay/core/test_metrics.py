"""/metrics counts each job's lifecycle, across processes (shared counters in Redis)."""

from __future__ import annotations

import fakeredis
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from relay.core import keys, metrics
from relay.dev.simulator import reply_pieces
from tests.conftest import wait_for
from tests.helpers import chat_body, create_job, read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def scrape(base: str) -> dict[str, float]:
    response = requests.get(f"{base}/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_count_a_jobs_lifecycle(stack):
    base = stack.start_web()
    before = scrape(base)
    assert before["relay_jobs_created_total"] == 0 and before["relay_jobs_queued"] == 0

    body = chat_body("counted", tokens=7, first_delay=1)
    job = create_job(base, body)
    queued = scrape(base)
    assert queued["relay_jobs_created_total"] == 1 and queued["relay_jobs_queued"] == 1

    stack.start_worker()
    wait_for(lambda: scrape(base)["relay_jobs_running"] == 1, 10, "the job to run")
    received, _ = read_stream(job["events_url"])
    assert received.done
    # The worker writes a job's counters after its first chunk and once it has ended.
    done = wait_for(lambda: (m := scrape(base))["relay_deltas_relayed_total"] and m, 5, "counts")
    assert done["relay_jobs_finished_total{outcome=completed}"] == 1
    assert done["relay_jobs_running"] == 0 and done["relay_workers"] == 1
    assert done["relay_deltas_relayed_total"] == len(reply_pieces(body))
    assert done["relay_enqueue_to_first_chunk_seconds_count"] == 1
    assert 1.0 <= done["relay_enqueue_to_first_chunk_seconds_sum"] < 10  # the 1 s first_delay
    assert done["relay_enqueue_to_first_chunk_seconds_bucket{le=0.5}"] == 0
    assert done["relay_enqueue_to_first_chunk_seconds_bucket{le=2.5}"] == 1

    failing = create_job(base, chat_body("fail", fail="status_500"))
    read_stream(failing["events_url"])
    slow = create_job(base, chat_body("slow", tokens=200, interval=0.05))
    with requests.get(slow["events_url"], stream=True, timeout=10) as viewer:
        next(viewer.iter_content(chunk_size=None))
        assert scrape(base)["relay_viewers"] == 1
        requests.post(slow["cancel_url"], timeout=5).raise_for_status()
    wait_for(lambda: scrape(base)["relay_viewers"] == 0, 5, "the viewer to be counted out")
    after = wait_for(
        lambda: (m := scrape(base))["relay_upstream_errors_total{code=upstream_http_500}"] and m,
        5,
        "the failed job's counters",
    )
    assert after["relay_jobs_created_total"] == 3
    assert after["relay_jobs_finished_total{outcome=failed}"] == 1
    assert after["relay_jobs_finished_total{outcome=cancelled}"] == 1
    assert after["relay_upstream_errors_total{code=upstream_http_500}"] == 1


def test_metrics_can_require_a_key(stack):
    base = stack.start_web(env={"RELAY_METRICS_KEY": "scrape-secret-1"})
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert requests.get(f"{base}/metrics", headers=headers, timeout=5).status_code == 401
    allowed = requests.get(
        f"{base}/metrics", headers={"Authorization": "Bearer scrape-secret-1"}, timeout=5
    )
    assert allowed.status_code == 200 and "relay_jobs_created_total" in allowed.text


def test_a_tally_writes_what_it_counted_in_one_round_trip_then_starts_afresh():
    redis = fakeredis.FakeRedis()
    tally = metrics.Tally()
    metrics.count(tally, "deltas", 3)
    metrics.count(tally, "deltas", 4)
    metrics.observe_first_chunk(tally, 0.03)
    metrics.observe_first_chunk(tally, 0.04)
    assert redis.hgetall(keys.METRICS) == {}  # nothing written until the flush
    tally.flush(redis)
    written = {k.decode(): v.decode() for k, v in redis.hgetall(keys.METRICS).items()}
    assert written["deltas"] == "7" and written["first_chunk_bucket:0.05"] == "2"
    assert abs(float(written["first_chunk_sum"]) - 0.07) < 1e-9
    tally.flush(redis)  # nothing new: nothing added twice
    assert redis.hget(keys.METRICS, "deltas") == b"7"
