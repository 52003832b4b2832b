"""worker.chunked: HTTP/1.1 chunked coding decoded however the bytes are split."""

from __future__ import annotations

import pytest

from worker.chunked import ChunkedDecoder, ChunkedError

BODY = b"5\r\nhello\r\n1;name=value\r\n \r\nB\r\nchunked !!!\r\n0\r\nTrailer: x\r\n\r\n"
PAYLOAD = b"hello chunked !!!"


def decode(pieces: list[bytes]) -> tuple[bytes, bool]:
    decoder = ChunkedDecoder()
    return b"".join(decoder.feed(piece) for piece in pieces), decoder.done


def test_a_whole_body_in_one_piece() -> None:
    assert decode([BODY]) == (PAYLOAD, True)


@pytest.mark.parametrize("cut", range(1, len(BODY)))
def test_a_body_split_anywhere_decodes_the_same(cut: int) -> None:
    assert decode([BODY[:cut], BODY[cut:]]) == (PAYLOAD, True)


def test_a_body_fed_byte_by_byte() -> None:
    assert decode([BODY[i : i + 1] for i in range(len(BODY))]) == (PAYLOAD, True)


def test_nothing_after_the_last_chunk_is_payload() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nab\r\n0\r\n\r\nGET / HTTP/1.1\r\n") == b"ab"
    assert decoder.done and decoder.feed(b"3\r\nxyz\r\n") == b""


@pytest.mark.parametrize("cut", range(1, len(BODY)))
def test_the_very_end_is_seen_however_split_and_nothing_after_it(cut: int) -> None:
    decoder = ChunkedDecoder()
    decoder.feed(BODY[:cut])
    decoder.feed(BODY[cut:])
    assert decoder.complete and decoder.extra == b""  # the connection may carry another request


def test_bytes_after_the_end_or_a_missing_blank_line_keep_a_connection_from_reuse() -> None:
    after = ChunkedDecoder()
    after.feed(b"2\r\nab\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert after.complete and after.extra == b"HTTP/1.1 200 OK\r\n"
    unfinished = ChunkedDecoder()
    unfinished.feed(b"2\r\nab\r\n0\r\n")
    assert unfinished.done and not unfinished.complete


def test_an_unfinished_body_is_not_done() -> None:
    assert decode([b"5\r\nhel"]) == (b"hel", False)


@pytest.mark.parametrize(
    "body",
    [
        b"x\r\n",
        b"-1\r\n",
        b"\r\n",
        b"1 2\r\n",
        b"5\r\nhelloXX",
        b"5\r\nhello\rX",
        b"1" * 17 + b"\r\n",
    ],
    ids=["not-hex", "negative", "empty", "space-inside", "no-crlf", "half-crlf", "too-big"],
)
def test_bad_framing_is_an_error(body: bytes) -> None:
    with pytest.raises(ChunkedError):
        ChunkedDecoder().feed(body)


def test_a_size_line_without_end_is_not_buffered_forever() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"1" * 4000)
    with pytest.raises(ChunkedError):
        decoder.feed(b"1" * 200)
