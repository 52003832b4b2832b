"""The routes file: which upstreams serve which models, and what a bad file says."""

from __future__ import annotations

import tomllib

import pytest

from relay.core import routes
from relay.core.routes import RoutesError
from relay.core.settings import Settings

EXAMPLE = """
[upstreams.local]
base_url = "http://127.0.0.1:8082/v1"
max_streams = 4

[upstreams.hosted]
base_url = "https://api.example.com/v1"
api_key_env = "HOSTED_KEY"
headers = { "X-Team" = "drafts" }
read_timeout = 90

[[routes]]
model = "small"
upstreams = ["local"]

[[routes]]
model = "gpt-*"
upstreams = ["hosted", "local"]
rename = { local = "small" }
"""


def parsed(text: str = EXAMPLE, **settings: object) -> routes.Routes:
    return routes.parse(tomllib.loads(text), Settings(**settings), {"HOSTED_KEY": "sk-h"})


def test_models_go_to_their_routes_in_order_with_renames():
    table = parsed()
    assert [(t.upstream.name, t.model) for t in table.targets("small")] == [("local", "small")]
    assert [(t.upstream.name, t.model) for t in table.targets("gpt-4o")] == [
        ("hosted", "gpt-4o"),
        ("local", "small"),
    ]
    assert table.targets("claude") == []
    assert table.targets("")[0].model == Settings().default_model  # gpt-* takes the default
    assert table.implied_model() == Settings().default_model
    assert parsed(default_model="claude").targets("") == table.targets("small")  # the first
    assert parsed(default_model="claude").implied_model() == "small"
    assert parsed(default_model="gpt-x").targets("")[0].model == "gpt-x"
    pattern_first = parsed(EXAMPLE.replace('model = "small"', 'model = "sm*"'), default_model="x")
    assert pattern_first.implied_model() == "x" and pattern_first.targets("") == []  # a 404
    hosted = table.upstreams["hosted"]
    assert hosted.api_key == "sk-h" and dict(hosted.headers) == {"X-Team": "drafts"}
    assert hosted.read_timeout == 90 and hosted.chat_url.endswith("/v1/chat/completions")
    assert table.upstreams["local"].max_streams == 4 and hosted.max_streams == 0
    assert hosted.stream_options  # unless a file says the upstream refuses them
    refusing = parsed(EXAMPLE.replace("max_streams = 4", "max_streams = 4\nstream_options = false"))
    assert not refusing.upstreams["local"].stream_options
    assert table.declared_models() == [("small", "local")]


def test_without_a_file_every_model_goes_to_the_one_upstream():
    table = routes.load(Settings(upstream_base_url="http://up:1/v1", upstream_api_key="k"))
    (target,) = table.targets("anything")
    assert target.upstream.base_url == "http://up:1/v1" and target.upstream.api_key == "k"
    assert not table.from_file and table.declared_models() == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[routes]]\nmodel='a'\nupstreams=['x']", "no [upstreams.NAME] table"),
        ("[upstreams.x]\nbase_url='http://x'", "no [[routes]] entry"),
        ("[upstreams.x]\nbase_url='ftp://x'\n[[routes]]\nmodel='a'\nupstreams=['x']",
         "http:// or https://"),
        ("[upstreams.x]\nbase_url='http://x'\n[[routes]]\nmodel='a'\nupstreams=['y']",
         "unknown upstreams: y"),
        ("[upstreams.x]\nbase_url='http://x'\napi_key_env='NOPE'\n[[routes]]\nmodel='a'\n"
         "upstreams=['x']", "NOPE is not set"),
        ("[upstreams.x]\nbase_url='http://x'\nmax_streams=-1\n[[routes]]\nmodel='a'\n"
         "upstreams=['x']", "max_streams must be a number of at least 0"),
        ("[upstreams.x]\nbase_url='http://x'\ncolour='red'\n[[routes]]\nmodel='a'\n"
         "upstreams=['x']", "unknown keys: colour"),
        ("[upstreams.x]\nbase_url='http://x'\nstream_options='no'\n[[routes]]\nmodel='a'\n"
         "upstreams=['x']", "stream_options must be true or false"),
        ("[upstreams.'a b']\nbase_url='http://x'\n[[routes]]\nmodel='a'\nupstreams=['a b']",
         "upstream name 'a b'"),
        ("[upstreams.x]\nbase_url='http://x'\n[[routes]]\nmodel='a'\nupstreams=['x']\n"
         "rename={y='b'}", "rename must map upstreams of the route"),
    ],
)  # fmt: skip
def test_a_bad_file_says_what_is_wrong(text: str, says: str):
    with pytest.raises(RoutesError) as error:
        parsed(text)
    assert str(error.value).startswith("routes: ") and says in str(error.value)


