import pytest

from relay.web.sse import format_comment, format_event


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": "hello"}, b"data: hello\n\n"),
        ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
        ({"data": "a\r\nb\rc"}, b"data: a\ndata: b\ndata: c\n\n"),
        ({"data": ""}, b"data: \n\n"),
        ({"data": b"{}", "id": 7}, b"id: 7\ndata: {}\n\n"),
        ({"data": "x", "event": "up\ndate"}, b"event: update\ndata: x\n\n"),
        ({"data": "x", "id": "1\r\n2"}, b"id: 12\ndata: x\n\n"),
        ({"retry": 2000}, b"retry: 2000\n\n"),
        ({"data": "[DONE]", "id": 3, "retry": 5}, b"id: 3\nretry: 5\ndata: [DONE]\n\n"),
    ],
)
def test_format_event_is_byte_exact(kwargs, expected):
    assert format_event(**kwargs) == expected


def test_comment_cannot_inject_a_field():
    assert format_comment("keep\ndata: x") == b": keepdata: x\n\n"
