import pytest

from relay.core.errors import InvalidRequest
from relay.web.validation import Limits, validate_chat_request

OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_valid_request_passes_through_with_unknown_fields():
    body = {**OK, "temperature": 0.5, "vendor_option": {"x": 1}}
    assert validate_chat_request(body) == body


def test_a_null_parameter_is_one_not_given_and_is_not_sent_on():
    """As OpenAI takes it; ChatDev-style clients send ``"stop": null`` and the like."""
    nulls = dict.fromkeys(["stop", "seed", "max_tokens", "temperature", "stream", "tools",
                           "stream_options", "parentMessageId", "model"])  # fmt: skip
    body = {**OK, **nulls, "vendor_option": None}
    assert validate_chat_request(body, default_model="gpt") == {
        "messages": OK["messages"],
        "model": "gpt",
        "vendor_option": None,  # not the relay's to judge: passed through as ever
    }
    with pytest.raises(InvalidRequest) as info:
        validate_chat_request({"model": "m", "messages": None})
    assert info.value.to_dict()["error"]["code"] == "missing_required"


def test_stop_may_name_more_strings_than_openai_takes():
    """Local upstreams take more than OpenAI's 4 (editors' completions send 9 or more); the
    upstream, not the relay, says whether it does."""
    body = {**OK, "stop": [f"<|stop{n}|>" for n in range(12)]}
    assert validate_chat_request(body) == body


def test_default_model_fills_a_missing_model():
    body = {"messages": OK["messages"]}
    assert validate_chat_request(body, default_model="gpt")["model"] == "gpt"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            },
            "messages[0].content[0].text",
        ),  # once a 500
        ({**OK, "temperature": "hot"}, "temperature"),
        ({**OK, "temperature": True}, "temperature"),
        ({**OK, "temperature": 3}, "temperature"),
        ({**OK, "max_tokens": 1.5}, "max_tokens"),
        ({**OK, "max_tokens": 0}, "max_tokens"),
        ({**OK, "stream": "yes"}, "stream"),
        ({**OK, "n": 2}, "n"),
        ({**OK, "stop": ["a", 1]}, "stop"),
        ({**OK, "model": 5}, "model"),
        ({"messages": OK["messages"]}, "model"),
    ],
)
def test_invalid_requests_name_the_parameter(body, param):
    with pytest.raises(InvalidRequest) as info:
        validate_chat_request(body)
    error = info.value.to_dict()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_assistant_tool_call_may_omit_content():
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "1"}]},
        ],
    }
    assert validate_chat_request(body) == body


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}] * 4},
            "too_many_messages",
            "messages",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x" * 11}]},
            "input_too_long",
            "messages",
        ),
        ({"model": "m", "prompt": "y" * 11}, "input_too_long", "messages"),
        ({**OK, "max_tokens": 101}, "max_tokens_too_large", "max_tokens"),
        ({**OK, "max_completion_tokens": 101}, "max_tokens_too_large", "max_completion_tokens"),
    ],
)
def test_limits_refuse_with_a_named_code(body, code, param):
    limits = Limits(max_messages=3, max_input_chars=10, max_tokens=100)
    with pytest.raises(InvalidRequest) as info:
        validate_chat_request(body, limits=limits)
    error = info.value.to_dict()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_limits_at_the_ceiling_pass_and_zero_means_none():
    body = {**OK, "messages": [{"role": "user", "content": "x" * 10}] * 3, "max_tokens": 100}
    assert validate_chat_request(body, limits=Limits(3, 30, 100))
    assert validate_chat_request({**body, "max_tokens": 10**6}, limits=Limits())
