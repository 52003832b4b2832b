"""``python -m relay.dev.demo [URL]``: wait for a relay, stream one reply, show where to look."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import requests


def wait_ready(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the relay at {base} did not become ready within {timeout:g}s")
        time.sleep(0.2)


def demo_key(environ: Mapping[str, str] = os.environ) -> str:
    """The key the demo sends: the first of ``RELAY_API_KEYS``, if any."""
    return next((k.strip() for k in environ.get("RELAY_API_KEYS", "").split(",") if k.strip()), "")


def served_models(base: str, headers: Mapping[str, str]) -> list[str]:
    """What ``GET /v1/models`` lists ([] if it refuses). Asked before the demo's job, as the
    page and chat front ends ask first: the relay caches the list while the upstream is idle
    (a local model server answers nothing else while it writes a reply)."""
    try:
        answer = requests.get(f"{base}/v1/models", headers=headers, timeout=10)
        return [m["id"] for m in answer.json()["data"]] if answer.ok else []
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return []


def main(argv: list[str]) -> int:
    base = (argv[0] if argv else "http://127.0.0.1:8000").rstrip("/")
    wait_ready(base)
    prompt = "Say hello to a new chat-relay user."
    key = demo_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    models = served_models(base, headers)
    print(f"\nModels served (GET /v1/models): {', '.join(models) or 'none listed'}", flush=True)
    answer = requests.post(
        f"{base}/v1/jobs",
        json={"messages": [{"role": "user", "content": prompt}]},
        headers=headers,
        timeout=10,
    )
    if answer.status_code != 202:
        print(
            f"\nThe relay at {base} refused the demo's job ({answer.status_code}): {answer.text}"
            + (
                "\nIt needs an API key: set RELAY_API_KEYS (the demo sends the first one), or "
                "make one with `.venv/bin/python -m relay.apikeys create`."
                if answer.status_code == 401
                else ""
            ),
            flush=True,
        )
        return 1
    job = answer.json()
    print(f"\nJob {job['id']} queued; streaming {job['events_url']}\n\n> {prompt}\n", flush=True)
    with requests.get(job["events_url"], stream=True, timeout=(5, 120)) as response:
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                print(f"\n[error] {chunk['error']['message']}", flush=True)
                continue
            for choice in chunk.get("choices") or ():
                print((choice.get("delta") or {}).get("content") or "", end="", flush=True)
    model = requests.get(job["status_url"], timeout=10).json().get("model") or "gpt-4o-mini"
    auth = f" -H 'Authorization: Bearer {key}'" if key else ""
    sdk_key = key or "x"
    print(
        f"""

The relay is up at {base}: open {base}/ for the chat page. Try:
  curl -N '{job["events_url"]}'    # replay the same stream from the start
  curl '{job["status_url"]}'       # its status and text
  # the live view to share (its token grants watching only): {job["watch_url"]}
  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\
       -d '{{"stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'
  .venv/bin/python -c "import openai; c = openai.OpenAI(base_url='{base}/v1', \\
api_key='{sdk_key}'); [print(k.choices[0].delta.content or '', end='') for k in \\
c.chat.completions.create(model='{model}', stream=True, \\
messages=[{{'role': 'user', 'content': 'Hi'}}]) if k.choices]"
""",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
