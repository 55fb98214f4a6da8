"""Score against running vLLM OpenAI-compatible servers: the reference model as a shared service.

Requests send **token ids** (``"prompt": [ids]``), never text, with ``max_tokens: 1`` and
``prompt_logprobs``, so the server never re-tokenizes. The answer's
``choices[0].prompt_logprobs`` is ``None`` at position 0, then one ``{"<token id>": {"logprob",
"rank", "decoded_token"}}`` per position that always holds the actual token.

With ``signals``, requests ask for ``prompt_logprobs: top_k`` and the top-k entries give the
signal columns exactly as the in-process vLLM backend does
(:func:`profit_prep.scoring.top_k_signals`; entropy is a top-k lower bound). A server allows at
most its ``--max-logprobs`` (default 20); more is refused with the server's message.

Several URLs are used round-robin (``http://host:port``, ``.../`` and ``.../v1`` name the same
server: :func:`normalize_server_url`); requests in flight are bounded; connection errors, 429 and
5xx are retried with exponential backoff; any other 4xx or 3xx stops the run with the server's
message. Each try of a request is bounded as a whole (connect to last byte) by ``timeout_s``; a
request that times out is tried once more, then the run stops, so a hung server ends the run
within about ``2 * timeout_s``, with a ``waiting for ...`` line on stderr while it waits. Every
answer is checked in one place (:func:`check_completion` and friends): a body that is not the
expected JSON, or a log-probability that is NaN, +inf, positive or not a number, stops the run
with one line naming the server and what was wrong. The API key goes in the ``Authorization``
header only: it is never logged, never part of ``describe()`` (the manifest) and never in an
error message (server text quoted in messages is cut to 200 characters, control characters
removed, the key masked).

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
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.top_k import TopKScorer, describe_top_k_signals, gold_logprobs, parse_top_k_signals

API_KEY_ENV = "PROFIT_PREP_API_KEY"
TIMEOUT_STATUS = {408, 504}  # the server (or a proxy) says the request timed out
RETRY_STATUS = {429, 500, 502, 503} | TIMEOUT_STATUS
DEFAULT_TIMEOUT_S = 300.0
# Tries of one request that may time out before the run stops: a hung server ends the run within
# about TIMEOUT_TRIES * timeout_s (plus a few seconds of backoff), not retries * timeout_s.
TIMEOUT_TRIES = 2
# Largest log-probability accepted: fp32 log-softmax can round a near-certain token slightly
# above 0 (~1e-6); anything further up is not a log-probability.
LOGPROB_EPS = 1e-3
# Probe strings for the tokenizer check: digits, whitespace runs, unicode, code, markup.
PROBES = [
    "Hello, world! 12345 67.89",
    "  leading spaces\n\n\ttabs and newlines  ",
    "Ünïcödé — 日本語のテキスト 🙂",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nhi<|im_end|>",
]

# Checked prompt logprobs: per position, token id -> (logprob, rank or None); None at position 0.
Entries = list[dict[int, tuple[float, int | None]] | None]


class ServerError(InputError):
    """The server refused or could not be reached; the run can be resumed by rerunning."""


class BadLogprob(ServerError):
    """A well-formed answer whose log-probability is NaN, +inf or above 0: a model problem."""


def clean_text(text: Any, limit: int = 200, secret: str | None = None) -> str:
    r"""Server text fit for a one-line message: ``secret`` masked, control characters removed,
    whitespace collapsed, cut to ``limit`` characters.

    >>> clean_text("bad\x1b[31m  thing\n\x00" + "x" * 300, limit=20)
    'bad [31m thing xx...'
    """
    text = str(text)
    if secret:
        text = text.replace(secret, "***")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalize_server_url(url: str) -> str:
    """One spelling per server: ``http://h:8000``, ``http://h:8000/``, ``http://h:8000/v1`` and
    ``http://h:8000/v1/`` all give ``http://h:8000`` (request paths like ``/v1/models`` are added
    to it). A path prefix before ``/v1`` (a gateway) is kept.

    >>> normalize_server_url(" HTTP://gpu-a:8000/v1/ ")
    'http://gpu-a:8000'
    >>> normalize_server_url("https://gateway.example/team-a/v1")
    'https://gateway.example/team-a'
    """
    text = url.strip()
    shown = clean_text(text, 100)
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise InputError(f"--server {shown!r} is not a valid URL (e.g. http://host:8000)") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputError(
            f"--server {shown!r} is not an http:// or https:// URL (e.g. http://host:8000)"
        )
    if parts.query or parts.fragment:
        raise InputError(f"--server {shown!r}: give the server's address without ?query or #part")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")].rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc}{path}"


def _display(url: str) -> str:
    """A server URL for messages: without any user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")


