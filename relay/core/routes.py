"""Which upstreams serve which models: the routes file (``RELAY_UPSTREAMS_FILE``, TOML), or the
one-upstream shorthand ``RELAY_UPSTREAM_BASE_URL``.

A routes file names upstreams and maps model names (or glob patterns) to an ordered list of
them; a job goes to the first, and to the next one if the first fails before its first chunk::

    [upstreams.local]
    base_url = "http://127.0.0.1:8082/v1"
    max_streams = 4                  # at most 4 streams at once, across every worker
    read_timeout = 120

    [upstreams.openai]
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"   # the key comes from this environment variable
    headers = { "OpenAI-Organization" = "org-123" }

    [upstreams.legacy]
    base_url = "https://proxy.example/v1"
    stream_options = false           # it refuses the parameter: never sent (no usage stored)

    [[routes]]
    model = "smollm2"
    upstreams = ["local"]

    [[routes]]
    model = "gpt-4o*"                # the first route whose pattern matches wins
    upstreams = ["openai", "local"]
    rename = { local = "smollm2" }   # the model name sent to that upstream

Shared by the web tier (unknown models are refused at ``POST``; ``/v1/models``) and the worker
(where to send a job). Nothing here touches the network.

A running relay reads the file again on SIGHUP (gunicorn's master: ``on_reload`` in
``deploy/gunicorn.conf.py``; a worker: ``Worker.reload_routes``); a file that has become bad is
refused then, and the last good routes stay.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.core.settings import Settings

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # an upstream's name: it appears in metrics and keys
DEFAULT = "default"  # the upstream of the one-upstream shorthand


class RoutesError(ValueError):
    """The routes file is missing, unreadable or inconsistent; says where."""


@dataclass(frozen=True)
class Upstream:
    """One upstream server: where it is, how to authenticate, how long to wait, how many
    streams it may carry at once (0: no cap), and whether it takes ``stream_options``."""

    base_url: str
    api_key: str = ""
    connect_timeout: float = Settings.upstream_connect_timeout
    read_timeout: float = Settings.upstream_read_timeout
    name: str = "default"
    headers: tuple[tuple[str, str], ...] = ()
    max_streams: int = 0
    stream_options: bool = True  # False: a server that refuses the parameter never gets it

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def models_url(self) -> str:
        return self.base_url.rstrip("/") + "/models"


@dataclass(frozen=True)
class Target:
    """One upstream of a route, and the model name it is sent."""

    upstream: Upstream
    model: str


@dataclass(frozen=True)
class Route:
    pattern: str
    upstreams: tuple[str, ...]
    rename: tuple[tuple[str, str], ...] = ()

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.pattern)

    @property
    def exact(self) -> bool:
        """A plain model name, not a pattern: one the relay can list as it is."""
        return not any(c in self.pattern for c in "*?[")


@dataclass(frozen=True)
class Routes:
    upstreams: dict[str, Upstream]
    routes: tuple[Route, ...]
    default_model: str = ""
    source: str = field(default="", compare=False)  # the routes file's path; "": the shorthand

    @property
    def from_file(self) -> bool:
        return bool(self.source)

    def describe(self) -> str:
        """One line for the logs: each upstream, then each route's model and upstreams."""
        upstreams = ", ".join(self.upstreams)
        table = "; ".join(f"{r.pattern} -> {', '.join(r.upstreams)}" for r in self.routes)
        return f"upstreams {upstreams}; routes {table}"

    def implied_model(self) -> str:
        """The model of a request that names none: ``RELAY_DEFAULT_MODEL`` if a route takes it,
        else the first route's model if it names one (else ``RELAY_DEFAULT_MODEL``, unknown)."""
        if not self._route(self.default_model) and self.routes[0].exact:
            return self.routes[0].pattern
        return self.default_model

    def targets(self, model: str) -> list[Target]:
        """Where a job for ``model`` goes, in order of preference; [] for a model no route
        takes (``""``: :meth:`implied_model`)."""
        model = model or self.implied_model()
        route = self._route(model)
        if route is None:
            return []
        renames = dict(route.rename)
        return [Target(self.upstreams[name], renames.get(name, model)) for name in route.upstreams]

    def _route(self, model: str) -> Route | None:
        return next((route for route in self.routes if route.matches(model)), None)

    def declared_models(self) -> list[tuple[str, str]]:
        """(model, upstream) for every route that names one model exactly."""
        return [(r.pattern, r.upstreams[0]) for r in self.routes if r.exact]


def single(settings: Settings) -> Routes:
    """The one-upstream shorthand: every model goes to ``RELAY_UPSTREAM_BASE_URL``."""
    upstream = Upstream(
        settings.upstream_base_url,
        settings.upstream_api_key,
        settings.upstream_connect_timeout,
        settings.upstream_read_timeout,
        DEFAULT,
    )
    return Routes({DEFAULT: upstream}, (Route("*", (DEFAULT,)),), settings.default_model)


# The routes the gunicorn master read (deploy/gunicorn.conf.py), which the web processes it forks
# inherit: every one serves the same routes, and one started again after the file changed (a
# crash, a HUP that found the file broken) gets the last good ones. A process that read the
# file itself would fail to boot on a broken one, and gunicorn stops altogether when one does.
_held: Routes | None = None


