"""The peer: flask-sse (PyPI) serving the simulator's chunks, as a user would set it up.

    gunicorn -k gevent -w 1 --worker-connections 10000 tests.bench.peer_flask_sse:app
    python -m tests.bench.peer_flask_sse publish REDIS_URL UPSTREAM_URL CHANNEL TOKENS INTERVAL

The app is flask-sse's own blueprint at ``/stream`` (``?channel=``), unchanged. The publisher
plays the relay's worker: it reads one streamed completion from the simulator and publishes
each chunk's JSON with ``sse.publish`` as it arrives, then ``[DONE]``. flask-sse has no replay
log, so viewers must be subscribed before the first chunk (the scenario waits for that).
"""

from __future__ import annotations

import json
import os
import sys

import requests
from flask import Flask
from flask_sse import sse


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["REDIS_URL"] = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")
    app.register_blueprint(sse, url_prefix="/stream")
    return app


app = create_app()


def publish(redis_url: str, upstream: str, channel: str, tokens: int, interval: float) -> int:
    """Relay one simulator stream into flask-sse's channel; the number of events published."""
    app.config["REDIS_URL"] = redis_url
    body = {
        "model": "simulator",
        "stream": True,
        "messages": [{"role": "user", "content": "bench"}],
        "simulator": {"tokens": tokens, "interval": interval, "timestamps": True},
    }
    published = 0
    with (
        app.app_context(),
        requests.post(
            f"{upstream}/chat/completions", json=body, stream=True, timeout=(5, 60)
        ) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                data = line[6:].decode()
                # flask-sse JSON-encodes what it is given; a string goes out as is.
                sse.publish(data, channel=channel)
                published += 1
                if data == "[DONE]":
                    break
    return published


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "publish":
        sys.exit(__doc__)
    _, _, url, upstream, channel, tokens, interval = sys.argv
    print(json.dumps({"published": publish(url, upstream, channel, int(tokens), float(interval))}))
