"""The incremental SSE decoder: WHATWG event-stream rules, and identical events however the
byte stream is cut into chunks."""

from __future__ import annotations

import codecs
import dataclasses
import itertools
from collections.abc import Iterable

import pytest

from worker.sse_decoder import (
    DEFAULT_MAX_LINE_BYTES,
    SSEDecoder,
    SSEEvent,
    SSEProtocolError,
)

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # hypothesis is a dev extra; the exhaustive tests below still run
    hypothesis = None


def decode(*chunks: bytes) -> list[SSEEvent]:
    """All events of a stream fed as the given chunks, closed at the end."""
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def decode_with_pending(*chunks: bytes) -> tuple[list[SSEEvent], bool]:
    """The events and the decoder's ``pending`` flag after closing."""
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    assert decoder.close() == []
    return events, decoder.pending


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given (sorted) offsets; empty pieces included on purpose."""
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def reference(data: bytes) -> tuple[list[SSEEvent], bool]:
    """A deliberately naive, character-by-character reading of the spec, for comparison."""
    text = data.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\r":
            lines.append("".join(current))
            current = []
            if i + 1 < len(text) and text[i + 1] == "\n":
                i += 1
        elif char == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    events: list[SSEEvent] = []
    data_buffer, event_type, last_id, retry = "", "", None, None
    in_event = False
    for line in lines:
        if line == "":
            in_event = False
            if data_buffer == "":
                event_type = ""
                continue
            if data_buffer.endswith("\n"):
                data_buffer = data_buffer[:-1]
            events.append(SSEEvent(data_buffer, event_type or "message", last_id, retry))
            data_buffer, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        in_event = True
        if name == "data":
            data_buffer += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events, bool(current) or in_event


OPENAI = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)

# Every rule in one stream: BOM, CRLF/CR/LF, comments, fields, multi-byte text, empty data.
SAMPLE = (
    "\ufeff: a comment\r\n"
    "event: greeting\r"
    "id: 7\n"
    "retry: 1500\r\n"
    "data: héllo €\r"
    "data:  two spaces\n"
    "\r\n"
    "data\n"
    "\r"
    "unknown: field\n"
    "data:😀\r\n"
    "id: bad\0id\n"
    "\n"
    "\n\r\n\r"
    "event: end\r\n"
    "id\n"
    "retry: 12a\n"
    "data: [DONE]\r"
    "\r"
).encode()

SAMPLE_EVENTS = [
    SSEEvent("héllo €\n two spaces", "greeting", "7", 1500),
    SSEEvent("", "message", "7", 1500),
    SSEEvent("😀", "message", "7", 1500),
    SSEEvent("[DONE]", "end", "", 1500),
]

# Short but dense in CR/LF pairs, so that all three-way cuts stay cheap to try.
DENSE = b"data:a\r\n\r\ndata: \xc3\xa9\r\r\n:c\r\ndata\n\r\nevent:x\rdata:b\r\n\n"


def test_openai_stream() -> None:
    events = decode(OPENAI)
    assert [e.data for e in events] == [
        '{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}]}',
        '{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}',
        '{"id":"c1","choices":[{"index":0,"delta":{"content":"lo"}}]}',
        '{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        "[DONE]",
    ]
    assert {(e.event, e.id, e.retry) for e in events} == {("message", None, None)}


def test_sample_stream_whole() -> None:
    assert decode(SAMPLE) == SAMPLE_EVENTS
    assert reference(SAMPLE) == (SAMPLE_EVENTS, False)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(b"data: a\ndata: b\n\n", [SSEEvent("a\nb")], id="multi-line-data"),
        pytest.param(b"data: a\n\ndata: b\n\n", [SSEEvent("a"), SSEEvent("b")], id="two-events"),
        pytest.param(b"data: a\ndata:\ndata: b\n\n", [SSEEvent("a\n\nb")], id="empty-middle"),
        pytest.param(b"data: a\ndata\n\n", [SSEEvent("a\n")], id="trailing-empty-line"),
        pytest.param(b": hello\ndata: a\n: x\n\n", [SSEEvent("a")], id="comments"),
        pytest.param(b":\n\n", [], id="empty-comment"),
        pytest.param(b"data: a\r\n\r\n", [SSEEvent("a")], id="crlf"),
        pytest.param(b"data: a\r\r", [SSEEvent("a")], id="cr-only"),
        pytest.param(b"data: a\rdata: b\r\n\n", [SSEEvent("a\nb")], id="mixed"),
        pytest.param(b"data: a\n\r\n", [SSEEvent("a")], id="lf-then-crlf"),
        pytest.param(b"data: a\r\n\r", [SSEEvent("a")], id="crlf-then-cr"),
        pytest.param(b"data: a\n\r\r\n\n", [SSEEvent("a")], id="cr-blank-lines-no-double"),
        pytest.param(b"data:a\n\n", [SSEEvent("a")], id="no-space"),
        pytest.param(b"data:  a\n\n", [SSEEvent(" a")], id="two-spaces-one-removed"),
        pytest.param(b"data: a \n\n", [SSEEvent("a ")], id="trailing-space-kept"),
        pytest.param(b"data:\ta\n\n", [SSEEvent("\ta")], id="tab-kept"),
        pytest.param(b"data: a:b: c\n\n", [SSEEvent("a:b: c")], id="colons-in-value"),
        pytest.param(b"data\n\n", [SSEEvent("")], id="field-without-colon"),
        pytest.param(b"data:\n\n", [SSEEvent("")], id="empty-value"),
        pytest.param(b"data\ndata\n\n", [SSEEvent("\n")], id="two-empty-lines"),
        pytest.param(b"\n\n\r\n\r\r\n", [], id="blank-lines-only"),
        pytest.param(b"event: x\n\ndata: a\n\n", [SSEEvent("a")], id="no-data-resets-type"),
        pytest.param(b"event: x\ndata: a\n\n", [SSEEvent("a", "x")], id="event-type"),
        pytest.param(
            b"event: x\ndata: a\n\ndata: b\n\n",
            [SSEEvent("a", "x"), SSEEvent("b")],
            id="type-resets-after-dispatch",
        ),
        pytest.param(b"event:\ndata: a\n\n", [SSEEvent("a")], id="empty-type-is-message"),
        pytest.param(b"event: a\nevent: b\ndata: c\n\n", [SSEEvent("c", "b")], id="last-type"),
        pytest.param(
            b"id: 1\ndata: a\n\ndata: b\n\n",
            [SSEEvent("a", id="1"), SSEEvent("b", id="1")],
            id="id-persists",
        ),
        pytest.param(b"id: 1\n\ndata: a\n\n", [SSEEvent("a", id="1")], id="id-without-data-kept"),
        pytest.param(
            b"id: 1\ndata: a\n\nid\ndata: b\n\n",
            [SSEEvent("a", id="1"), SSEEvent("b", id="")],
            id="empty-id-resets",
        ),
        pytest.param(b"id: 1\nid: 2\x003\ndata: a\n\n", [SSEEvent("a", id="1")], id="id-with-nul"),
        pytest.param(b"ID: 1\nData: a\ndata: b\n\n", [SSEEvent("b")], id="names-case-sensitive"),
        pytest.param(b"retry: 3000\ndata: a\n\n", [SSEEvent("a", retry=3000)], id="retry"),
        pytest.param(b"retry:10\n\ndata: a\n\n", [SSEEvent("a", retry=10)], id="retry-persists"),
        pytest.param(
            b"retry: 1\nretry: 2x\nretry: -3\nretry: \nretry: 4.5\ndata: a\n\n",
            [SSEEvent("a", retry=1)],
            id="retry-not-digits",
        ),
        pytest.param("retry: ١٢\ndata: a\n\n".encode(), [SSEEvent("a")], id="retry-non-ascii"),
        pytest.param(b"retry:  5\ndata: a\n\n", [SSEEvent("a")], id="retry-extra-space"),
        pytest.param(b"foo: bar\ndata: a\nbaz\n\n", [SSEEvent("a")], id="unknown-fields"),
        pytest.param(b" data: a\n\n", [], id="leading-space-is-a-name"),
        pytest.param(b"\xef\xbb\xbfdata: a\n\n", [SSEEvent("a")], id="bom"),
        pytest.param(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", [], id="only-one-bom-stripped"),
        pytest.param(b"data: \xef\xbb\xbfa\n\n", [SSEEvent("\ufeffa")], id="bom-inside-kept"),
        pytest.param("data: né € 😀\n\n".encode(), [SSEEvent("né € 😀")], id="utf-8"),
        pytest.param(b"data: a\xffb\n\n", [SSEEvent("a\ufffdb")], id="invalid-utf-8-replaced"),
        pytest.param(b"data: a\x00b\n\n", [SSEEvent("a\x00b")], id="nul-in-data"),
        pytest.param(b"data: a\n\ndata: cut", [SSEEvent("a")], id="incomplete-discarded"),
        pytest.param(b"data: a\n\ndata: b\n", [SSEEvent("a")], id="no-blank-line-discarded"),
        pytest.param(b"", [], id="empty"),
    ],
)
def test_cases(stream: bytes, expected: list[SSEEvent]) -> None:
    assert decode(stream) == expected
    assert reference(stream)[0] == expected
    # The same events byte by byte: each case is a chunking test too.
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == expected


@pytest.mark.parametrize("stream", [OPENAI, SAMPLE, DENSE], ids=["openai", "sample", "dense"])
def test_byte_by_byte(stream: bytes) -> None:
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == decode(stream)


@pytest.mark.parametrize("stream", [OPENAI, SAMPLE, DENSE], ids=["openai", "sample", "dense"])
def test_every_two_way_split(stream: bytes) -> None:
    whole = decode(stream)
    assert whole
    for point in range(len(stream) + 1):
        assert decode(*split_at(stream, [point])) == whole, f"split at {point}"


def test_every_three_way_split() -> None:
    whole = decode(DENSE)
    assert whole == reference(DENSE)[0]
    for first, second in itertools.combinations_with_replacement(range(len(DENSE) + 1), 2):
        assert decode(*split_at(DENSE, [first, second])) == whole, f"split at {first}, {second}"


@pytest.mark.parametrize("size", [2, 3, 5, 7, 16, 64])
def test_fixed_size_chunks(size: int) -> None:
    chunks = [SAMPLE[i : i + size] for i in range(0, len(SAMPLE), size)]
    assert decode(*chunks) == SAMPLE_EVENTS


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\r", b"\ndata: b\r\n\r\n"],
        [b"data: a\r", b"\n", b"data: b\r", b"\n\r", b"\n"],
        [b"data: a\r", b"", b"\ndata: b\r\n\r\n"],  # an empty read in between changes nothing
        [b"data: a\r", b"\xc3", b"\xa9\r\n\r\n"],  # the LF-less read after CR decodes to nothing
    ],
    ids=["crlf-split", "all-crlf-split", "empty-read-between", "partial-char-after-cr"],
)
def test_crlf_split_across_chunks_is_one_line_ending(chunks: list[bytes]) -> None:
    expected = decode(b"".join(chunks))
    assert len(expected) == 1
    assert decode(*chunks) == expected


def test_cr_at_chunk_end_then_blank_line_is_no_spurious_dispatch() -> None:
    # iter_lines' classic bug: "a\r" | "\ndata: b" read as "a", "", "data: b" dispatches early.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == [SSEEvent("a\nb")]
    assert decoder.feed(b"\n") == []  # completes the CRLF begun above: no extra blank line
    assert decoder.feed(b"\n") == []  # a real blank line, with nothing to dispatch


def test_cr_then_cr_across_chunks_is_two_line_endings() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [SSEEvent("a")]


def test_events_come_out_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\ndata: tw") == [SSEEvent("one")]
    assert decoder.feed(b"o\n\ndata: three\n\n") == [SSEEvent("two"), SSEEvent("three")]


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_multibyte_char_split_across_chunks(char: str) -> None:
    encoded = char.encode()
    stream = b"data: " + encoded + b"\n\n"
    for point in range(len(b"data: ") + 1, len(b"data: ") + len(encoded)):
        decoder = SSEDecoder()
        assert decoder.feed(stream[:point]) == []
        assert decoder.feed(stream[point:]) == [SSEEvent(char)]


def test_bom_split_across_chunks() -> None:
    assert decode(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [SSEEvent("a")]
    assert decode(b"\xef\xbb\xbf", b"\xef\xbb\xbfdata: a\n\n") == []  # the 2nd BOM is a name


def test_truncated_multibyte_at_end_is_pending() -> None:
    events, pending = decode_with_pending(b"data: a\n\n\xe2\x82")
    assert events == [SSEEvent("a")]
    assert pending


@pytest.mark.parametrize(
    ("stream", "pending"),
    [
        (OPENAI, False),
        (b"data: a\n\n", False),
        (b"data: a\r\n\r\n", False),
        (b"data: a\r\r", False),
        (b"data: a\n\n: trailing comment\n", False),
        (b"data: a\n\n\n\n", False),
        (b"", False),
        (b"data: a\n\ndata: b\n", True),  # a whole line, but no blank line after it
        (b"data: a\n\ndata: b", True),  # a partial line
        (b"data: a\n\nevent: x\n", True),  # fields without data are still a started event
        (b"data: a\n\n: partial comm", True),  # cannot know it was only a comment
        (b"data: a\n\ndata: b\r", True),  # a lone CR ended the line: still no blank line
    ],
)
def test_pending_after_close(stream: bytes, pending: bool) -> None:
    events, was_pending = decode_with_pending(stream)
    assert was_pending is pending
    assert reference(stream)[1] is pending
    assert events == reference(stream)[0]


def test_pending_while_streaming() -> None:
    decoder = SSEDecoder()
    assert not decoder.pending
    decoder.feed(b"data: a")
    assert decoder.pending
    decoder.feed(b"\n")
    assert decoder.pending
    decoder.feed(b"\n")
    assert not decoder.pending


def test_close_is_idempotent_and_feed_after_close_fails() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\ndata: b")
    assert decoder.close() == []
    assert decoder.close() == []
    assert decoder.pending
    with pytest.raises(ValueError):
        decoder.feed(b"\n\n")


def test_overlong_line_without_newline_raises() -> None:
    decoder = SSEDecoder(max_line_bytes=1000)
    decoder.feed(b"data: " + b"x" * 900)
    with pytest.raises(SSEProtocolError, match="1000 bytes"):
        for _ in range(10):
            decoder.feed(b"x" * 100)


def test_overlong_line_many_small_chunks_raises() -> None:
    decoder = SSEDecoder(max_line_bytes=64)
    with pytest.raises(SSEProtocolError):
        for _ in range(1000):
            decoder.feed(b"garbage ")


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
def test_overlong_complete_line_raises(ending: bytes) -> None:
    # A long line inside one big chunk is refused as well, so chunking never changes the result.
    with pytest.raises(SSEProtocolError):
        SSEDecoder(max_line_bytes=100).feed(b"data: " + b"x" * 200 + ending + b"\n")


def test_line_at_the_limit_is_fine() -> None:
    line = b"data: " + b"x" * 94  # exactly 100 bytes; the line ending does not count
    for ending in (b"\n", b"\r", b"\r\n"):
        assert SSEDecoder(max_line_bytes=100).feed(line + ending + ending) == [SSEEvent("x" * 94)]
    with pytest.raises(SSEProtocolError):
        SSEDecoder(max_line_bytes=100).feed(line + b"x")


def test_limit_counts_utf8_bytes_not_characters() -> None:
    # 6 + 2 * 40 = 86 bytes but 46 characters: over a limit of 80 bytes.
    with pytest.raises(SSEProtocolError):
        SSEDecoder(max_line_bytes=80).feed("data: é".encode() + "é".encode() * 39 + b"\n")
    with pytest.raises(SSEProtocolError):
        decoder = SSEDecoder(max_line_bytes=80)
        for _ in range(41):  # 82 bytes, 41 characters
            decoder.feed("é".encode())
    assert SSEDecoder(max_line_bytes=86).feed(b"data: " + "é".encode() * 40 + b"\n\n")


def test_many_long_lines_under_the_limit_are_fine() -> None:
    payload = "y" * 5000
    stream = (f"data: {payload}\n\n" * 50).encode()
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    assert decode(*chunks) == [SSEEvent(payload)] * 50


def test_default_limit() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 1024 * 1024
    with pytest.raises(SSEProtocolError):
        SSEDecoder().feed(b"x" * (DEFAULT_MAX_LINE_BYTES + 1))
    with pytest.raises(ValueError):
        SSEDecoder(max_line_bytes=0)


def test_event_is_frozen() -> None:
    event = SSEEvent("a")
    assert (event.event, event.id, event.retry) == ("message", None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "b"  # type: ignore[misc]


def test_incremental_utf8_decoder_matches_one_shot() -> None:
    # The reference decodes in one go; the decoder incrementally: they must agree on bad bytes.
    stream = b"a\xe2\x82\xffb\xf0\x9f\x98c\xc3"
    for point in range(len(stream) + 1):
        incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = incremental.decode(stream[:point]) + incremental.decode(stream[point:], final=True)
        assert text == stream.decode("utf-8", errors="replace")


if hypothesis is not None:
    PIECES = [
        b"data",
        b"data:",
        b"data: ",
        b"event:",
        b"id:",
        b"retry:",
        b"foo",
        b":",
        b" ",
        b"x",
        b"42",
        b"\x00",
        b"\r",
        b"\n",
        b"\r\n",
        b"\xef\xbb\xbf",
        "é".encode(),
        "€".encode(),
        "😀".encode(),
        b"\xe2\x82",
        b"\xff",
    ]

    streams = st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(stream=streams, data=st.data())
    def test_random_chunking_matches_whole_and_reference(
        stream: bytes, data: st.DataObject
    ) -> None:
        points = sorted(
            data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="split points")
        )
        whole, whole_pending = decode_with_pending(stream)
        assert (whole, whole_pending) == reference(stream)
        assert decode_with_pending(*split_at(stream, points)) == (whole, whole_pending)

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(stream=st.binary(max_size=200), data=st.data())
    def test_random_bytes_never_break(stream: bytes, data: st.DataObject) -> None:
        points = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        assert decode_with_pending(*split_at(stream, points)) == reference(stream)


def test_an_event_of_many_short_lines_is_capped_as_a_whole() -> None:
    """Each line is short, but their sum is not: without a cap per event, one upstream event
    could grow the worker's memory without bound."""
    decoder = SSEDecoder(max_line_bytes=100, max_event_bytes=1000)
    assert decoder.feed(b"data: x\n" * 100 + b"\n")[0].data == "\n".join(["x"] * 100)
    with pytest.raises(SSEProtocolError, match="event is larger"):
        decoder.feed(b"data: 0123456789\n" * 100)