def hold(routes: Routes) -> None:
    """Make ``routes`` what :func:`load` returns for their file, here and in processes forked
    from here."""
    global _held
    _held = routes


def load(settings: Settings, environ: Mapping[str, str] | None = None) -> Routes:
    """The routes of ``RELAY_UPSTREAMS_FILE`` (those held for it, if any: :func:`hold`), or the
    shorthand's when it is not set."""
    if _held is not None and settings.upstreams_file and _held.source == settings.upstreams_file:
        return _held
    return read(settings, environ)


def read(settings: Settings, environ: Mapping[str, str] | None = None) -> Routes:
    """The routes of ``RELAY_UPSTREAMS_FILE`` as the file is now, or the shorthand's."""
    if not settings.upstreams_file:
        return single(settings)
    path = Path(settings.upstreams_file)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise RoutesError(f"RELAY_UPSTREAMS_FILE={str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RoutesError(f"RELAY_UPSTREAMS_FILE={str(path)!r}: not valid TOML: {exc}") from None
    environ = os.environ if environ is None else environ
    return parse(data, settings, environ, settings.upstreams_file)  # its source: as load compares


def parse(
    data: dict[str, Any], settings: Settings, environ: Mapping[str, str], where: str = "routes"
) -> Routes:
    """Routes from a parsed routes file; :class:`RoutesError` names what is wrong and where."""

    def fail(message: str) -> RoutesError:
        return RoutesError(f"{where}: {message}")

    unknown = set(data) - {"upstreams", "routes"}
    if unknown:
        raise fail(f"unknown sections: {', '.join(sorted(unknown))}")
    raw_upstreams = data.get("upstreams")
    if not isinstance(raw_upstreams, dict) or not raw_upstreams:
        raise fail("no [upstreams.NAME] table")
    upstreams = {
        name: _upstream(name, spec, settings, environ, fail) for name, spec in raw_upstreams.items()
    }
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise fail("no [[routes]] entry")
    routes = tuple(_route(i, spec, upstreams, fail) for i, spec in enumerate(raw_routes, 1))
    return Routes(upstreams, routes, settings.default_model, source=where)


def _upstream(
    name: str, spec: Any, settings: Settings, environ: Mapping[str, str], fail: Any
) -> Upstream:
    if not NAME.match(name):
        raise fail(f"upstream name {name!r}: letters, digits, '.', '_' or '-', at most 64")
    if not isinstance(spec, dict):
        raise fail(f"[upstreams.{name}] must be a table")
    known = {"base_url", "api_key_env", "headers", "connect_timeout", "read_timeout",
             "max_streams", "stream_options"}  # fmt: skip
    if unknown := set(spec) - known:
        raise fail(f"[upstreams.{name}]: unknown keys: {', '.join(sorted(unknown))}")
    base_url = spec.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise fail(f"[upstreams.{name}].base_url must be an http:// or https:// URL")
    key_env = spec.get("api_key_env", "")
    if not isinstance(key_env, str):
        raise fail(f"[upstreams.{name}].api_key_env must name an environment variable")
    if key_env and key_env not in environ:
        raise fail(f"[upstreams.{name}].api_key_env: {key_env} is not set")
    headers = spec.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise fail(f"[upstreams.{name}].headers must map header names to strings")

    stream_options = spec.get("stream_options", True)
    if not isinstance(stream_options, bool):
        raise fail(f"[upstreams.{name}].stream_options must be true or false")

    def number(key: str, default: float, low: float, integer: bool = False) -> Any:
        value = spec.get(key, default)
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            raise fail(f"[upstreams.{name}].{key} must be a number of at least {low:g}")
        return value

    return Upstream(
        base_url,
        environ.get(key_env, "") if key_env else "",
        float(number("connect_timeout", settings.upstream_connect_timeout, 0.001)),
        float(number("read_timeout", settings.upstream_read_timeout, 0.001)),
        name,
        tuple(headers.items()),
        number("max_streams", 0, 0, integer=True),
        stream_options,
    )


def _route(index: int, spec: Any, upstreams: dict[str, Upstream], fail: Any) -> Route:
    where = f"[[routes]] #{index}"
    if not isinstance(spec, dict):
        raise fail(f"{where} must be a table")
    if unknown := set(spec) - {"model", "upstreams", "rename"}:
        raise fail(f"{where}: unknown keys: {', '.join(sorted(unknown))}")
    pattern = spec.get("model")
    if not isinstance(pattern, str) or not pattern:
        raise fail(f'{where}.model must be a model name or a pattern such as "gpt-*"')
    names = spec.get("upstreams")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise fail(f"{where} ({pattern}).upstreams must list upstream names")
    if missing := [n for n in names if n not in upstreams]:
        raise fail(f"{where} ({pattern}) names unknown upstreams: {', '.join(missing)}")
    rename = spec.get("rename", {})
    if not isinstance(rename, dict) or not all(
        k in names and isinstance(v, str) and v for k, v in rename.items()
    ):
        raise fail(f"{where} ({pattern}).rename must map upstreams of the route to model names")
    return Route(pattern, tuple(names), tuple(rename.items()))
