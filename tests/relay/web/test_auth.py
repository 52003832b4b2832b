"""Checking the caller's API key: what it costs a request in round trips to Redis."""

from __future__ import annotations

import pytest
from redis.connection import AbstractConnection

from relay.core.settings import Settings
from relay.web.app import create_app
from tests.helpers import chat_body

KEY = "auth-test-key"


@pytest.mark.timeout(30)
def test_a_keyed_post_reads_its_key_with_its_addresss_block_in_one_round_trip(
    redis_url, monkeypatch
):
    """Every ``POST`` of a relay with keys checks the client's address for a block (failed
    guesses) and looks its key up: one round trip for both, before the job's own; and the
    address is not read again in the same request (a parent message id is a credential too)."""
    app = create_app(Settings(redis_url=redis_url, api_keys=(KEY,), auth_failures_per_minute=5))
    writes: list[bytes] = []
    send = AbstractConnection.send_packed_command

    def recorded(self, command, check_health=True):
        writes.append(b"".join(command) if isinstance(command, list) else bytes(command))
        return send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", recorded)
    headers = {"Authorization": f"Bearer {KEY}"}
    with app.test_client() as client:
        warm_up = client.post("/v1/jobs", json=chat_body("warm up"), headers=headers)
        assert warm_up.status_code == 202
        writes.clear()
        created = client.post("/v1/jobs", json=chat_body("second"), headers=headers)
        assert created.status_code == 202
        reads = [w for w in writes if b"PTTL" in w]
        assert len(reads) == 1 and b"HGETALL" in reads[0], writes
        writes.clear()
        guessed = {**chat_body("follow-up"), "parentMessageId": "a-guessed-id"}
        assert client.post("/v1/jobs", json=guessed, headers=headers).status_code == 404
        assert len([w for w in writes if b"PTTL" in w]) == 1, writes
        # Unknown keys are refused as before, from the same round trip.
        wrong = client.post("/v1/jobs", json=chat_body("x"), headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        assert wrong.json["error"]["type"] == "invalid_request_error"