def _names(models: Sequence[str]) -> str:
    """Model names from a server, fit for a message."""
    return clean_text(", ".join(models), 200)


def _server_message(response: Any, secret: str | None = None) -> str:
    """The server's own words: vLLM sends {"error": {"message"}}, auth layers {"error": "..."}."""
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        body = response.text
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            body = error.get("message") or error.get("detail") or error
        else:
            body = error
    return clean_text(body, secret=secret)


# -- checking answers: every answer body goes through one of these ----------------------------


def check_models(body: Any) -> list[str]:
    """The model names in a ``GET /v1/models`` answer."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
    ):
        raise ServerError(
            f"expected {{\"data\": [{{\"id\": MODEL}}, ...]}}, got {clean_text(body, 100)}"
        )
    return [m["id"] for m in data]


def check_tokens(body: Any) -> list[int]:
    """The token ids in a ``POST /tokenize`` answer."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise ServerError(f"expected {{\"tokens\": [ids]}}, got {clean_text(body, 100)}")
    return tokens


def _logprob(value: Any, where: str) -> float:
    """A log-probability from a server, or ServerError: not NaN, not +inf, not above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServerError(
            f"logprob {clean_text(repr(value), 40)} at {where} is {_kind(value)}, not a number"
        )
    x = float(value)
    if math.isnan(x):
        raise BadLogprob(f"logprob NaN at {where}")
    if x > LOGPROB_EPS:
        raise BadLogprob(f"logprob {x:g} at {where} is above 0 (not a log-probability)")
    return x


def _rank(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ServerError(f"rank {clean_text(repr(value), 40)} at {where} is not a rank >= 1")
    return value


def check_prompt_logprobs(entries: Any, ids: Sequence[int] | np.ndarray) -> Entries:
    """Checked ``prompt_logprobs`` of ``ids``: every position after 0 maps token ids to a
    ``(logprob, rank)`` that is a real log-probability, and holds the actual token."""
    n = len(ids)
    if not isinstance(entries, list):
        raise ServerError(f"prompt_logprobs is {_kind(entries)}, not a list")
    if len(entries) != n:
        raise ServerError(f"{len(entries)} prompt logprobs for {n} tokens sent")
    out: Entries = [None]
    for t in range(1, n):
        entry = entries[t]
        if not isinstance(entry, dict) or not entry:
            raise ServerError(
                f"prompt_logprobs[{t}] is {_kind(entry) if entry != {} else 'empty'}, "
                "not an object of token id -> logprob"
            )
        parsed: dict[int, tuple[float, int | None]] = {}
        for key, value in entry.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ServerError(
                    f"prompt_logprobs[{t}] has the key {clean_text(key, 40)!r}, not a token id"
                )
            where = f"position {t} (token {int(key)})"
            if not isinstance(value, dict) or "logprob" not in value:
                raise ServerError(f"no logprob at {where}: {clean_text(value, 60)}")
            parsed[int(key)] = (_logprob(value["logprob"], where), _rank(value.get("rank"), where))
        gold = int(ids[t])
        if gold not in parsed:
            raise ServerError(f"the answer lacks the actual token {gold} at position {t}")
        out.append(parsed)
    return out


def check_completion(body: Any, ids: Sequence[int] | np.ndarray) -> Entries:
    """The checked ``choices[0].prompt_logprobs`` of a ``POST /v1/completions`` answer."""
    if not isinstance(body, dict):
        raise ServerError(f"the answer is {_kind(body)}, not an object with 'choices'")
    choices = body.get("choices")
    if not isinstance(choices, list):
        error = body.get("error")
        if isinstance(error, dict):
            error = error.get("message", error)
        said = f" (it says: {clean_text(error, 100)})" if error is not None else ""
        raise ServerError(f"the answer has no 'choices' list{said}")
    if not choices or not isinstance(choices[0], dict):
        raise ServerError("the answer's 'choices' is empty" if not choices
                          else f"choices[0] is {_kind(choices[0])}, not an object")
    if choices[0].get("prompt_logprobs") is None:
        raise ServerError(
            "choices[0] has no prompt_logprobs (vLLM's OpenAI server returns them; "
            "other servers may not)"
        )
    return check_prompt_logprobs(choices[0]["prompt_logprobs"], ids)


def parse_prompt_logprobs(entries: list[Any], ids: np.ndarray) -> np.ndarray:
    """The actual token's logprob at every position (NaN at 0) from a server's answer."""
    return gold_logprobs(check_prompt_logprobs(entries, ids), ids)[0]


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
        self._names = {u: _display(u) for u in self.urls}
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.max_in_flight = max_in_flight
        self.timeout_s = float(timeout_s)
        # How often a line tells the user we are still waiting (every 30 s by default).
        self.notice_s = notice_s if notice_s is not None else min(30.0, self.timeout_s / 2)
        self.retries = retries
        self.backoff_s = backoff_s
        self._next_url = itertools.cycle(self.urls)
        self._waiting: dict[object, tuple[str, float]] = {}
        self.model = model or self._served_model()

    # -- plumbing ---------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _error(self, message: str) -> ServerError:
        """A ServerError whose text never holds the API key, whatever the server echoed."""
        return ServerError(message.replace(self.api_key, "***") if self.api_key else message)

    async def _request(
        self,
        client: Any,
        method: str,
        path: str,
        body: Any = None,
        retries: int | None = None,
        check: Callable[[Any], Any] | None = None,
    ) -> Any:
        """One request with retries; returns the decoded JSON body, passed through ``check``.

        Each try is bounded as a whole by ``timeout_s``; ``TIMEOUT_TRIES`` timeouts end it.
        """
        import httpx

        retries = self.retries if retries is None else retries
        timeouts, problem, name = 0, "", ""
        for attempt in itertools.count():
            base = next(self._next_url)
            name = self._names[base]
            ticket = object()
            self._waiting[ticket] = (name, time.monotonic())
            try:
                response = await asyncio.wait_for(
                    client.request(method, base + path, json=body, headers=self._headers()),
                    self.timeout_s,
                )
            except (asyncio.TimeoutError, httpx.TimeoutException):
                timeouts += 1
                problem = f"no complete answer in {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                problem = type(exc).__name__
            except httpx.HTTPError as exc:  # e.g. a body that does not decode as it says
                raise self._error(
                    f"server {name} sent an unreadable answer to {method} {path}: "
                    f"{clean_text(exc, secret=self.api_key)}"
                ) from None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return self._decode(response, name, method, path, check)
                if 300 <= status < 400:
                    where = clean_text(response.headers.get("location", "nowhere"), 120,
                                       self.api_key)
                    raise self._error(
                        f"server {name} answered {method} {path} with {status}, a redirect to "
                        f"{where}; redirects are not followed: give --server the address that "
                        "serves the API itself"
                    )
                if status not in RETRY_STATUS:
                    raise self._error(
                        f"server {name} answered {status}: "
                        f"{_server_message(response, self.api_key)}"
                    )
                problem = f"HTTP {status}"
                timeouts += status in TIMEOUT_STATUS
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
            await asyncio.sleep(delay)
        raise self._error(
            f"server {name} failed after {retries + 1} tries ({problem}); "
            "check the URL, then rerun the same command to resume"
        )

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
                shown = repr(clean_text(response.content.decode("utf-8"), secret=self.api_key))
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
                f"server serves {len(models)} models ({_names(models)}); "
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
                f"server does not serve model {self.model!r} (it serves: {_names(served)})"
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
                                               check=lambda answer: check_completion(answer, seq))

            return list(await gather_or_cancel(*(one(s) for s in sequences)))

        return self._run(score_all)

    def answer_error(self, exc: RuntimeError) -> Exception:
        return ServerError(f"server answer: {exc}")
