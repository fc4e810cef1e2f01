"""The grammar and length limit of every identifier a caller chooses: model names, versions, request and message
ids, tensor names. Each one reaches audit records, log lines or reply headers, so each is checked here before any
of them is recorded: by the call boundary for headers, by the pipeline for message fields, whatever the protocol.

Text that fails a check is refused with INVALID_ARGUMENT, and what is shown of it (``shown``) is a short, escaped
prefix: neither a record nor a message grows with what a caller sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import InvalidArgumentError

SHOWN_CHARS = 64


def shown(text: str) -> str:
    """Caller text as a message may show it: its first ``SHOWN_CHARS`` characters, escaped unless they are all
    printable ASCII (``\\n``, ``\\x00``, ``\\u2028``, ``\\\\``), with ``...`` when cut."""
    head = text[:SHOWN_CHARS]
    if not (head.isascii() and head.isprintable()) or "\\" in head:
        head = head.encode("unicode_escape").decode("ascii")
    return head if len(text) <= SHOWN_CHARS else head + "..."


@dataclass(frozen=True, slots=True)
class Grammar:
    """What one kind of identifier may hold: characters matched in full (never ``re.match`` with ``$``, which also
    accepts a final newline) and a length limit, checked first so that a huge value is never scanned."""

    pattern: re.Pattern[str]
    max_chars: int
    summary: str  # the characters, in words, for messages and docs

    def allows(self, text: str) -> bool:
        """Whether ``text`` is a well-formed identifier of this kind."""
        return 0 < len(text) <= self.max_chars and self.pattern.fullmatch(text) is not None

    def check(self, text: str, field: str) -> str:
        """``text``, or InvalidArgumentError naming ``field`` and what is wrong (the limit, or the characters)."""
        if not text:
            raise InvalidArgumentError(f"{field} is required")
        if len(text) > self.max_chars:
            raise InvalidArgumentError(f"{field} is {len(text)} characters long, over the limit of {self.max_chars}")
        if self.pattern.fullmatch(text) is None:
            raise InvalidArgumentError(f"{field} '{shown(text)}' is not made of {self.summary}")
        return text


# Model names are folder names in the repository; versions may be strings in other protocols (OIP), so they share
# the grammar rather than being held to digits here (a version that is not a number is simply not found).
NAME = Grammar(
    re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*"),
    128,
    "letters, digits, '_', '.' and '-' (starting with a letter or digit)",
)
# Request ids go back to the caller in a trailer: a subset of what HTTP/2 allows in a header value (RFC 9113 8.2.1).
# Tensor names include what exporters write (``input_1:0``, ``onnx::Gemm_0``, ``serving_default/x``).
ID = Grammar(re.compile(r"[A-Za-z0-9._:/-]+"), 128, "letters, digits, '.', '_', ':', '/' and '-'")
