"""Every script and every multi-key command the relay sends stays in one cluster slot.

One Redis runs anything, so a script that mixes slots works there and fails on a cluster with
CROSSSLOT. Here the relay runs its features against one Redis under ``MONITOR``: every
``EVAL``/``EVALSHA``, ``MULTI`` ... ``EXEC`` block and multi-key command it sent is walked, and
the keys of each must hash to one slot. Every registered script must have been walked.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections import defaultdict

import pytest
import requests
from redis.crc import key_slot

from relay.core import apikeys, conversations, scripts
from relay.web import limits
from tests.conftest import Stack, wait_for
from tests.helpers import Monitor, chat_body, read_stream
from worker import slots

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Commands whose arguments after the name are all keys, or whose first two are.
ALL_KEYS = {"DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "WATCH", "SINTER", "SUNION", "SDIFF"}
TWO_KEYS = {"BLMOVE", "LMOVE", "RPOPLPUSH", "BRPOPLPUSH", "SMOVE", "RENAME", "COPY"}


def registered_scripts() -> dict[str, str]:
    """sha1 -> name of every Lua script the relay registers."""
    names = ("CREATE", "PUBLISH", "FINISH", "CLAIM", "VIEWERS", "RECOVER", "RELEASE_CLAIM",
             "ACQUIRE_SLOT")  # fmt: skip
    sources = {name: getattr(scripts, name) for name in names}
    sources |= {f"limits.{n}": getattr(limits, n) for n in ("_RATE", "_FAILURE")}
    sources |= {
        f"conversations.{n}": getattr(conversations, n) for n in ("_APPEND", "_HISTORY", "_REPLY")
    }
    sources |= {"slots._RENEW": slots._RENEW}
    return {hashlib.sha1(source.encode()).hexdigest(): name for name, source in sources.items()}


def groups(commands: list[tuple[str, list[bytes]]]) -> list[tuple[str, list[bytes]]]:
    """What must stay in one slot, each with its keys: scripts, transactions, multi-key
    commands."""
    found: list[tuple[str, list[bytes]]] = []
    open_multi: dict[str, list[bytes]] = {}
    for client, args in commands:
        name = args[0].upper().decode()
        if name == "MULTI":
            open_multi[client] = []
            continue
        if name in ("EXEC", "DISCARD"):
            found.append((f"MULTI/{name}", open_multi.pop(client, [])))
            continue
        if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO"):
            found.append((f"{name} {args[1][:12].decode()}", args[3 : 3 + int(args[2])]))
            command_keys = args[3 : 3 + int(args[2])]
        elif name in ALL_KEYS:
            command_keys = args[1:]
            found.append((name, command_keys))
        elif name in TWO_KEYS:
            command_keys = args[1:3]
            found.append((name, command_keys))
        else:
            command_keys = args[1:2]  # the first argument of most commands is their key
        if client in open_multi:
            open_multi[client] += command_keys
    return found


def test_every_script_and_multi_key_command_stays_in_one_slot(stack: Stack, tmp_path):
    stack.env["RELAY_AUTH_FAILURES_PER_MINUTE"] = "30"  # the guessing counter's script runs
    routes = tmp_path / "routes.toml"  # a capped upstream: its slot scripts run
    routes.write_text(f'[upstreams.sim]\nbase_url = "{stack.upstream}"\nmax_streams = 8\n'
                      '[[routes]]\nmodel = "*"\nupstreams = ["sim"]\n')  # fmt: skip
    stack.env["RELAY_UPSTREAMS_FILE"] = str(routes)
    redis = stack.redis()
    monitor = Monitor(stack.redis_url)
    try:
        exercise(stack, redis)
    finally:
        commands = monitor.stop()

    walked = groups(commands)
    crossing = [(what, sorted({key_slot(k) for k in ks}), ks) for what, ks in walked
                if len({key_slot(k) for k in ks}) > 1]  # fmt: skip
    assert not crossing, f"commands that span slots: {crossing}"
    shas = registered_scripts()
    ran = defaultdict(int)
    for _, args in commands:
        if args[0].upper() == b"EVALSHA" and args[1].decode() in shas:
            ran[shas[args[1].decode()]] += 1
        elif args[0].upper() == b"EVAL":
            ran[shas.get(hashlib.sha1(args[1]).hexdigest(), "unknown")] += 1
    assert set(ran) >= set(shas.values()), f"scripts never walked: {set(shas.values()) - set(ran)}"
    print(f"\nwalked {len(walked)} scripts and multi-key commands, {sum(ran.values())} script "
          f"calls of {len(ran)} scripts: every one in a single slot")  # fmt: skip


def exercise(stack: Stack, redis) -> None:
    """What the relay does with Redis: keys and limits, jobs with viewers, a conversation,
    cancel, a wrong key, a killed worker recovered by another, key deletion."""
    key = apikeys.create(redis, "walker", rpm=100, concurrency=4)
    auth = {"Authorization": f"Bearer {key}"}
    base = stack.start_web()
    doomed = stack.start_worker()

    job = requests.post(f"{base}/v1/jobs", json=chat_body("walk", tokens=5), headers=auth,
                        timeout=10).json()  # fmt: skip
    assert read_stream(job["events_url"])[0].done

    parent = None
    for prompt in ("one", "two"):  # a conversation: append, history, reply
        options = {"parentMessageId": parent} if parent else {}
        body = {"prompt": prompt, "options": options, "simulator": {"tokens": 2}}
        with requests.post(f"{base}/api/chat-process", json=body, headers=auth,
                           timeout=20) as answer:  # fmt: skip
            parent = json.loads(answer.content.split(b"\n")[-1])["id"]

    long = requests.post(f"{base}/v1/jobs", json=chat_body("cancel", tokens=400, interval=0.05),
                         headers=auth, timeout=10).json()  # fmt: skip
    read_stream(long["events_url"], max_events=2)
    assert requests.post(long["cancel_url"], headers=auth, timeout=5).ok

    wrong_key = {"Authorization": "Bearer sk-relay-wrong"}
    wrong = requests.post(f"{base}/v1/jobs", json=chat_body(), headers=wrong_key, timeout=10)
    assert wrong.status_code == 401

    unstarted = requests.post(
        f"{base}/v1/jobs", json=chat_body("rerun", tokens=2, first_delay=2), headers=auth,
        timeout=10,
    ).json()  # fmt: skip
    started = requests.post(f"{base}/v1/jobs", json=chat_body("lost", tokens=400, interval=0.05),
                            headers=auth, timeout=10).json()  # fmt: skip
    read_stream(started["events_url"], max_events=2)
    wait_for(lambda: requests.get(unstarted["status_url"], timeout=5).json()["status"]
             == "running", 10, "the first job claimed")  # fmt: skip
    doomed.signal(signal.SIGKILL)
    stack.start_worker()  # its janitor recovers the dead worker's claims
    assert read_stream(started["events_url"], timeout=30)[0].done
    assert read_stream(unstarted["events_url"], timeout=30)[0].done

    apikeys.delete(redis, apikeys.digest(key))


def test_the_walker_sees_a_script_or_transaction_that_spans_slots():
    commands = [
        ("c1", [b"EVALSHA", b"ab" * 20, b"2", b"relay:{job_a}:job", b"relay:{job_a}:events"]),
        ("c1", [b"EVALSHA", b"ab" * 20, b"2", b"relay:{job_a}:job", b"relay:{q}:pending", b"x"]),
        ("c2", [b"MULTI"]),
        ("c3", [b"GET", b"relay:{other}:key"]),  # another client's command is not in it
        ("c2", [b"HSET", b"relay:{job_a}:job", b"f", b"v"]),
        ("c2", [b"RPUSH", b"relay:{q}:pending", b"job_a"]),
        ("c2", [b"EXEC"]),
        ("c1", [b"BLMOVE", b"relay:{q}:pending", b"relay:{q}:worker:w:claimed", b"LEFT"]),
    ]
    spans = [len({key_slot(k) for k in ks}) for _, ks in groups(commands)]
    assert spans == [1, 2, 2, 1]
