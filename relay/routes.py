"""``python -m relay.routes check [FILE]``: check a routes file before the relay reads it.

Reads the file as gunicorn and the workers would (``RELAY_UPSTREAMS_FILE`` when no file is
given; upstream keys from this environment), then prints its upstreams and routes, or what is
wrong and where. The systemd units run it before they send HUP, so ``systemctl reload``
fails on a bad file (a running relay refuses one too, but says so only in its log).
"""

from __future__ import annotations

import argparse
import sys

from relay.core import routes
from relay.core.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.routes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="read a routes file and say what it routes")
    check.add_argument("file", nargs="?", help="default: RELAY_UPSTREAMS_FILE")
    check.add_argument(
        "--if-set",
        action="store_true",
        help="with no file named or set, say so and succeed (a relay of one upstream reloads)",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(**({"upstreams_file": args.file} if args.file else {}))
    except SettingsError as exc:
        parser.exit(2, f"python -m relay.routes: {exc}\n")
    if not settings.upstreams_file:
        if args.if_set:
            print("no routes file (RELAY_UPSTREAMS_FILE is not set): nothing to check")
            return 0
        parser.exit(2, "python -m relay.routes: name a file, or set RELAY_UPSTREAMS_FILE\n")
    try:
        table = routes.read(settings)
    except routes.RoutesError as exc:
        parser.exit(1, f"{exc}\n")
    print(f"{settings.upstreams_file}: {table.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
