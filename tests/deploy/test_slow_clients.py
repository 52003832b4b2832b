"""Slow clients cannot fill the web tier: with deploy/gunicorn.conf.py, a client that sends half
a request header holds a connection no longer than RELAY_CLIENT_TIMEOUT (gunicorn's keepalive,
which bounds the header read); nginx's keep-alive to the relay: tests/deploy/test_nginx.py."""

from __future__ import annotations

import contextlib
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_half_sent_headers_hold_a_connection_only_briefly(stack: Stack):
    base = stack.start_web(env={"RELAY_CLIENT_TIMEOUT": "2"}, worker_connections=20)
    host, port = urlsplit(base).hostname, urlsplit(base).port
    with contextlib.ExitStack() as held:
        for _ in range(30):  # more than the worker takes at once: every slot is held
            slow = held.enter_context(socket.create_connection((host, port)))
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        answer = requests.get(f"{base}/healthz", timeout=15)
        waited = time.monotonic() - started
    print(f"\n/healthz answered after {waited:.1f}s behind 30 half-sent requests")
    assert answer.ok and waited < 2 * 2 + 3  # gunicorn's 75 s keepalive made this time out
