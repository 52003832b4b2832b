"""``python -m relay.apikeys create|list|revoke``: manage the relay's API keys.

Keys live in Redis as SHA-256 digests (:mod:`relay.core.apikeys`); a new key is printed once.
"""

from __future__ import annotations

import argparse
import json
import sys

from relay.core.apikeys import create, listing, revoke
from relay.core.connections import connect
from relay.core.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.apikeys", description=__doc__)
    parser.add_argument("--redis-url", help="default: RELAY_REDIS_URL")
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("create", help="create a key and print it (shown only once)")
    made.add_argument("--label", required=True)
    made.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    made.add_argument("--concurrency", type=int, default=0, help="running jobs (0: no limit)")
    commands.add_parser("list", help="list keys (ids and labels, never the keys)")
    gone = commands.add_parser("revoke", help="revoke a key by its id")
    gone.add_argument("id")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(**({"redis_url": args.redis_url} if args.redis_url else {}))
    except SettingsError as exc:
        parser.exit(2, f"python -m relay.apikeys: {exc}\n")
    redis = connect(settings.redis_url)
    if args.command == "create":
        print(create(redis, args.label, args.rpm, args.concurrency))
    elif args.command == "list":
        for record in listing(redis):
            print(json.dumps(record))
    else:
        count = revoke(redis, args.id)
        print(f"revoked {count} key(s)")
        return 0 if count else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
