"""``python -m relay.dev.demo [URL]``: wait for a relay, stream one reply, show where to look."""

from __future__ import annotations

import json
import sys
import time

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


def main(argv: list[str]) -> int:
    base = (argv[0] if argv else "http://127.0.0.1:8000").rstrip("/")
    wait_ready(base)
    prompt = "Say hello to a new chat-relay user."
    job = requests.post(
        f"{base}/v1/jobs", json={"messages": [{"role": "user", "content": prompt}]}, timeout=10
    ).json()
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
    print(
        f"""

The relay is up at {base}: open {base}/ for the chat page. Try:
  curl -N '{job["events_url"]}'    # replay the same stream from the start
  curl '{job["status_url"]}'       # its status and text
  # the live view to share (its token grants watching only): {job["watch_url"]}
  curl -N {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'
  python -c "import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='x'); \\
[print(k.choices[0].delta.content or '', end='') for k in c.chat.completions.create(\\
model='{model}', messages=[{{'role': 'user', 'content': 'Hi'}}], stream=True) if k.choices]"
""",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
