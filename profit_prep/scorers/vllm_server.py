"""Score against running vLLM OpenAI-compatible servers: the reference model as a shared service.

Requests send **token ids** (``"prompt": [ids]``), never text, with ``max_tokens: 1`` and
``prompt_logprobs``, so the server never re-tokenizes. The answer's
``choices[0].prompt_logprobs`` is ``None`` at position 0, then one ``{"<token id>": {"logprob",
"rank", "decoded_token"}}`` per position that always holds the actual token.

With ``signals``, requests ask for ``prompt_logprobs: top_k`` and the top-k entries give the
signal columns exactly as the in-process vLLM backend does
(:func:`profit_prep.scorers.top_k.top_k_signals`; entropy is a top-k lower bound). A server allows
at
most its ``--max-logprobs`` (default 20); more is refused with the server's message.

Several URLs are used round-robin (``http://host:port``, ``.../`` and ``.../v1`` name the same
server: :func:`profit_prep.scorers.server_answers.normalize_server_url`); requests in flight are
bounded;
connection errors, 429 and 5xx are retried with exponential backoff; any other 4xx or 3xx stops the
run with the server's message. Each try of a request is bounded as a whole (connect to last byte)
by ``timeout_s``; a request that times out is tried once more, then the run stops, so a hung server
ends the run within about ``2 * timeout_s``, with a ``waiting for ...`` line on stderr while it
waits. Every answer is checked in one place (:mod:`profit_prep.scorers.server_answers`): a body
that is not
the expected JSON, or a log-probability that is NaN, +inf, positive or not a number, stops the run
with one line naming the server and what was wrong. The API key goes in the ``Authorization``
header only: it is never logged, never part of ``describe()`` (the manifest) and never in an error
message (server text quoted in messages is cut to 200 characters, control characters removed, the
key masked); so is a URL's ``user:password@``
(:func:`profit_prep.scorers.server_answers.redact_url`).
Every answer is read under a cap on its decoded size derived from the request
(:func:`answer_cap`; gzip inflated here under that bound), and a 429/503 ``Retry-After`` is
waited out (at most ``RETRY_AFTER_MAX_S`` a try).

Example:
    >>> scorer = ServerScorer(["http://127.0.0.1:8000"], api_key=None)  # doctest: +SKIP
    >>> scorer.check(tokenizer)  # doctest: +SKIP
    >>> [lp] = scorer.score([np.array([1, 504, 2783, 2])])  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scorers.server_answers import (
    Answer,
    BadLogprob,
    Entries,
    ServerError,
    check_completion,
    check_models,
    check_tokens,
    clean_text,
    display,
    names,
    normalize_server_url,
    retry_after_s,
    server_message,
    url_secrets,
)
from profit_prep.scorers.server_reading import (
    ANSWER_FLOOR_BYTES,
    ENCODINGS,
    AnswerTooLarge,
    answer_cap,
    read_capped,
)
from profit_prep.scorers.top_k import TopKScorer, describe_top_k_signals, parse_top_k_signals

if TYPE_CHECKING:
    from profit_prep.config import ScoreConfig
    from profit_prep.scorers.base import Preflight

API_KEY_ENV = "PROFIT_PREP_API_KEY"
TIMEOUT_STATUS = {408, 504}  # the server (or a proxy) says the request timed out
RETRY_STATUS = {429, 500, 502, 503} | TIMEOUT_STATUS
DEFAULT_TIMEOUT_S = 300.0
# Tries of one request that may time out before the run stops: a hung server ends the run within
# about TIMEOUT_TRIES * timeout_s (plus a few seconds of backoff), not retries * timeout_s.
TIMEOUT_TRIES = 2
# Of an error answer (4xx/5xx) only the message is quoted: the rest is not read.
ERROR_BODY_BYTES = 64 << 10
# The longest wait a Retry-After (429/503) is granted, per try.
RETRY_AFTER_MAX_S = 120.0

# Probe strings for the tokenizer check: digits, whitespace runs, unicode, code, markup.
PROBES = [
    "Hello, world! 12345 67.89",
    "  leading spaces\n\n\ttabs and newlines  ",
    "Ünïcödé — 日本語のテキスト 🙂",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nhi<|im_end|>",
]


async def gather_or_cancel(*awaitables: Any) -> list[Any]:
    """``asyncio.gather``, but the first failure cancels the other requests and collects their
    outcomes before it is raised: asyncio would otherwise print each unretrieved failure (a
    traceback per request) when the loop shuts down, around the one error line."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ServerScorer(TopKScorer):
    """Scores through one or more vLLM servers (``/v1/completions`` with ``prompt_logprobs``)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        max_in_flight: int = 16,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 6,
        backoff_s: float = 1.0,
        notice_s: float | None = None,
        signals: str | Sequence[str] | None = None,
        top_k: int = 20,
    ) -> None:
        if isinstance(urls, str):
            urls = urls.split(",")
        urls = [u for u in urls if u.strip()]
        if not urls:
            raise InputError("--server needs at least one URL")
        if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < math.inf):
            raise InputError(f"--request-timeout must be a positive number of seconds, "
                             f"got {timeout_s}")
        self.signals = parse_top_k_signals(signals, top_k)
        self.top_k = top_k
        self.urls = list(dict.fromkeys(normalize_server_url(u) for u in urls))
        self._names = {u: display(u) for u in self.urls}
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        # Everything a message must never show: the key, and any user:password of a URL.
        self._secrets = tuple(sorted(
            {s for u in urls for s in url_secrets(u)} | ({self.api_key} if self.api_key else set()),
            key=len, reverse=True))
        self.max_in_flight = max_in_flight
        self.timeout_s = float(timeout_s)
        # How often a line tells the user we are still waiting (every 30 s by default).
        self.notice_s = notice_s if notice_s is not None else min(30.0, self.timeout_s / 2)
        self.retries = retries
        self.backoff_s = backoff_s
        self._next_url = itertools.cycle(self.urls)
        self._waiting: dict[object, tuple[str, float]] = {}
        self.model = model or self._served_model()

    @classmethod
    def from_config(cls, config: ScoreConfig) -> ServerScorer:
        """The scorer ``--server`` and its options describe."""
        return cls(config.server or "", model=config.server_model, api_key=config.api_key,
                   max_in_flight=config.max_in_flight, timeout_s=config.request_timeout,
                   signals=config.signals, top_k=config.signals_top_k)

    @classmethod
    def preflight(cls, config: ScoreConfig, model_dir: Path, tokenizer: Any,
                  started: dict[str, Any]) -> Preflight:
        """The reference model lives on the server: check it serves the expected model and
        tokenizes like the trainer, and probe it, before any row is scored."""
        from profit_prep.scorers.server_probe import check_server

        return check_server(cls.from_config(config), config, model_dir, tokenizer, started)

    # -- plumbing ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": ", ".join(e for e in ENCODINGS if not e.startswith("x-"))}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _error(self, message: str) -> ServerError:
        """A ServerError whose text never holds the API key or a URL's password, whatever the
        server echoed."""
        return ServerError(clean_text(message, limit=10_000, secret=self._secrets))

    async def _fetch(
        self, client: Any, method: str, url: str, body: Any, cap: int
    ) -> Answer:
        """One try: the answer streamed and read under ``cap`` (an error answer under
        ERROR_BODY_BYTES, only its message is quoted)."""
        async with client.stream(method, url, json=body, headers=self._headers()) as response:
            ok = 200 <= response.status_code < 300
            content = await read_capped(response, cap if ok else ERROR_BODY_BYTES, strict=ok)
            return Answer(response.status_code, response.headers, content)

    async def _request(
        self,
        client: Any,
        method: str,
        path: str,
        body: Any = None,
        retries: int | None = None,
        check: Callable[[Any], Any] | None = None,
        cap: int = ANSWER_FLOOR_BYTES,
    ) -> Any:
        """One request with retries; returns the decoded JSON body, passed through ``check``.

        Each try is bounded as a whole by ``timeout_s``; ``TIMEOUT_TRIES`` timeouts end it. The
        answer is read under ``cap`` decoded bytes (:func:`read_capped`). A 429 or 503 with
        ``Retry-After`` waits what it asks (at most RETRY_AFTER_MAX_S) before the next try.
        """
        import httpx

        retries = self.retries if retries is None else retries
        timeouts, problem, name = 0, "", ""
        for attempt in itertools.count():
            base = next(self._next_url)
            name = self._names[base]
            ticket = object()
            self._waiting[ticket] = (name, time.monotonic())
            asked: float | None = None
            try:
                response = await asyncio.wait_for(
                    self._fetch(client, method, base + path, body, cap), self.timeout_s
                )
            except AnswerTooLarge as exc:
                raise self._error(
                    f"server {name} sent too much in answer to {method} {path}: {exc}; is it "
                    "the vLLM OpenAI server itself?"
                ) from None
            except ServerError as exc:  # an encoding it was not asked for, or bad gzip
                raise self._error(f"server {name} sent an unreadable answer to {method} {path}: "
                                  f"{exc}") from None
            except (asyncio.TimeoutError, httpx.TimeoutException):
                timeouts += 1
                problem = f"no complete answer in {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                problem = type(exc).__name__
            except httpx.HTTPError as exc:  # e.g. a body that does not decode as it says
                raise self._error(
                    f"server {name} sent an unreadable answer to {method} {path}: "
                    f"{clean_text(exc, secret=self._secrets)}"
                ) from None
            else:
                if 200 <= response.status_code < 300:
                    return self._decode(response, name, method, path, check)
                problem, timed_out, asked = self._retryable(response, name, method, path)
                timeouts += timed_out
            finally:
                del self._waiting[ticket]
            if timeouts >= TIMEOUT_TRIES:
                raise self._error(
                    f"server {name} did not answer {method} {path} within the request timeout "
                    f"({problem}, {timeouts} tries): check the server, or raise "
                    "--request-timeout if it is only slow; rerun the same command to resume"
                )
            if attempt >= retries:
                break
            delay = min(30.0, self.backoff_s * 2**attempt) * (0.5 + random.random())
            if asked is not None:  # the server said when: neither sooner nor unboundedly later
                delay = min(asked, RETRY_AFTER_MAX_S)
                capped = f" (waiting at most {RETRY_AFTER_MAX_S:g} s)" if asked > delay else ""
                print(f"waiting for {name}: {problem} asks to retry after {asked:g} s{capped}",
                      file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
        raise self._error(
            f"server {name} failed after {retries + 1} tries ({problem}); "
            "check the URL, then rerun the same command to resume"
        )

    def _retryable(
        self, response: Any, name: str, method: str, path: str
    ) -> tuple[str, bool, float | None]:
        """A non-2xx answer: stop on one no retry fixes (a redirect, most 4xx); else the
        problem, whether the server timed out, and the wait its ``Retry-After`` asks, if any."""
        status = response.status_code
        if 300 <= status < 400:
            where = clean_text(response.headers.get("location", "nowhere"), 120, self._secrets)
            raise self._error(
                f"server {name} answered {method} {path} with {status}, a redirect to "
                f"{where}; redirects are not followed: give --server the address that "
                "serves the API itself"
            )
        if status not in RETRY_STATUS:
            raise self._error(
                f"server {name} answered {status}: {server_message(response, self._secrets)}"
            )
        asked = retry_after_s(response.headers.get("retry-after")) if status in (429, 503) else None
        return f"HTTP {status}", status in TIMEOUT_STATUS, asked

    def _decode(
        self, response: Any, name: str, method: str, path: str,
        check: Callable[[Any], Any] | None,
    ) -> Any:
        """The one place an answer's body is parsed and its shape checked."""
        try:
            body = json.loads(response.content)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            kind = clean_text(response.headers.get("content-type", "no content type"), 60)
            try:
                shown = repr(clean_text(response.content.decode("utf-8"), secret=self._secrets))
            except UnicodeDecodeError:  # binary: show its first bytes escaped
                shown = f"{len(response.content)} bytes, not text: {response.content[:32]!r}"
            raise self._error(
                f"server {name} answered {method} {path} with something that is not JSON "
                f"({kind}: {shown}); is it the vLLM OpenAI server itself?"
            ) from None
        if check is None:
            return body
        try:
            return check(body)
        except ServerError as exc:
            remedy = (
                "check the model and its dtype on the server (float16 can overflow)"
                if isinstance(exc, BadLogprob)
                else "is it the vLLM OpenAI server itself?"
            )
            raise self._error(
                f"server {name} gave an unusable answer to {method} {path}: {exc}; {remedy}"
            ) from None

    async def _watch(self) -> None:
        """Every ``notice_s``, one line per server that has kept a request waiting that long."""
        while True:
            await asyncio.sleep(self.notice_s)
            now = time.monotonic()
            oldest: dict[str, float] = {}
            for name, started in list(self._waiting.values()):
                oldest[name] = min(oldest.get(name, now), started)
            for name, started in oldest.items():
                waited = now - started
                if waited >= self.notice_s:
                    shown = f"{waited:.0f}" if waited >= 10 else f"{waited:.1f}"
                    print(f"waiting for {name}: no answer for {shown} s (request timeout "
                          f"{self.timeout_s:g} s)", file=sys.stderr, flush=True)

    def _run(self, coroutine_factory: Any) -> Any:
        import httpx

        async def main() -> Any:
            limits = httpx.Limits(max_connections=self.max_in_flight)
            self._waiting = {}
            watch = asyncio.ensure_future(self._watch())
            try:
                async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
                    return await coroutine_factory(client)
            finally:
                watch.cancel()

        return asyncio.run(main())

    # -- checks -----------------------------------------------------------------------------

    def _served_model(self) -> str:
        models = self.served_models()
        if len(models) != 1:
            raise InputError(
                f"server serves {len(models)} models ({names(models)}); "
                "name one with --server-model"
            )
        return models[0]

    def served_models(self) -> list[str]:
        # Few retries: a wrong URL at start-up should fail in seconds, not minutes.
        return self._run(
            lambda c: self._request(c, "GET", "/v1/models", retries=1, check=check_models)
        )

    def check(self, tokenizer: Any, expected_model: str | None = None) -> None:
        """Refuse a server that serves another model or tokenizes differently from the trainer."""
        served = self.served_models()
        if self.model not in served:
            raise InputError(
                f"server does not serve model {self.model!r} (it serves: {names(served)})"
            )
        if expected_model is not None and expected_model != self.model:
            raise InputError(f"server model {self.model!r} is not the expected {expected_model!r}")

        async def tokenize_all(client: Any) -> list[list[int]]:
            bodies = [
                {"model": self.model, "prompt": p, "add_special_tokens": False} for p in PROBES
            ]
            return list(await gather_or_cancel(
                *(self._request(client, "POST", "/tokenize", b, check=check_tokens)
                  for b in bodies)
            ))

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

    backend = "server"

    def prompt_logprobs(self, sequences: Sequence[np.ndarray], k: int) -> list[Entries]:
        """The servers' checked ``prompt_logprobs`` of every sequence, ``k`` top entries each."""

        async def score_all(client: Any) -> list[Entries]:
            gate = asyncio.Semaphore(self.max_in_flight)

            async def one(seq: np.ndarray) -> Entries:
                body = {
                    "model": self.model,
                    "prompt": [int(t) for t in seq],
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "prompt_logprobs": k,
                }
                async with gate:
                    return await self._request(client, "POST", "/v1/completions", body,
                                               check=lambda answer: check_completion(answer, seq),
                                               cap=answer_cap(len(seq), k))

            return list(await gather_or_cancel(*(one(s) for s in sequences)))

        return self._run(score_all)

    def answer_error(self, exc: RuntimeError) -> Exception:
        return ServerError(f"server answer: {exc}")
