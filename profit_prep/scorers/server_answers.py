"""What a vLLM server says, checked: base-URL forms, every answer's shape and values, and the
server's own words made safe to quote. One place, so a malformed answer of any kind (not JSON,
HTML from a proxy, a wrong shape, a NaN log-probability) stops a run with one line naming the
server and the fault, never a traceback (:mod:`profit_prep.scorers.vllm_server` sends the requests).

    >>> normalize_server_url("http://127.0.0.1:8000/v1/")
    'http://127.0.0.1:8000'
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scorers.top_k import gold_logprobs

# Largest log-probability accepted: fp32 log-softmax can round a near-certain token slightly
# above 0 (~1e-6); anything further up is not a log-probability.
LOGPROB_EPS = 1e-3
# Checked prompt logprobs: per position, token id -> (logprob, rank or None); None at position 0.
Entries = list[dict[int, tuple[float, int | None]] | None]


class ServerError(InputError):
    """The server refused or could not be reached; the run can be resumed by rerunning."""


class BadLogprob(ServerError):
    """A well-formed answer whose log-probability is NaN, +inf or above 0: a model problem."""


# A URL's user:password@ part, wherever a URL appears in a text.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#@]+@")


def redact_url(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it masked: the one helper for
    anything that may echo a ``--server`` URL (error lines, logs, files).

    >>> redact_url("cannot reach http://alice:s3cret@gpu-a:8000/v1 (refused)")
    'cannot reach http://***@gpu-a:8000/v1 (refused)'
    """
    return _USERINFO.sub(r"\1***@", text)


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries, in every form a message may echo them: the password and
    user name as written and percent-decoded, and the HTTP Basic credentials built from them."""
    import base64

    parts = urllib.parse.urlsplit(url.strip())
    if "@" not in parts.netloc:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    plain_user, plain_password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    basic = base64.b64encode(f"{plain_user}:{plain_password}".encode()).decode()
    found = [userinfo, password, plain_password, basic] if password else [userinfo, user,
                                                                           plain_user, basic]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def clean_text(text: Any, limit: int = 200, secret: str | Sequence[str] | None = None) -> str:
    r"""Server text fit for a one-line message: ``secret`` (one or several) masked, URL
    passwords masked, control characters removed, whitespace collapsed, cut to ``limit``
    characters.

    >>> clean_text("bad\x1b[31m  thing\n\x00" + "x" * 300, limit=20)
    'bad [31m thing xx...'
    """
    text = redact_url(str(text))
    for one in [secret] if isinstance(secret, str) else secret or ():
        if one:
            text = text.replace(one, "***")
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
    shown = clean_text(text, 100, url_secrets(text) if "@" in text else None)
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


def display(url: str) -> str:
    """A server URL for messages: without any user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")


def names(models: Sequence[str]) -> str:
    """Model names from a server, fit for a message."""
    return clean_text(", ".join(models), 200)


@dataclass
class Answer:
    """A server's answer, read under a byte cap (:mod:`profit_prep.scorers.vllm_server`)."""

    status_code: int
    headers: Any = field(default_factory=dict)
    content: bytes = b""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number, or an HTTP date); None if absent
    or unreadable.

    >>> retry_after_s("7"), retry_after_s("soon")
    (7.0, None)
    """
    import email.utils
    import time

    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def server_message(response: Any, secret: str | Sequence[str] | None = None) -> str:
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
