"""Settings: typed, parsed strictly, and a bad value stops each process at start, named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from relay.core.settings import Settings, SettingsError
from tests.conftest import GUNICORN_CONF, ROOT, free_port


def test_defaults_are_typed():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.upstream_include_usage is True and settings.api_keys == ()
    assert isinstance(settings.keepalive_seconds, float) and settings.max_messages == 500


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("False", False), ("0", False), ("1", True), ("yes", True), (" NO ", False)],
)
def test_booleans_mean_what_they_say(raw: str, value: bool):
    # JSON-style parsing read "False" as the truthy string "False".
    assert Settings.from_env({"RELAY_UPSTREAM_INCLUDE_USAGE": raw}).upstream_include_usage is value


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("RELAY_DIRECT_WRITES", "maybe", "true or false"),
        ("RELAY_MAX_MESSAGES", "ten", "whole number"),
        ("RELAY_MAX_MESSAGES", "1e3", "whole number"),
        ("RELAY_MAX_MESSAGES", "-1", "at least 0"),
        ("RELAY_KEEPALIVE_SECONDS", "nan", "finite"),
        ("RELAY_KEEPALIVE_SECONDS", "inf", "finite"),
        ("RELAY_WORKER_CONCURRENCY", "0", "at least 1"),
        ("RELAY_TRUSTED_PROXIES", "99", "between 0 and 10"),
        ("RELAY_UPSTREAM_BASE_URL", "api.openai.com/v1", "http:// or https://"),
        ("RELAY_REDIS_URL", "localhost:6379", "redis://"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(name: str, raw: str, says: str):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({name: raw})
    assert str(error.value).startswith(f"{name}={raw!r}:") and says in str(error.value)


def test_numbers_lists_and_overrides():
    settings = Settings.from_env(
        {"RELAY_KEEPALIVE_SECONDS": "2.5", "RELAY_API_KEYS": " a, b,,", "RELAY_MAX_TOKENS": "7"},
        max_tokens=9,
    )
    assert (settings.keepalive_seconds, settings.api_keys, settings.max_tokens) == (
        2.5,
        ("a", "b"),
        9,
    )
    with pytest.raises(SettingsError, match="unknown settings: nope"):
        Settings.from_env({}, nope=1)
    with pytest.raises(SettingsError):
        Settings.from_env({}, max_tokens=True)  # a boolean is not a number


def test_the_processes_refuse_to_start_with_a_bad_value():
    env = {"RELAY_UPSTREAM_INCLUDE_USAGE": "maybe", "PATH": "/usr/bin:/bin"}
    commands = {
        "worker": [sys.executable, "-m", "worker"],
        "cli": [sys.executable, "-m", "relay.apikeys", "list"],
        "gunicorn": [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(GUNICORN_CONF),
            "-b",
            f"127.0.0.1:{free_port()}",
        ],  # fmt: skip
    }
    for name, command in commands.items():
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode != 0, name
        assert "RELAY_UPSTREAM_INCLUDE_USAGE='maybe'" in done.stderr, (name, done.stderr[-500:])
        assert "Traceback" not in done.stderr, (name, done.stderr[-2000:])


def test_keys_are_the_strings_given_never_json():
    # Parsed as JSON, "0", "false", "null" and "[]" ran the relay open and 1e3 seeded "1000.0".
    for raw in ("0", "false", "null", "[]", "1e3"):
        assert Settings.from_env({"RELAY_API_KEYS": raw}).api_keys == (raw,)
    assert Settings.from_env({"RELAY_API_KEYS": ""}).api_keys == ()
    with pytest.raises(SettingsError, match="RELAY_ALLOWED_HOSTS"):
        Settings.from_env({"RELAY_ALLOWED_HOSTS": " , "})


def test_a_cluster_url_names_database_0_or_none():
    cluster = {"RELAY_REDIS_CLUSTER": "true"}
    for url in ("redis://node:7000", "redis://node:7000/", "redis://node:7000/0"):
        assert Settings.from_env({**cluster, "RELAY_REDIS_URL": url}).redis_cluster
    with pytest.raises(SettingsError, match="database 0 only"):
        Settings.from_env({**cluster, "RELAY_REDIS_URL": "redis://node:7000/3"})
    assert Settings.from_env({"RELAY_REDIS_URL": "redis://node:7000/3"}).redis_url.endswith("/3")
