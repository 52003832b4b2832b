"""The deployment files agree with the project and with each other (fast, no processes besides
``nginx -t`` and ``systemd-analyze verify`` when those are installed): compose.yaml, the
container build file, the systemd units and deploy/nginx.conf.

No Docker engine runs here, so compose.yaml and the Containerfile are checked statically.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay.core.settings import Settings
from tests.conftest import free_port
from tests.deploy.nginx_site import (
    DEPLOY,
    NGINX_SITE,
    ROOT,
    nginx_binary,
    render_site,
    write_nginx_prefix,
)

pytestmark = pytest.mark.timeout(30)

COMPOSE = DEPLOY / "compose.yaml"
UNITS = DEPLOY / "systemd"
IMAGE_ROOT = "/opt/chat-relay"  # where the Containerfile and the units put the project


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def default(value: object) -> str:
    """A compose value as it is without the variable set: ``${NAME:-45s}`` is ``45s``."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def seconds(value: str | int) -> float:
    """A compose duration (``45s``, ``1m30s``) or a systemd time span in seconds."""
    if isinstance(value, int):
        return value
    value = default(value)
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?", str(value)):
        total += float(amount) * {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}[unit]
    return total


def in_repo(image_path: str) -> Path:
    """The repository file that a path inside the image (or under /opt/chat-relay) is."""
    assert image_path.startswith(IMAGE_ROOT + "/"), image_path
    return ROOT / image_path.removeprefix(IMAGE_ROOT + "/")


