"""gunicorn settings for the relay's web tier: ``gunicorn -c deploy/gunicorn.conf.py``.

Each gevent worker process serves thousands of long-lived event streams on greenlets, with one
Redis subscription per process. Override any setting with an environment variable below or
with gunicorn's own command-line flags.
"""

import multiprocessing
import os
import sys

wsgi_app = "relay:create_app()"
bind = os.environ.get("RELAY_BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("RELAY_WEB_PROCESSES", multiprocessing.cpu_count()))
# Streams are long-lived connections: size for thousands per process, not dozens.
worker_connections = int(os.environ.get("RELAY_WORKER_CONNECTIONS", 10000))
# gevent workers heartbeat from their own greenlet; a stream never blocks it.
timeout = 30
# On SIGTERM, open streams end at once (post_worker_init below) and their viewers resume on
# another process with Last-Event-ID; other requests (a non-streamed completion) get this long.
graceful_timeout = int(os.environ.get("RELAY_GRACEFUL_TIMEOUT", 10))
# Seconds a client has to send its request's headers (gevent workers read them under this
# timeout), and that an idle keep-alive connection is kept: a client that sends half a header
# and stops holds one of worker_connections no longer than this. nginx closes its idle
# connections to the relay sooner (keepalive_timeout in deploy/nginx.conf), so it never
# reuses one that gunicorn is closing.
keepalive = int(os.environ.get("RELAY_CLIENT_TIMEOUT", 10))
# The worker heartbeat file in memory, not on a (possibly slow or container overlay) disk.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
accesslog = os.environ.get("RELAY_ACCESS_LOG", "-")
# The request path without its query string, and no referrer: ``?token=`` grants watching (or
# cancelling) a job, and access logs are read by more people than should see every job.
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("RELAY_LOG_LEVEL", "info")
# No control socket (gunicorn 25.1+; the relay does not use gunicornc): its default path,
# ~/.gunicorn/gunicorn.ctl, is shared by every gunicorn of a user, so two relays (or test stacks)
# on one host take it from each other, and it adds a thread to the master that is stopped and
# started again around every fork of a worker.
control_socket_disable = True


def on_starting(server):
    """Refuse to start with a bad ``RELAY_*`` setting or routes file, naming the problem. The
    routes read here are the ones every web process serves until a HUP (``routes.hold``)."""
    from relay.core import routes
    from relay.core.settings import Settings, SettingsError

    try:
        routes.hold(routes.read(Settings.from_env()))
    except (SettingsError, routes.RoutesError) as exc:
        server.log.error("bad setting: %s", exc)
        sys.exit(2)


def on_reload(server):
    """HUP: read the routes file again for the web processes about to replace the old ones. A
    file that has become bad keeps the last good routes: a process that failed to boot on it
    would stop gunicorn, old processes and their streams with it."""
    from relay.core import routes
    from relay.core.settings import Settings, SettingsError

    try:
        fresh = routes.read(Settings.from_env())
    except (SettingsError, routes.RoutesError) as exc:
        server.log.error("routes not reloaded, the web processes keep the last good ones: %s", exc)
        return
    routes.hold(fresh)
    if fresh.from_file:
        server.log.info("routes reloaded: %s", fresh.describe())


def post_fork(server, worker):
    """The app's own log lines as JSON with the job id (gunicorn keeps its own format)."""
    from relay.core import logs

    logs.configure(loglevel, os.environ.get("RELAY_LOG_FORMAT", "json"))


def post_worker_init(worker):
    """On SIGTERM, end open streams at once instead of holding them to ``graceful_timeout``;
    load the token counter's encoding before the first request (0.2 s that request would spend
    on the event loop); and say once, at start, whether creating jobs needs an API key (or the
    relay runs open).

    Nothing here runs in the master: redis imported there (it keeps a reference to ssl's
    SSLContext) would make each gevent worker warn that ssl was patched too late.
    """
    from relay.core import tokens
    from relay.core.settings import Settings
    from relay.web.app import end_streams_on_sigterm
    from relay.web.auth import key_mode_at_start

    if hasattr(worker.wsgi, "extensions"):  # the relay's Flask app (not a wrapped one)
        end_streams_on_sigterm(worker.wsgi)
    tokens.load()
    if worker.age == 1:  # the first worker of this start, not each one nor each restart
        open_mode, message = key_mode_at_start(Settings.from_env())
        (worker.log.warning if open_mode else worker.log.info)(message)
