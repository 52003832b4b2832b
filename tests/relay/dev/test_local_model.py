"""The routes file deploy/run.sh writes for its local model (the model itself, where it is
installed: tests/test_local_model.py)."""

from __future__ import annotations

import subprocess
import sys

from relay.core import routes
from relay.core.settings import Settings
from relay.dev.local_model import MODEL, routes_toml


def test_the_local_model_is_routed_one_stream_at_a_time(tmp_path):
    path = tmp_path / "routes.toml"
    path.write_text(
        subprocess.run(
            [sys.executable, "-m", "relay.dev.local_model", "routes", "--port", "8082"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
    )  # fmt: skip
    assert path.read_text() == routes_toml(8082)
    loaded = routes.load(Settings(upstreams_file=str(path)))
    [target] = loaded.targets(MODEL)
    assert target.upstream.chat_url == "http://127.0.0.1:8082/v1/chat/completions"
    # llama-cpp-python's server runs one completion at a time: a second job waits in the queue.
    assert target.upstream.max_streams == 1
    assert loaded.targets("gpt-4o") == []
