"""``python -m worker``: run a chat-relay worker."""

from gevent import monkey

# Before anything imports socket or ssl: requests and redis must yield to other greenlets.
monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from relay.core import logs, routes  # noqa: E402
from relay.core.settings import Settings, SettingsError  # noqa: E402

from .main import Worker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument(
        "--concurrency", type=int, help="jobs run at once (default: RELAY_WORKER_CONCURRENCY)"
    )
    parser.add_argument("--redis-url", help="default: RELAY_REDIS_URL")
    parser.add_argument("--upstream", help="base URL (default: RELAY_UPSTREAM_BASE_URL)")
    parser.add_argument(
        "--grace",
        type=float,
        help="seconds running jobs get to finish after SIGTERM; then unstarted ones are "
        "re-queued and the rest fail (default: RELAY_WORKER_GRACE_SECONDS)",
    )
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    args = parser.parse_args(argv)
    given = {
        "worker_concurrency": args.concurrency,
        "redis_url": args.redis_url,
        "upstream_base_url": args.upstream,
        "worker_grace_seconds": args.grace,
    }
    try:
        settings = Settings.from_env(**{k: v for k, v in given.items() if v is not None})
        # A bad routes file stops the worker here, naming the problem; a good one is read once.
        routes.hold(routes.read(settings))
    except (SettingsError, routes.RoutesError) as exc:
        parser.exit(2, f"python -m worker: {exc}\n")
    logs.configure(args.log_level, args.log_format)
    worker = Worker(settings, worker_id=args.worker_id)
    gevent.signal_handler(signal.SIGTERM, worker.request_stop)
    gevent.signal_handler(signal.SIGINT, worker.request_stop)
    gevent.signal_handler(signal.SIGHUP, worker.reload_routes)
    worker.work()
    return 0


if __name__ == "__main__":
    sys.exit(main())
