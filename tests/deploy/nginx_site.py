"""Helpers for the tests of deploy/: the site config ``deploy/nginx.conf`` with the test's
ports and paths, run by nginx in a temporary prefix (pid, logs and temp files under a tmpdir)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
NGINX_SITE = DEPLOY / "nginx.conf"


def nginx_binary() -> str | None:
    """The nginx executable (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    """Substitute ``pattern`` exactly once: a config edit that moves it must fail the tests,
    not silently leave the production value in place."""
    new, count = re.subn(pattern, lambda m: m.expand(replacement), text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"deploy/nginx.conf: expected one match of {pattern!r}, got {count}")
    return new


def render_site(
    *, upstream: str, listen: str, static_root: Path, streaming: str = "proxy_buffering off;"
) -> str:
    """deploy/nginx.conf with the test's addresses and paths in place of the production ones.

    ``streaming`` replaces the streamed locations' ``proxy_buffering off;`` (directives that
    follow it there override the server's).
    """
    text = NGINX_SITE.read_text()
    text = _replace_once(text, r"^(\s*)server 127\.0\.0\.1:8000\b", rf"\1server {upstream}")
    text = _replace_once(text, r"^(\s*)listen 80;", rf"\1listen {listen};")
    text = _replace_once(
        text, r"^(\s*)alias /opt/chat-relay/relay/web/static/;", rf"\1alias {static_root}/;"
    )
    return _replace_once(text, r"^(\s*)proxy_buffering off;", rf"\1{streaming}")


def write_nginx_prefix(prefix: Path, site: str) -> Path:
    """A minimal main nginx.conf under ``prefix`` that includes ``site``; its path.

    Every file nginx writes (pid, logs, temp files) lives under ``prefix``. gzip is on for
    event streams too, as an eager operator might configure it, so that the site's own
    ``gzip off`` is what keeps streams flowing.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "logs").mkdir(exist_ok=True)
    site = site.replace("/var/log/nginx/chat-relay.access.log", f"{prefix}/logs/site.access.log")
    site = site.replace("/var/log/nginx/chat-relay.error.log", f"{prefix}/logs/site.error.log")
    (prefix / "site.conf").write_text(site)
    temp = {name: prefix / "temp" / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would otherwise run as "nobody" and could not read the tmpdir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = f"""{user}worker_processes 1;
error_log {prefix}/logs/error.log info;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    types {{
        text/html html;
        text/css css;
        application/javascript js;
        text/plain txt;
    }}
    default_type application/octet-stream;
    access_log {prefix}/logs/access.log;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    gzip on;
    gzip_min_length 1;
    gzip_types text/event-stream application/octet-stream application/json text/plain;
    include {prefix}/site.conf;
}}
"""
    conf = prefix / "nginx.conf"
    conf.write_text(main)
    return conf
