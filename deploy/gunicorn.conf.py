"""gunicorn settings for the relay's web tier: ``gunicorn -c deploy/gunicorn.conf.py``.

Each gevent worker process serves thousands of long-lived event streams on greenlets, with one
Redis subscription per process. Override any setting with an environment variable below or
with gunicorn's own command-line flags.
"""

import multiprocessing
import os

wsgi_app = "relay:create_app()"
bind = os.environ.get("RELAY_BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("RELAY_WEB_PROCESSES", multiprocessing.cpu_count()))
# Streams are long-lived connections: size for thousands per process, not dozens.
worker_connections = int(os.environ.get("RELAY_WORKER_CONNECTIONS", 10000))
# gevent workers heartbeat from their own greenlet; a stream never blocks it.
timeout = 30
# On SIGTERM, open streams get this long to end before the process exits; viewers reconnect
# with Last-Event-ID and resume on another process.
graceful_timeout = int(os.environ.get("RELAY_GRACEFUL_TIMEOUT", 10))
keepalive = 75
# The worker heartbeat file in memory, not on a (possibly slow or container overlay) disk.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
accesslog = os.environ.get("RELAY_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("RELAY_LOG_LEVEL", "info")


def post_fork(server, worker):
    """The app's own log lines as JSON with the job id (gunicorn keeps its own format)."""
    from relay import logs

    logs.configure(loglevel, os.environ.get("RELAY_LOG_FORMAT", "json"))
