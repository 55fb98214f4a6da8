"""Reading a vLLM server's answer under a cap on its decoded size
(:mod:`profit_prep.scorers.vllm_server`): a gzip bomb or a runaway server never fills memory.
The cap is derived from the request (:func:`answer_cap`); gzip/deflate are inflated here with
an output bound."""

from __future__ import annotations

import zlib
from typing import Any

from profit_prep.scorers.server_answers import ServerError, clean_text

# Decoded bytes an answer may hold, derived from the request: a prompt_logprobs answer has at
# most k + 1 entries per token, each ~85 bytes of JSON ({"id": {"logprob", "rank",
# "decoded_token"}}) plus the token's text, escaped: 320 bytes leaves room for long tokens. Every
# answer may also hold ANSWER_FLOOR_BYTES (model lists, tokenize answers, the envelope). Beyond
# its cap an answer stops the run (a gzip bomb or a runaway server never fills memory).
ANSWER_BYTES_PER_ENTRY = 320
ANSWER_FLOOR_BYTES = 4 << 20
# Content encodings an answer may use (asked for in Accept-Encoding, decoded here under the cap).
ENCODINGS = {"gzip": 47, "x-gzip": 47, "deflate": 47}  # zlib wbits: gzip or zlib header


class AnswerTooLarge(ServerError):
    """An answer whose decoded size passed its cap."""


def answer_cap(n_tokens: int, k: int) -> int:
    """Decoded bytes a ``prompt_logprobs`` answer for ``n_tokens`` tokens and top ``k`` may take.

    >>> answer_cap(8192, 20) // (1 << 20)
    56
    """
    return ANSWER_FLOOR_BYTES + n_tokens * (k + 1) * ANSWER_BYTES_PER_ENTRY


async def read_capped(response: Any, cap: int, strict: bool) -> bytes:
    """The decoded body of a streamed httpx ``response``, never holding more than ``cap`` + one
    network chunk: gzip/deflate are inflated here with an output bound (httpx would inflate a
    whole chunk at once: 64 KiB of a gzip bomb is ~64 MB). Past ``cap``: AnswerTooLarge when
    ``strict``, else the first ``cap`` bytes."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity") and encoding not in ENCODINGS:
        raise ServerError(f"its answer is encoded as {clean_text(encoding, 40)!r}, which was "
                          "not asked for (gzip, deflate)")
    wbits = ENCODINGS.get(encoding)
    decoder = zlib.decompressobj(wbits) if wbits else None
    body = bytearray()
    async for raw in response.aiter_raw():
        pending = raw
        while pending:
            if decoder is None:
                body += pending[: cap + 1 - len(body)]
                pending = b""
            else:
                try:
                    body += decoder.decompress(pending, cap + 1 - len(body))
                except zlib.error as exc:
                    raise ServerError(f"its {encoding} answer does not decode ({exc})") from None
                if decoder.eof:  # a gzip stream may hold several members
                    pending = decoder.unused_data
                    decoder = zlib.decompressobj(wbits) if pending else decoder
                else:
                    pending = decoder.unconsumed_tail
            if len(body) > cap:
                if not strict:
                    return bytes(body[:cap])
                raise AnswerTooLarge(
                    f"its answer passed {cap:,} bytes decoded, more than the request can need "
                    "(tokens x (top-k + 1) entries, docs/server.md)"
                )
    return bytes(body)