def test_an_unreadable_or_invalid_file_names_itself(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(RoutesError, match=f"RELAY_UPSTREAMS_FILE='{missing}'"):
        routes.load(Settings(upstreams_file=str(missing)))
    broken = tmp_path / "broken.toml"
    broken.write_text("[upstreams\n")
    with pytest.raises(RoutesError, match="not valid TOML"):
        routes.load(Settings(upstreams_file=str(broken)))


def test_load_returns_the_routes_held_for_their_file_and_read_the_file_as_it_is(
    tmp_path, monkeypatch
):
    """gunicorn's master holds the routes it read: the processes it forks serve those, not a
    file changed (or broken) since, until a HUP reads it again."""
    monkeypatch.setattr(routes, "_held", None)
    path = tmp_path / "routes.toml"
    path.write_text(
        "[upstreams.x]\nbase_url='http://x'\n[[routes]]\nmodel='first'\nupstreams=['x']"
    )
    settings = Settings(upstreams_file=str(path))
    routes.hold(routes.read(settings))
    path.write_text(
        "[upstreams.x]\nbase_url='http://x'\n[[routes]]\nmodel='second'\nupstreams=['x']"
    )
    assert routes.load(settings).describe() == "upstreams x; routes first -> x"
    assert routes.read(settings).describe() == "upstreams x; routes second -> x"
    path.write_text("[upstreams\n")
    assert routes.load(settings).targets("first")  # a broken file: the held routes still serve
    other = tmp_path / "other.toml"
    other.write_text("[upstreams.y]\nbase_url='http://y'\n[[routes]]\nmodel='*'\nupstreams=['y']")
    assert routes.load(Settings(upstreams_file=str(other))).source == str(other)  # not held
    shorthand = routes.load(Settings(upstream_base_url="http://up:1/v1"))
    assert not shorthand.from_file and shorthand.targets("any")[0].upstream.base_url == (
        "http://up:1/v1"
    )


def test_the_check_command_says_what_a_file_routes_or_what_is_wrong(tmp_path, monkeypatch, capsys):
    """``python -m relay.routes check``: a file checked before a reload."""
    from relay import routes as cli

    monkeypatch.delenv("RELAY_UPSTREAMS_FILE", raising=False)
    monkeypatch.delenv("HOSTED_KEY", raising=False)
    path = tmp_path / "routes.toml"
    path.write_text(EXAMPLE.replace('api_key_env = "HOSTED_KEY"\n', ""))
    assert cli.main(["check", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path}: upstreams local, hosted; routes small -> local; gpt-* -> hosted, local\n"
    )
    monkeypatch.setenv("RELAY_UPSTREAMS_FILE", str(path))  # the relay's own file by default
    path.write_text(EXAMPLE)  # names a key variable this environment does not have
    with pytest.raises(SystemExit) as exited:
        cli.main(["check"])
    assert exited.value.code == 1
    assert "[upstreams.hosted].api_key_env: HOSTED_KEY is not set" in capsys.readouterr().err
    monkeypatch.delenv("RELAY_UPSTREAMS_FILE")
    with pytest.raises(SystemExit) as exited:
        cli.main(["check"])
    assert exited.value.code == 2 and "name a file" in capsys.readouterr().err
