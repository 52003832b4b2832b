from relay.core import keys


def test_every_job_key_is_pinned_and_carries_the_job_id_as_a_hash_tag():
    assert keys.job("job_abc") == "relay:{job_abc}:job"
    assert keys.events("job_abc") == "relay:{job_abc}:events"
    assert keys.text("job_abc") == "relay:{job_abc}:text"
    assert keys.live("job_abc") == "relay:{job_abc}:live"
    assert keys.job_keys("job_abc") == [
        "relay:{job_abc}:job",
        "relay:{job_abc}:events",
        "relay:{job_abc}:text",
        "relay:{job_abc}:live",
    ]


def test_queue_and_worker_keys_are_pinned():
    assert keys.PENDING == "relay:queue:pending"
    assert keys.WORKERS == "relay:workers"
    assert keys.claimed("w1") == "relay:worker:w1:claimed"
    assert keys.heartbeat("w1") == "relay:worker:w1:heartbeat"
