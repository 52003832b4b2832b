"""Where Redis's time goes per job, script by script: ``python -m tests.bench.redis_time [JOBS]``.

Runs the first-chunk scenario of :mod:`tests.bench.first_ab` (one stack of the working tree,
jobs one at a time through ``POST /v1/chat/completions``, each read to ``[DONE]``) with Redis's
slow log recording every command (``slowlog-log-slower-than 0``), then prints, for each command
and each of the relay's Lua scripts (named from the modules that define them), how often it ran
per job, its median time in Redis and its total per job. Redis runs one command at a time, so
a script's time is time the next command on the first token's path (the worker's claim, the
viewer's event) may wait for. Times are Redis's own (the slow log's microseconds): the round
trips around them are the trace's (:mod:`tests.bench.trace`).
"""

from __future__ import annotations

import hashlib
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WARMUP = 50
# Modules whose string constants holding ``redis.call`` are the relay's Lua scripts.
SCRIPT_MODULES = ("relay.core.scripts", "relay.core.conversations", "relay.web.limits",
                  "worker.slots")  # fmt: skip


def known_scripts() -> dict[str, tuple[str, bytes]]:
    """The relay's scripts by SHA1 (as ``EVALSHA`` names them): ``(module.NAME, text)``."""
    import importlib

    found = {}
    for module_name in SCRIPT_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value and not name.startswith("__"):
                sha = hashlib.sha1(value.encode()).hexdigest()
                found.setdefault(sha, (f"{module_name.rsplit('.', 1)[1]}.{name}", value.encode()))
    return found


def command_name(args: list[bytes], scripts: dict[str, tuple[str, bytes]]) -> str:
    """What a slow log entry ran: a plain command's name, or ``EVAL``/``EVALSHA`` with the
    script's name (``?`` for a script the relay does not define)."""
    name = args[0].decode(errors="replace").upper() if args else "?"
    if name == "EVALSHA" and len(args) > 1:
        sha = args[1].decode(errors="replace").lower()
        return f"EVALSHA {scripts[sha][0] if sha in scripts else '?'}"
    if name == "EVAL" and len(args) > 1:
        # The slow log keeps a script's first 128 bytes; scripts that share a preamble match
        # alike, and are named together.
        head = args[1].split(b"... (", 1)[0]
        matches = sorted(n for n, text in scripts.values() if text.startswith(head))
        return f"EVAL {' | '.join(matches) or '?'}"
    return name


def summarise(
    entries: list[dict[str, Any]], jobs: int, scripts: dict[str, tuple[str, bytes]]
) -> list[str]:
    """One line per command or script a client sent: runs per job, median us, us per job; then
    the totals, and what the scripts' own commands took of their time."""
    durations: dict[str, list[int]] = defaultdict(list)
    inner = [int(e["duration"]) for e in entries if e.get("nested")]
    for entry in entries:
        if not entry.get("nested"):
            durations[command_name(entry.get("args") or [], scripts)].append(int(entry["duration"]))
    rows = sorted(durations.items(), key=lambda item: -sum(item[1]))
    lines = [f"{'command':34} {'per job':>8} {'median us':>10} {'us per job':>11}"]
    for name, times in rows:
        lines.append(f"{name:34} {len(times) / jobs:8.2f} {median(times):10.1f} "
                     f"{sum(times) / jobs:11.1f}")  # fmt: skip
    total = sum(sum(times) for times in durations.values()) / jobs
    lua = sum(sum(t) for n, t in durations.items() if n.startswith("EVAL")) / jobs
    ran = f"{sum(inner) / jobs:.1f} in the {len(inner) / jobs:.1f} commands they ran"
    lines.append(
        f"all commands: {total:.1f} us per job, {lua:.1f} of it in scripts, of which {ran}"
    )
    return lines


def slowlog_entries(redis: Any) -> list[dict[str, Any]]:
    """The slow log's entries, oldest first: each command's arguments, and whether a script ran
    it (its client is then Redis's own, ``?:0``; its time is in the script's too)."""
    raw = redis.execute_command("SLOWLOG", "GET", "-1")
    return [{"duration": item[2], "args": list(item[3]), "nested": item[4] == b"?:0"}
            for item in reversed(raw)]  # fmt: skip


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import tests.bench.first_ab as first_ab
    from tests.bench.run import first_chunk_body

    jobs = int(argv[0]) if argv else 300
    bench, base, _ = first_ab.start(ROOT, False)
    try:
        url = f"{base}/v1/chat/completions"
        body = first_chunk_body()
        for _ in range(WARMUP):
            first_ab.first_chunk(url, body)
        redis = bench.redis
        redis.config_set("slowlog-max-len", 200 * jobs + 1000)
        redis.config_set("slowlog-log-slower-than", 0)
        redis.slowlog_reset()
        for _ in range(jobs):
            first_ab.first_chunk(url, body)
        redis.config_set("slowlog-log-slower-than", -1)  # stops logging: SLOWLOG GET is not kept
        entries = [e for e in slowlog_entries(redis) if e["args"][:1] != [b"SLOWLOG"]]
        # The last job's end (its [DONE], the acknowledgement) may still be on its way; the
        # config and reset commands of this script are not the relay's.
        entries = [e for e in entries if e["args"][:1] != [b"CONFIG"]]
    finally:
        bench.stop()
    print(f"{jobs} jobs, each read to [DONE]; Redis's own time per command (slow log)")
    print("\n".join(summarise(entries, jobs, known_scripts())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
