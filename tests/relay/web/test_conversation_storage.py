"""What one request makes Redis hold, and what a follow-up reads (DESIGN.md, invariant 7).

Measured on the real stack: Redis's memory before and after a job, and its
``total_net_output_bytes`` (what Redis sent its clients) while the web tier prepares a follow-up.
The figures are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.helpers import read_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GROWTH_FACTOR = 3  # Redis may hold at most this many times the bytes sent (job + conversation)
SLACK = 64 * 1024  # allocator noise


def used_memory(redis) -> tuple[int, int]:
    """Redis's ``used_memory`` and its ``used_memory_dataset`` (without client buffers), once
    transient memory is gone: the Lua VM's garbage (counted as used in Redis 7.0 until the VM
    collects it) and the buffers big arguments were read into (which Redis's cron shrinks
    within seconds of a client going idle)."""
    deadline = time.monotonic() + 15
    previous = None
    while True:
        redis.eval("collectgarbage('collect') return 0", 0)
        memory = redis.info("memory")
        now = int(memory["used_memory"]), int(memory["used_memory_dataset"])
        if previous is not None and abs(now[0] - previous[0]) < 8192:
            return now
        if time.monotonic() > deadline:
            return now
        previous = now
        time.sleep(1)  # a sample of a trend, not a wait for an event


def sent_by_redis(redis) -> int:
    return int(redis.info("stats")["total_net_output_bytes"])


def post(base: str, body: dict) -> dict:
    response = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def test_storage_is_proportional_to_what_was_sent_and_a_follow_up_reads_its_budget(stack):
    base = stack.start_web()
    worker = stack.start_worker()
    redis = stack.redis()

    # A large system prompt and a few hundred one-word messages: ~250 kB.
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"w{i}"}
                for i in range(400)]  # fmt: skip
    messages[-1] = {"role": "user", "content": "last"}
    big = {"model": "simulator", "systemMessage": "You are careful. " * 14_000,
           "messages": messages, "simulator": {"tokens": 3}}  # fmt: skip
    sent = len(json.dumps(big))
    # The first big request also costs Redis a one-off ~0.5 MB (buffers its connections keep):
    # measure what two more add.
    assert read_stream(post(base, big)["events_url"])[0].done
    before = used_memory(redis)
    for _ in range(2):
        assert read_stream(post(base, big)["events_url"])[0].done
    after = used_memory(redis)
    growth, data = (after[0] - before[0]) / 2, (after[1] - before[1]) / 2
    print(
        f"\nsent {sent:,} B a request; Redis used_memory grew {growth:,.0f} B a request "
        f"({growth / sent:.2f}x), its data {data:,.0f} B ({data / sent:.2f}x)"
    )
    assert data <= GROWTH_FACTOR * sent + SLACK

    # A long conversation of small-system turns, then a follow-up with the default budget
    # (4,096 tokens less 1,000 for the reply): it must read about what goes upstream, not the
    # 200 kB stored. The worker is stopped so that only the web tier reads.
    paragraph = "The relay keeps every reply. " * 20  # ~600 B, ~120 tokens
    long = {"model": "simulator", "systemMessage": "Be brief.", "simulator": {"tokens": 2},
            "messages": [{"role": "user" if i % 2 == 0 else "assistant",
                          "content": f"{i} {paragraph}"} for i in range(331)]}  # fmt: skip
    first = post(base, long)
    assert read_stream(first["events_url"])[0].done
    worker.stop()
    follow = {"model": "simulator", "parentMessageId": first["messageId"], "prompt": "go on"}
    idle = sent_by_redis(redis)
    idle = sent_by_redis(redis) - idle  # the INFO reply itself
    start = sent_by_redis(redis)
    job = post(base, follow)
    read = sent_by_redis(redis) - start - idle
    stored = json.loads(redis.hget(f"relay:{{{job['id']}}}:job", "request"))
    upstream_bytes = len(json.dumps(stored["messages"]))
    conversation_bytes = len(json.dumps(long["messages"]))
    print(
        f"follow-up: Redis sent the web tier {read:,} B for a {upstream_bytes:,} B context "
        f"out of a {conversation_bytes:,} B conversation"
    )
    assert 3 < len(stored["messages"]) < 331
    assert read <= 1.5 * upstream_bytes + 8192
