"""Identify the model an OpenAI-compatible server serves by what it computes, not its name: a
fixed probe text is scored at the start of every ``--server`` run and stored in ``run.json``; a
resume refuses a server whose probe logprobs moved beyond :data:`PROBE_TOLERANCE`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scorers.base import Preflight

if TYPE_CHECKING:
    from profit_prep.config import ScoreConfig

# Largest change of any probe token's logprob (nats) taken for the same model on a resume: a
# server's float noise (batching, bf16) stays well inside it; another checkpoint does not.
PROBE_TOLERANCE = 0.1
# The probe: a fixed text (prose, digits, code, unicode, chat markup) scored at the start of
# every --server run; ~70 SmolLM2 tokens, one request.
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 12345 + 678 = 13023.\n"
    "def f(x):\n    return x ** 2  # square\n"
    "Ünïcödé — 日本語のテキスト 🙂 <|im_start|>user\nWhat is 7 * 6?<|im_end|>"
)



def server_probe(server: Any, tokenizer: Any, stored: Any) -> dict[str, Any]:
    """Score :data:`PROBE_TEXT` on the server: its logprobs identify the served model, whatever
    name it reports. On a resume, refuse a model whose probe moved beyond PROBE_TOLERANCE, and
    keep the stored probe otherwise (run.json must stay equal)."""
    ids = np.asarray(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"], np.int64)
    [logprobs] = server.score([ids])
    # Strict JSON: -inf (a token the model rules out) is stored as null, like position 0.
    probe = {"ids": ids.tolist(), "logprobs": [None] + [
        round(float(x), 5) if np.isfinite(x) else None for x in logprobs[1:]]}
    if not isinstance(stored, dict) or stored.get("ids") != probe["ids"]:
        return probe  # a new output (or a probe of another text: run.json says what differs)
    then = np.array([-np.inf if x is None else x for x in stored["logprobs"]], np.float64)
    now = np.asarray(logprobs[1:], np.float64)
    with np.errstate(invalid="ignore"):  # -inf both times is no change
        diff = np.where(then[1:] == now, 0.0, np.abs(then[1:] - now))
    worst = int(np.nanargmax(np.where(np.isnan(diff), np.inf, diff))) if len(diff) else 0
    if len(diff) and not diff[worst] <= PROBE_TOLERANCE:
        raise InputError(
            f"server model {server.model!r} scores the probe text differently from when this "
            f"output was started (token {worst + 1}: {then[worst + 1]:.4f} then, "
            f"{float(logprobs[worst + 1]):.4f} now; tolerance {PROBE_TOLERANCE} nats): it "
            "serves another model (or the same in another dtype) under that name; score with "
            "the original model, or start again with --overwrite (or another --out)"
        )
    return stored


def check_server(server: Any, config: ScoreConfig, model_dir: Path, tokenizer: Any,
                 started: dict[str, Any]) -> Preflight:
    """The server scorer's pre-flight: it serves the expected model and tokenizes like the
    trainer, and its probe matches the one a resumed output stored. The checked scorer is kept
    for the in-process executor (one scorer per run)."""
    server.check(tokenizer, expected_model=config.server_model)
    probe = server_probe(server, tokenizer, started.get("model_probe"))
    model = {"name": server.model, "path": str(model_dir), "content_hash": f"server:{server.model}",
             "probe": {**probe, "tolerance_nats": PROBE_TOLERANCE}}
    return Preflight(model, probe, server)