def gunicorn_setting(name: str) -> object:
    """A module-level setting of deploy/gunicorn.conf.py, read without running it: the literal
    value, or the default of an ``os.environ.get(VAR, default)``."""
    tree = ast.parse((DEPLOY / "gunicorn.conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            for inner in ast.walk(node.value):
                if isinstance(inner, ast.Call) and getattr(inner.func, "attr", "") == "get":
                    return ast.literal_eval(inner.args[1])
            return ast.literal_eval(node.value)
    raise AssertionError(f"deploy/gunicorn.conf.py sets no {name}")


def grace_of(worker_cmd: list[str], environment: dict | None = None) -> float:
    """The worker's grace: a --grace on its command line, else RELAY_WORKER_GRACE_SECONDS in
    its environment, else the setting's default."""
    if "--grace" in worker_cmd:
        return float(worker_cmd[worker_cmd.index("--grace") + 1])
    if environment and "RELAY_WORKER_GRACE_SECONDS" in environment:
        return float(default(environment["RELAY_WORKER_GRACE_SECONDS"]))
    return Settings().worker_grace_seconds


# --- compose.yaml -----------------------------------------------------------------------------


def test_compose_defines_the_four_services(compose: dict) -> None:
    assert {"redis", "web", "worker", "nginx"} <= set(compose["services"])


def test_redis_persists_with_aof_on_a_volume(compose: dict) -> None:
    redis = compose["services"]["redis"]
    cmd = command(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data"  # the image's working directory, where the AOF files go
    assert volume in compose["volumes"]  # a named volume: survives `docker compose down`


def test_web_runs_gunicorn_with_the_production_config(compose: dict) -> None:
    web = compose["services"]["web"]
    cmd = command(web)
    assert cmd[0] == "gunicorn"
    config = cmd[cmd.index("-c") + 1]
    assert in_repo(config) == DEPLOY / "gunicorn.conf.py"
    # The config names the app itself, as the tests' gunicorn does on its command line.
    assert gunicorn_setting("wsgi_app") == "relay:create_app()"
    assert gunicorn_setting("worker_class") == "gevent"
    # nginx reaches gunicorn on the port the config binds to, on all interfaces.
    assert web["environment"]["RELAY_BIND"] == "0.0.0.0:8000"
    assert web["environment"]["RELAY_REDIS_URL"].startswith("redis://redis:")
    graceful = float(web["environment"].get("RELAY_GRACEFUL_TIMEOUT", 0)) or float(
        gunicorn_setting("graceful_timeout")  # type: ignore[arg-type]
    )
    assert seconds(web["stop_grace_period"]) > graceful


def test_worker_runs_python_m_worker(compose: dict) -> None:
    worker = compose["services"]["worker"]
    cmd = command(worker)
    assert cmd[:3] == ["python", "-m", "worker"]
    assert (ROOT / "worker" / "__main__.py").exists()
    assert (
        worker["environment"]["RELAY_REDIS_URL"]
        == compose["services"]["web"]["environment"]["RELAY_REDIS_URL"]
    )
    # Docker's default 10 s would SIGKILL running jobs in the middle of their grace period.
    assert seconds(worker["stop_grace_period"]) > grace_of(cmd, worker["environment"])
    # The grace comes from the environment (the .env file), not a fixed --grace.
    assert "--grace" not in cmd and "RELAY_WORKER_GRACE_SECONDS" in worker["environment"]


def test_web_and_worker_are_built_from_the_container_file(compose: dict) -> None:
    for name in ("web", "worker"):
        build = compose["services"][name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).exists()


def test_nginx_service_runs_deploy_nginx_conf(compose: dict) -> None:
    nginx = compose["services"]["nginx"]
    mounts = dict(volume.split(":")[:2] for volume in nginx["volumes"])
    mounted = {(DEPLOY / source).resolve(): target for source, target in mounts.items()}
    site_in_container = mounted[NGINX_SITE]
    script = " ".join(command(nginx))
    # The start-up script rewrites the upstream to the web service: the line it rewrites must
    # be in deploy/nginx.conf exactly once, or the container would proxy to itself.
    rewrite = re.search(r"sed 's/([^/]+)/([^/]+)/' (\S+) > (\S+)", script)
    assert rewrite, script
    old, new, source, target = rewrite.groups()
    assert source == site_in_container
    assert target.startswith("/etc/nginx/conf.d/")
    assert site_config().count(old) == 1
    assert new == "server web:8000"
    assert "exec nginx -g 'daemon off;'" in script
    # The static files nginx serves are mounted where deploy/nginx.conf's alias points.
    alias = re.search(r"^\s*alias (\S+);", site_config(), re.MULTILINE)
    assert alias
    assert mounted[ROOT / "relay" / "web" / "static"].rstrip("/") == alias.group(1).rstrip("/")
    assert in_repo(alias.group(1).rstrip("/")) == ROOT / "relay" / "web" / "static"


def test_container_file_installs_the_project_as_non_root(compose: dict) -> None:
    build = compose["services"]["web"]["build"]
    text = (DEPLOY / build["context"] / build["dockerfile"]).read_text()
    instructions = [
        line.split(None, 1)
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    copies = [args.split() for op, args in instructions if op == "COPY"]
    copied = {src: dest for *sources, dest in copies for src in sources}
    for needed in ("pyproject.toml", "relay", "worker"):
        assert needed in copied, needed
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), runs
    # The web command's config file is where the image puts deploy/gunicorn.conf.py.
    config = command(compose["services"]["web"])[2]
    workdir = next(args for op, args in instructions if op == "WORKDIR")
    assert config == f"{workdir}/{copied['deploy/gunicorn.conf.py'].removeprefix('./')}"
    user = [args for op, args in instructions if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    # The image's default command is the web tier, with the same config.
    cmd = next(args for op, args in instructions if op == "CMD")
    assert cmd.startswith('["gunicorn", "-c", "/opt/chat-relay/deploy/gunicorn.conf.py"')


# --- systemd units ----------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def reload_commands(name: str) -> list[list[str]]:
    """A unit's ``ExecReload=`` lines in order (systemd runs them in turn and stops at a failure);
    configparser would keep only the last."""
    lines = (UNITS / name).read_text().splitlines()
    return [shlex.split(line.split("=", 1)[1]) for line in lines if line.startswith("ExecReload=")]


@pytest.mark.parametrize("name", ["chat-relay-web.service", "chat-relay-worker.service"])
def test_units_share_settings_restart_and_hardening(name: str) -> None:
    service = unit(name)["Service"]
    assert service["EnvironmentFile"] == "/etc/chat-relay/env"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] in ("on-failure", "always")
    assert service["User"] not in ("root", "0")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert int(service["LimitNOFILE"]) >= 65536
    assert unit(name)["Install"]["WantedBy"] == "multi-user.target"
    # `systemctl reload` checks the routes file (the test below), then has it read again
    # (tests/worker/test_routing.py).
    assert reload_commands(name)[-1] == ["/bin/kill", "-s", "HUP", "$MAINPID"]


@pytest.mark.parametrize("name", ["chat-relay-web.service", "chat-relay-worker.service"])
def test_reload_checks_the_routes_file_before_its_hup(name: str, tmp_path: Path) -> None:
    """The first ``ExecReload=`` fails on a broken routes file, so systemd sends no HUP and
    ``systemctl reload`` says why; a good file, or none (one upstream), passes."""
    *checks, _hup = reload_commands(name)
    assert len(checks) == 1
    check = checks[0]
    assert in_repo(check[0]) == ROOT / ".venv/bin/python"
    argv = [sys.executable, *check[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}

    def run(**relay: str) -> subprocess.CompletedProcess[str]:
        # The unit's WorkingDirectory is the checkout; its EnvironmentFile gives RELAY_*.
        return subprocess.run(
            argv, cwd=ROOT, env={**env, **relay}, capture_output=True, text=True, timeout=20
        )

    one_upstream = run(RELAY_UPSTREAM_BASE_URL="http://127.0.0.1:9/v1")
    assert one_upstream.returncode == 0, one_upstream.stderr
    assert "nothing to check" in one_upstream.stdout
    routes_file = tmp_path / "routes.toml"
    routes_file.write_text(
        '[upstreams.local]\nbase_url = "http://127.0.0.1:9/v1"\n\n'
        '[[routes]]\nmodel = "small"\nupstreams = ["local"]\n'
    )
    good = run(RELAY_UPSTREAMS_FILE=str(routes_file))
    assert good.returncode == 0, good.stderr
    assert "routes small -> local" in good.stdout
    routes_file.write_text(routes_file.read_text().replace('["local"]', '["lcoal"]'))
    broken = run(RELAY_UPSTREAMS_FILE=str(routes_file))
    assert broken.returncode != 0
    assert "lcoal" in broken.stderr


def test_web_unit_runs_gunicorn_with_the_config() -> None:
    service = unit("chat-relay-web.service")["Service"]
    cmd = shlex.split(service["ExecStart"])
    assert Path(cmd[0]).name == "gunicorn"
    assert in_repo(cmd[cmd.index("-c") + 1]) == DEPLOY / "gunicorn.conf.py"
    assert service["Type"] == "notify"  # gunicorn's arbiter sends READY=1
    graceful = gunicorn_setting("graceful_timeout")
    assert seconds(service["TimeoutStopSec"]) > graceful  # type: ignore[operator]


def test_worker_unit_runs_python_m_worker() -> None:
    service = unit("chat-relay-worker.service")["Service"]
    cmd = shlex.split(service["ExecStart"])
    assert Path(cmd[0]).name.startswith("python")
    assert cmd[1:3] == ["-m", "worker"]
    assert "--grace" not in cmd  # the env file's RELAY_WORKER_GRACE_SECONDS decides
    assert seconds(service["TimeoutStopSec"]) > grace_of(cmd)


def test_units_verify_with_systemd(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts both units (with this venv in place of /opt's)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    venv_bin = Path(sys.executable).parent
    for source in UNITS.glob("*.service"):
        text = source.read_text().replace(f"{IMAGE_ROOT}/.venv/bin/", f"{venv_bin}/")
        (tmp_path / source.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/nginx.conf ------------------------------------------------------------------------


def site_config() -> str:
    """deploy/nginx.conf without its comments (it has no ``#`` inside strings)."""
    return re.sub(r"#[^\n]*", "", NGINX_SITE.read_text())


def locations(text: str) -> list[tuple[str, str, str]]:
    """(modifier, pattern, body) of each ``location`` block (ours hold no nested blocks)."""
    found = re.findall(r"^\s*location\s+(?:(=|~\*|~|\^~)\s+)?(\S+)\s*\{([^}]*)\}", text, re.M)
    return [(mod, pattern, body) for mod, pattern, body in found]


def matching_location(text: str, uri: str) -> tuple[str, str, str]:
    """The location nginx picks for ``uri``: exact, else the longest prefix unless a regex
    matches (in order), unless that prefix is ``^~``."""
    blocks = [b for b in locations(text) if not b[1].startswith("@")]
    for block in blocks:
        if block[0] == "=" and block[1] == uri:
            return block
    prefixes = [b for b in blocks if b[0] in ("", "^~") and uri.startswith(b[1])]
    longest = max(prefixes, key=lambda b: len(b[1]), default=None)
    if longest is not None and longest[0] == "^~":
        return longest
    for block in blocks:
        flags = re.IGNORECASE if block[0] == "~*" else 0
        if block[0] in ("~", "~*") and re.search(block[1], uri, flags):
            return block
    assert longest is not None, f"no location for {uri}"
    return longest


def directive(body: str, name: str) -> str | None:
    match = re.search(rf"^\s*{name}\s+([^;]+);", body, re.MULTILINE)
    return match.group(1).strip() if match else None


def server_block(text: str) -> str:
    """The server block's own directives, without its locations."""
    server = text[text.index("server {") :]
    return re.sub(r"location\s[^{]*\{[^}]*\}", "", server)


@pytest.mark.parametrize(
    "uri",
    [
        "/v1/jobs/job_0123456789abcdef/events",
        "/v1/chat/completions",
        "/api/chat-process",
    ],
)
def test_streamed_endpoints_are_unbuffered(uri: str) -> None:
    _, pattern, body = matching_location(site_config(), uri)
    assert directive(body, "proxy_buffering") == "off", pattern
    assert directive(body, "proxy_cache") == "off", pattern
    assert directive(body, "gzip") == "off", pattern
    assert seconds(directive(body, "proxy_read_timeout") or "60s") >= 3600, pattern
    assert directive(body, "proxy_pass") == "http://chat_relay"


@pytest.mark.parametrize("uri", ["/v1/jobs", "/v1/jobs/job_1", "/healthz", "/"])
def test_other_endpoints_are_proxied_normally(uri: str) -> None:
    _, pattern, body = matching_location(site_config(), uri)
    assert directive(body, "proxy_pass") == "http://chat_relay", pattern
    assert directive(body, "proxy_buffering") is None, pattern


def test_server_settings_suit_the_relay() -> None:
    text = site_config()
    server = server_block(text)
    assert directive(server, "proxy_http_version") == "1.1"
    assert directive(server, "proxy_set_header Connection") == '""'
    assert directive(server, "proxy_set_header Host") == "$http_host"
    assert directive(server, "proxy_set_header X-Forwarded-For") == "$proxy_add_x_forwarded_for"
    assert directive(server, "proxy_set_header X-Forwarded-Proto") == "$scheme"
    # proxy_set_header in a location would silently drop all the server's headers.
    assert not any("proxy_set_header" in body for _, _, body in locations(text))
    upstream = text[text.index("upstream chat_relay {") : text.index("server {")]
    assert directive(upstream, "server").startswith("127.0.0.1:8000")  # type: ignore[union-attr]
    assert int(directive(upstream, "keepalive") or 0) > 0
    # Slightly above the relay's own limit, so that the relay answers its JSON 413.
    limit = directive(server, "client_max_body_size")
    assert limit and limit.endswith("k")
    relay_limit = Settings().max_body_bytes
    assert relay_limit < int(limit[:-1]) * 1024 <= 2 * relay_limit
    _, _, static = matching_location(text, "/static/app.js")
    assert directive(static, "alias") == f"{IMAGE_ROOT}/relay/web/static/"


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    """``nginx -t`` with the same substitutions as the integration test."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (deploy/test.sh installs it)")
    static = tmp_path / "static"
    static.mkdir()
    site = render_site(
        upstream="127.0.0.1:8000", listen=f"127.0.0.1:{free_port()}", static_root=static
    )
    conf = write_nginx_prefix(tmp_path / "nginx", site)
    result = subprocess.run(
        [binary, "-t", "-p", str(conf.parent), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
