"""Every Redis key and channel the relay uses, pinned to its literal name: renaming one would
strand what a running deployment already holds (rq pins its keys the same way)."""

from __future__ import annotations

import re

from relay.core import keys


def test_every_job_key_is_pinned_and_carries_the_job_id_as_a_hash_tag():
    assert keys.job("job_abc") == "relay:{job_abc}:job"
    assert keys.events("job_abc") == "relay:{job_abc}:events"
    assert keys.text("job_abc") == "relay:{job_abc}:text"
    assert keys.live("job_abc") == "relay:{job_abc}:live"
    assert keys.viewers("job_abc") == "relay:{job_abc}:viewers"
    assert keys.job_keys("job_abc") == [
        "relay:{job_abc}:job",
        "relay:{job_abc}:events",
        "relay:{job_abc}:text",
        "relay:{job_abc}:live",
    ]
    assert keys.end_keys("job_abc") == [*keys.job_keys("job_abc"), "relay:{job_abc}:viewers"]


def test_conversation_keys_are_pinned_and_carry_their_id_as_a_hash_tag():
    assert keys.conversation("c-1") == "relay:{c-1}:conversation"
    assert keys.message("m-1") == "relay:{m-1}:message"


def test_queue_and_worker_keys_are_pinned():
    assert keys.QUEUE_TAG == "{queue}"
    assert keys.PENDING == "relay:{queue}:pending"
    assert keys.WORKERS == "relay:{queue}:workers"
    assert keys.claimed("w1") == "relay:{queue}:worker:w1:claimed"  # BLMOVE: the queue's slot
    assert keys.heartbeat("w1") == "relay:{worker:w1}:heartbeat"
    assert keys.control("w1") == "relay:{worker:w1}:control"


def test_api_key_limit_and_metric_keys_are_pinned():
    assert keys.API_KEYS == "relay:apikeys"
    assert keys.api_key("ab12") == "relay:apikey:ab12"
    assert keys.rate("key:ab12") == "relay:{key:ab12}:rate"
    assert keys.active("key:ab12") == "relay:{key:ab12}:active"
    assert keys.failures("addr:10.0.0.1") == "relay:{addr:10.0.0.1}:failures"
    assert keys.blocked("addr:10.0.0.1") == "relay:{addr:10.0.0.1}:blocked"
    assert keys.METRICS == "relay:metrics"


def test_upstream_keys_are_pinned_and_carry_the_upstream_as_a_hash_tag():
    assert keys.upstream_streams("local") == "relay:{upstream:local}:streams"
    assert keys.upstream_models("local") == "relay:{upstream:local}:models"


def test_this_file_pins_every_key_the_schema_defines():
    """A key added to relay/core/keys.py without a line here fails this test."""
    public = {
        name
        for name in dir(keys)
        if not name.startswith("_") and name not in {"PREFIX", "annotations"}
    }
    with open(__file__) as source:
        pinned = set(re.findall(r"keys\.([A-Za-z_]+)", source.read()))
    assert public <= pinned, f"not pinned: {sorted(public - pinned)}"
