"""Score against running vLLM OpenAI-compatible servers: the reference model as a shared service.

Requests send **token ids** (``"prompt": [ids]``), never text, with ``max_tokens: 1`` and
``prompt_logprobs``, so the server never re-tokenizes. The answer's
``choices[0].prompt_logprobs`` is ``None`` at position 0, then one ``{"<token id>": {"logprob",
"rank", "decoded_token"}}`` per position that always holds the actual token.

With ``signals``, requests ask for ``prompt_logprobs: top_k`` and the top-k entries give the
signal columns exactly as the in-process vLLM backend does
(:func:`profit_prep.scoring.top_k_signals`; entropy is a top-k lower bound). A server allows at
most its ``--max-logprobs`` (default 20); more is refused with the server's message.

Several URLs are used round-robin; requests in flight are bounded; connection errors, timeouts,
429 and 5xx are retried with exponential backoff; any other 4xx stops the run with the server's
message. The API key goes in the ``Authorization`` header only: it is never logged, never part of
``describe()`` (the manifest) and never in an error message.

Example:
    >>> scorer = ServerScorer(["http://127.0.0.1:8000"], api_key=None)  # doctest: +SKIP
    >>> scorer.check(tokenizer)  # doctest: +SKIP
    >>> [lp] = scorer.score([np.array([1, 504, 2783, 2])])  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scoring import describe_top_k_signals, parse_top_k_signals, top_k_signals

API_KEY_ENV = "PROFIT_PREP_API_KEY"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# Probe strings for the tokenizer check: digits, whitespace runs, unicode, code, markup.
PROBES = [
    "Hello, world! 12345 67.89",
    "  leading spaces\n\n\ttabs and newlines  ",
    "Ünïcödé — 日本語のテキスト 🙂",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nhi<|im_end|>",
]


class ServerError(InputError):
    """The server refused or could not be reached; the run can be resumed by rerunning."""


def _server_message(response: Any) -> str:
    """The server's own words: vLLM sends {"error": {"message"}}, auth layers {"error": "..."}."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            body = error.get("message") or error.get("detail") or error
        else:
            body = error
    return " ".join(str(body).split())[:300]


