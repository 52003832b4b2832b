"""The relay on a real Redis Cluster (three masters, three replicas; tests/cluster.py): the core
scenarios that one Redis runs everywhere else, jobs spread over every master, and a master
killed mid-stream. Run with ``-s`` for the failover's figures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import requests

from relay.core import apikeys, keys
from relay.core.connections import Router, connect
from relay.core.jobs import JobStore, new_job_id
from relay.dev.simulator import reply_text
from tests.conftest import ROOT, Stack, wait_for
from tests.helpers import chat_body, create_job, read_stream, sdk_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def status_of(job: dict) -> dict:
    return requests.get(job["status_url"], timeout=5).json()


def jobs_on_every_master(
    base: str, cluster, body_for, each: int, most: int = 40
) -> list[dict]:  # fmt: skip
    """Jobs made until every master owns at least ``each`` of them (job ids hash to slots at
    random: nine jobs miss one of three masters about one time in thirteen)."""
    jobs: list[dict] = []
    per_master: dict[int, int] = {}
    while len(per_master) < 3 or min(per_master.values()) < each:
        assert len(jobs) < most, f"{most} jobs did not cover every master: {per_master}"
        job = create_job(base, body_for(len(jobs)))
        jobs.append(job)
        port = cluster.master_of(keys.job(job["id"])).port
        per_master[port] = per_master.get(port, 0) + 1
    return jobs


def test_jobs_spread_over_every_master_and_viewers_join_late_and_resume(
    cluster_stack: Stack, redis_cluster
):
    web_a, web_b = cluster_stack.start_web(), cluster_stack.start_web()
    cluster_stack.start_worker()
    jobs = jobs_on_every_master(
        web_a, redis_cluster, lambda i: chat_body(f"spread {i}", tokens=30, interval=0.02), 2
    )
    masters = {redis_cluster.master_of(keys.job(job["id"])).port for job in jobs}
    assert len(masters) == 3, f"jobs landed on {len(masters)} masters"
    results: dict[tuple[int, str], object] = {}

    def watch(i: int, job: dict, how: str) -> None:
        url = job["events_url"] if how != "other" else job["events_url"].replace(web_a, web_b)
        if how == "resume":
            first, _ = read_stream(url, max_events=4)
            rest, _ = read_stream(url, headers={"Last-Event-ID": str(first.ids[-1])})
            results[(i, how)] = (first.ids + rest.ids, first.data + rest.data)
        else:
            if how == "late":
                time.sleep(0.3)  # a viewer that arrives after the stream began
            received, _ = read_stream(url)
            results[(i, how)] = (received.ids, received.data)

    ways = ("early", "late", "resume", "other")
    threads = [threading.Thread(target=watch, args=(i, job, how))
               for i, job in enumerate(jobs) for how in ways]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i in range(len(jobs)):
        expected = reply_text(chat_body(f"spread {i}", tokens=30))
        views = [results[(i, how)] for how in ways]
        ids, data = views[0]
        assert ids == list(range(1, len(ids) + 1)) and data[-1] == "[DONE]"
        assert all(view == views[0] for view in views), f"job {i}: viewers saw different streams"
        text = "".join(
            (c.get("delta") or {}).get("content") or ""
            for d in data[:-1] for c in json.loads(d)["choices"]
        )  # fmt: skip
        assert text == expected


def test_sdk_chatgpt_web_a_conversation_and_cancel(cluster_stack: Stack):
    base = cluster_stack.start_web()
    cluster_stack.start_worker()
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="simulator", stream=True, messages=[{"role": "user", "content": "sdk"}],
        extra_body={"simulator": {"tokens": 8}},
    )  # fmt: skip
    text, reasons = sdk_text(stream)
    assert text == reply_text({"simulator": {"tokens": 8}}) and reasons == ["stop"]

    parent, prompts = None, ["one", "two", "three"]
    for prompt in prompts:  # chatgpt-web's endpoint, a three-turn conversation
        options = {"parentMessageId": parent} if parent else {}
        body = {"prompt": prompt, "options": options, "simulator": {"tokens": 2}}
        with requests.post(f"{base}/api/chat-process", json=body, timeout=20) as answer:
            final = json.loads(answer.content.split(b"\n")[-1])
        parent = final["id"]
    sim = cluster_stack.upstream.removesuffix("/v1")
    sent = next(r for r in reversed(requests.get(f"{sim}/_sim/requests", timeout=5).json())
                if r["messages"][-1]["content"] == "three")  # fmt: skip
    reply = reply_text({"simulator": {"tokens": 2}})
    assert [m["content"] for m in sent["messages"]] == ["one", reply, "two", reply, "three"]

    job = create_job(base, chat_body("stop me", tokens=400, interval=0.05))
    read_stream(job["events_url"], max_events=3)
    cancelled = requests.post(job["cancel_url"], timeout=5).json()
    assert cancelled["status"] == "cancelled"
    received, _ = read_stream(job["events_url"])
    assert received.done and received.finish_reasons == ["cancelled"]


def test_rate_limits_hold_across_two_processes(cluster_stack: Stack):
    web_a, web_b = cluster_stack.start_web(), cluster_stack.start_web()
    limit = 6
    key = apikeys.create(cluster_stack.redis(), "limited", rpm=limit)
    headers = {"Authorization": f"Bearer {key}"}
    statuses = [
        requests.post(f"{(web_a, web_b)[n % 2]}/v1/jobs", json=chat_body(), headers=headers,
                      timeout=5).status_code
        for n in range(limit + 1)
    ]  # fmt: skip
    assert statuses == [202] * limit + [429]


def test_a_killed_worker_is_recovered_by_another(cluster_stack: Stack):
    base = cluster_stack.start_web()
    doomed = cluster_stack.start_worker()
    unstarted = create_job(base, chat_body("rerun", tokens=4, first_delay=2))
    started = create_job(base, chat_body("lost", tokens=400, interval=0.05))
    read_stream(started["events_url"], max_events=3)
    wait_for(lambda: status_of(unstarted)["status"] == "running", 10, "the first job claimed")
    doomed.signal(signal.SIGKILL)
    cluster_stack.start_worker()
    rerun, _ = read_stream(unstarted["events_url"], timeout=30)
    assert rerun.done and not rerun.errors and status_of(unstarted)["attempts"] >= 2
    lost, _ = read_stream(started["events_url"], timeout=30)
    assert lost.done and lost.errors[-1]["code"] == "worker_lost"


def test_a_master_killed_mid_stream_fails_over_and_nobody_hangs(
    cluster_stack: Stack, redis_cluster
):
    base = cluster_stack.start_web()
    cluster_stack.start_worker()
    jobs = jobs_on_every_master(
        base, redis_cluster, lambda i: chat_body(f"failover {i}", tokens=150, interval=0.03), 2
    )
    owner = {job["id"]: redis_cluster.master_of(keys.job(job["id"])).port for job in jobs}
    assert len(set(owner.values())) == 3
    seen: dict[str, object] = {}

    def watch(job: dict) -> None:
        received, _ = read_stream(job["events_url"], timeout=60)
        seen[job["id"]] = (received, time.monotonic())

    threads = [threading.Thread(target=watch, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # mid-stream: every job has sent part of its reply
    victim = next(n for n in redis_cluster.nodes if n.port == owner[jobs[0]["id"]])
    victim.kill()
    killed_at = time.monotonic()
    try:
        _check_failover(cluster_stack, redis_cluster, base, jobs, owner, seen, threads, victim,
                        killed_at)  # fmt: skip
    finally:
        victim.restart()  # it rejoins as a replica; later tests get a whole cluster again
        redis_cluster.wait_healthy(30, replicated=True)


def _check_failover(cluster_stack, redis_cluster, base, jobs, owner, seen, threads, victim,
                    killed_at) -> None:  # fmt: skip
    for thread in threads:
        thread.join(60)
    print(f"\nkilled master :{victim.port} at t=0")
    for job in jobs:
        received, at = seen[job["id"]]  # type: ignore[misc]
        on_victim = owner[job["id"]] == victim.port
        ids = received.ids
        assert received.done, f"{job['id']} hung"
        assert ids == list(range(ids[0], ids[0] + len(ids))), "ids repeat or skip"
        errors = [e["code"] for e in received.errors]
        print(f"  {'failed shard' if on_victim else 'other shard '} job: {len(ids)} events, "
              f"errors {errors or 'none'}, ended at t={at - killed_at:+.1f}s")  # fmt: skip
        if not on_victim:
            assert not errors and received.text == reply_text(chat_body("", tokens=150))
    # New jobs succeed once a replica took over, on every shard, with no process restarted.
    redis_cluster.wait_healthy(30)
    recovered_at = time.monotonic()
    fresh = [create_job(base, chat_body(f"after {i}", tokens=3)) for i in range(6)]
    for job in fresh:
        received, _ = read_stream(job["events_url"], timeout=30)
        assert received.done and not received.errors
    print(
        f"  cluster healthy again at t={recovered_at - killed_at:+.1f}s; "
        f"new jobs complete on all shards"
    )
    assert all(proc.alive() for proc in cluster_stack.procs)


def test_the_api_key_cli_runs_on_the_cluster(cluster_stack: Stack, redis_cluster):
    made = subprocess.run(
        [sys.executable, "-m", "relay.apikeys", "create", "--label", "cluster"], cwd=ROOT,
        env={**cluster_stack.settings(), "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert apikeys.authenticate(cluster_stack.redis(), f"Bearer {made.stdout.strip()}")


def test_the_store_sees_a_creators_subscription_on_its_jobs_node(redis_cluster):
    """A creator's stream subscribes on the node of its job's slot, as the hub does; the job's
    CREATE, run there, sees it (so the stream reads no log), and sees none for another job."""
    client = connect(redis_cluster.url, cluster=True)
    store = JobStore(client, retention=60, max_age=600)
    watched, unwatched = new_job_id(), new_job_id()
    router = Router(client)
    node = router.node_client(router.node(keys.live(watched)))
    subscription = node.pubsub()
    subscription.ssubscribe(keys.live(watched))
    assert subscription.get_message(timeout=5)["type"] == "ssubscribe"
    seen: list[bool] = []
    try:
        for job_id in (watched, unwatched):
            store.create({"model": "m", "messages": []}, job_id=job_id, subscribed=seen.append)
    finally:
        subscription.close()
    assert seen == [True, False]
