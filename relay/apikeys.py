"""``python -m relay.apikeys create|list|revoke|delete``: manage the relay's API keys.

Keys live in Redis as SHA-256 digests (:mod:`relay.core.apikeys`); a new key is printed once.
"""

from __future__ import annotations

import argparse
import json
import sys

from redis.exceptions import RedisError

from relay.core.apikeys import configured, create, delete, listing, matching, revoke
from relay.core.connections import Client, connect
from relay.core.settings import Settings, SettingsError


def _positive(text: str) -> int:
    """A limit given on the command line: a whole number of at least 1 (omit it for none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (leave it out for no limit): {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.apikeys", description=__doc__)
    parser.add_argument("--redis-url", help="default: RELAY_REDIS_URL")
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("create", help="create a key and print it (shown only once)")
    made.add_argument("--label", required=True)
    made.add_argument("--rpm", type=_positive, help="requests per minute (default: no limit)")
    made.add_argument("--concurrency", type=_positive, help="jobs at once (default: no limit)")
    commands.add_parser("list", help="list keys (ids and labels, never the keys)")
    for verb, says in (("revoke", "revoke a key (it stays listed)"), ("delete", "delete a key")):
        chosen = commands.add_parser(verb, help=f"{says}, by its id from 'list'")
        chosen.add_argument("id")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(**({"redis_url": args.redis_url} if args.redis_url else {}))
    except SettingsError as exc:
        parser.exit(2, f"python -m relay.apikeys: {exc}\n")
    redis = connect(settings.redis_url, cluster=settings.redis_cluster)
    try:
        return _run(args, redis)
    except ValueError as exc:
        parser.exit(2, f"python -m relay.apikeys: {exc}\n")
    except RedisError as exc:
        parser.exit(1, f"python -m relay.apikeys: Redis at {settings.redis_url}: {exc}\n")


def _run(args: argparse.Namespace, redis: Client) -> int:
    if args.command == "create":
        print(create(redis, args.label, args.rpm or 0, args.concurrency or 0))
    elif args.command == "list":
        for record in listing(redis):
            record.pop("digest")
            print(json.dumps(record))
    elif args.command == "revoke":
        count = revoke(redis, args.id)
        print(f"revoked {count} key(s)" if count else f"no key with id {args.id}")
        return 0 if count else 1
    else:
        matched = matching(redis, args.id)
        for key_digest in matched:
            delete(redis, key_digest)
        print(f"deleted {len(matched)} key(s)" if matched else f"no key with id {args.id}")
        if matched and not configured(redis):
            print("no API key is left: creating jobs needs RELAY_OPEN_ACCESS=true or a new key")
        return 0 if matched else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