class ServerScorer:
    """Scores through one or more vLLM servers (``/v1/completions`` with ``prompt_logprobs``)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        max_in_flight: int = 16,
        timeout_s: float = 600.0,
        retries: int = 6,
        backoff_s: float = 1.0,
        signals: str | Sequence[str] | None = None,
        top_k: int = 20,
    ) -> None:
        if not urls:
            raise InputError("--server needs at least one URL")
        self.signals = parse_top_k_signals(signals, top_k)
        self.top_k = top_k
        self.urls = [u.rstrip("/") for u in urls]
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._next_url = itertools.cycle(self.urls)
        self.model = model or self._served_model()

    # -- plumbing ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _request(
        self, client: Any, method: str, path: str, body: Any = None, retries: int | None = None
    ) -> Any:
        """One request with retries; returns the decoded JSON body."""
        import httpx

        retries = self.retries if retries is None else retries
        url = ""
        for attempt in range(retries + 1):
            url = next(self._next_url) + path
            try:
                response = await client.request(method, url, json=body, headers=self._headers())
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                problem = f"{type(exc).__name__}"
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRY_STATUS:
                    raise ServerError(
                        f"server {url} answered {response.status_code}: "
                        f"{_server_message(response)}"
                    )
                problem = f"HTTP {response.status_code}"
            if attempt < retries:
                delay = min(30.0, self.backoff_s * 2**attempt) * (0.5 + random.random())
                await asyncio.sleep(delay)
        raise ServerError(
            f"server {url} failed after {retries + 1} tries ({problem}); "
            "check the URL, then rerun the same command to resume"
        )

    def _run(self, coroutine_factory: Any) -> Any:
        import httpx

        async def main() -> Any:
            limits = httpx.Limits(max_connections=self.max_in_flight)
            async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
                return await coroutine_factory(client)

        return asyncio.run(main())

    # -- checks -----------------------------------------------------------------------------

    def _served_model(self) -> str:
        models = self.served_models()
        if len(models) != 1:
            raise InputError(
                f"server serves {len(models)} models ({', '.join(models)}); "
                "name one with --server-model"
            )
        return models[0]

    def served_models(self) -> list[str]:
        # Few retries: a wrong URL at start-up should fail in seconds, not minutes.
        body = self._run(lambda c: self._request(c, "GET", "/v1/models", retries=1))
        return [m["id"] for m in body.get("data", [])]

    def check(self, tokenizer: Any, expected_model: str | None = None) -> None:
        """Refuse a server that serves another model or tokenizes differently from the trainer."""
        served = self.served_models()
        if self.model not in served:
            raise InputError(
                f"server does not serve model {self.model!r} (it serves: {', '.join(served)})"
            )
        if expected_model is not None and expected_model != self.model:
            raise InputError(f"server model {self.model!r} is not the expected {expected_model!r}")

        async def tokenize_all(client: Any) -> list[list[int]]:
            bodies = [
                {"model": self.model, "prompt": p, "add_special_tokens": False} for p in PROBES
            ]
            answers = await asyncio.gather(
                *(self._request(client, "POST", "/tokenize", b) for b in bodies)
            )
            return [a["tokens"] for a in answers]

        for probe, theirs in zip(PROBES, self._run(tokenize_all)):
            ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
            if list(theirs) != list(ours):
                raise InputError(
                    f"the server's tokenizer differs from the trainer's on {probe!r}: "
                    f"server {theirs[:12]} vs trainer {ours[:12]}"
                )

    # -- scoring ----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        # Never the API key: this goes into the manifest.
        return {"backend": "server", "model": self.model, "servers": len(self.urls),
                **describe_top_k_signals(self.signals, self.top_k)}

    def close(self) -> None:
        pass

    def _prompt_logprobs(self, sequences: Sequence[np.ndarray], k: int) -> list[list[Any]]:
        """The servers' ``prompt_logprobs`` of every sequence, ``k`` top entries per position."""

        async def score_all(client: Any) -> list[list[Any]]:
            gate = asyncio.Semaphore(self.max_in_flight)

            async def one(seq: np.ndarray) -> list[Any]:
                body = {
                    "model": self.model,
                    "prompt": [int(t) for t in seq],
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "prompt_logprobs": k,
                }
                async with gate:
                    answer = await self._request(client, "POST", "/v1/completions", body)
                return answer["choices"][0]["prompt_logprobs"]  # checked by the caller

            return list(await asyncio.gather(*(one(s) for s in sequences)))

        return self._run(score_all)

    def score(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [
            parse_prompt_logprobs(entries, seq)
            for seq, entries in zip(sequences, self._prompt_logprobs(sequences, 0))
        ]

    def score_with_signals(self, sequences: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per sequence: ``logprobs`` plus the signal columns, as the vLLM backend computes them.

        Example:
            >>> s = ServerScorer(["http://127.0.0.1:8000"], signals="rank")  # doctest: +SKIP
            >>> sorted(s.score_with_signals([np.array([1, 2, 3])])[0])  # doctest: +SKIP
            ['logprobs', 'rank']
        """
        if not self.signals:
            return [{"logprobs": lp} for lp in self.score(sequences)]
        result = []
        for seq, entries in zip(sequences, self._prompt_logprobs(sequences, self.top_k)):
            per_position = [
                {int(tid): (v["logprob"], v.get("rank")) for tid, v in entry.items()}
                if entry
                else None
                for entry in entries
            ]
            try:
                result.append(top_k_signals(seq, per_position, self.top_k, self.signals))
            except RuntimeError as exc:
                raise ServerError(f"server answer: {exc}") from None
        return result


def parse_prompt_logprobs(entries: list[Any], ids: np.ndarray) -> np.ndarray:
    """The actual token's logprob at every position (NaN at 0) from a server's answer."""
    if len(entries) != len(ids):
        raise ServerError(f"server returned {len(entries)} prompt logprobs for {len(ids)} tokens")
    out = np.full(len(ids), np.nan, dtype=np.float32)
    for t in range(1, len(ids)):
        entry = entries[t] or {}
        actual = entry.get(str(int(ids[t])))
        if actual is None:
            raise ServerError(f"server answer lacks the actual token {int(ids[t])} at position {t}")
        out[t] = actual["logprob"]
    return out
