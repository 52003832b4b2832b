"""``python -m worker``: run a chat-relay worker."""

from gevent import monkey

# Before anything imports socket or ssl: requests and redis must yield to other greenlets.
monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from relay import logs  # noqa: E402
from relay.config import from_env  # noqa: E402

from .main import Worker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    settings = from_env()
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=settings["WORKER_CONCURRENCY"],
        help="jobs run at once (default: RELAY_WORKER_CONCURRENCY or %(default)s)",
    )
    parser.add_argument("--redis-url", default=settings["REDIS_URL"])
    parser.add_argument("--upstream", default=settings["UPSTREAM_BASE_URL"], help="base URL")
    parser.add_argument(
        "--grace",
        type=float,
        default=settings["WORKER_GRACE_SECONDS"],
        help="seconds running jobs get to finish after SIGTERM; then unstarted ones are "
        "re-queued and the rest fail (default: RELAY_WORKER_GRACE_SECONDS or %(default)s)",
    )
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    args = parser.parse_args(argv)
    settings.update(
        WORKER_CONCURRENCY=args.concurrency,
        REDIS_URL=args.redis_url,
        UPSTREAM_BASE_URL=args.upstream,
        WORKER_GRACE_SECONDS=args.grace,
    )
    logs.configure(args.log_level, args.log_format)
    worker = Worker(settings, worker_id=args.worker_id)
    gevent.signal_handler(signal.SIGTERM, worker.request_stop)
    gevent.signal_handler(signal.SIGINT, worker.request_stop)
    worker.work()
    return 0


if __name__ == "__main__":
    sys.exit(main())
