"""Scorers that see each position's top-k prompt log-probabilities: vLLM in process
(:mod:`profit_prep.scorers.vllm_engine`) and vLLM servers (:mod:`profit_prep.scorers.vllm_server`).

Both hand :class:`TopKScorer` the same per-position entries, ``{token id: (logprob, rank)}``
for the distribution that predicted token t (the top k plus the actual token; ``entries[0]`` is
empty), and everything after that is one code path: the actual token's log-probability and
rank (:func:`gold_logprobs`) and the signal columns (:func:`top_k_signals`).

Example:
    >>> entries = [None, {5: (-0.2, 1), 9: (-2.0, 2)}]
    >>> lp, rank = gold_logprobs(entries, [1, 9])
    >>> float(lp[1]), int(rank[1])
    (-2.0, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scorers.base import ScorerSetup, parse_signals

# One position's entries: token id -> (logprob, rank or None).
Entry = Mapping[int, tuple[float, "int | None"]]


# How the top-k backends (vLLM, servers) estimate entropy; recorded in the manifest's scorer.
TOP_K_ENTROPY = (
    "top-k lower bound: -sum_topk p log p - R log min(R, p_k), R = 1 - sum_topk p (each unseen "
    "token has p <= min(R, p_k)); never above the exact entropy"
)


def parse_top_k_signals(
    signals: str | Sequence[str] | None, top_k: int
) -> tuple[str, ...]:
    """:func:`parse_signals` for the top-k backends (vLLM, servers), with ``top_k`` checked."""
    parsed = parse_signals(signals)
    if parsed and top_k < 1:
        raise InputError(f"--signals-top-k {top_k}: must be at least 1")
    return parsed


def describe_top_k_signals(signals: Sequence[str], top_k: int) -> dict[str, Any]:
    """What a top-k backend's manifest ``scorer`` records about its signals (nothing if none)."""
    if not signals:
        return {}
    return {"signals": list(signals), "signals_top_k": top_k, "entropy_estimator": TOP_K_ENTROPY}


def top_k_entropy(top_logprobs: np.ndarray) -> np.ndarray:
    """Entropy (nats) estimated from each row's top-k log-probabilities: a lower bound.

    The k known tokens contribute exactly; the unseen tail has mass ``R = 1 - sum p`` and each
    of its tokens has ``p <= min(R, p_k)`` (``p_k`` the smallest known one), so its share is at
    least ``-R log min(R, p_k)``. Of the estimators measured on SmolLM2 (renormalised top-k,
    tail as one token, tail spread uniformly, this one) it has the smallest error
    (benchmarks/signals_error.py; docs/format.md has the figures).

    >>> lp = np.log(np.array([[0.5, 0.25, 0.25]]))  # the whole distribution: exact
    >>> round(float(top_k_entropy(lp)[0]), 6) == round(float(np.log(2) * 1.5), 6)
    True
    >>> # tail R = 0.2, bound min(0.2, 0.3): exact if the tail is one token, as in [.5, .3, .2]
    >>> round(float(top_k_entropy(np.log(np.array([[0.5, 0.3]])))[0]), 4)
    1.0297
    """
    lp = np.asarray(top_logprobs, dtype=np.float64)
    p = np.exp(lp)
    head = -(p * lp).sum(-1)
    tail = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    bound = np.minimum(tail, p.min(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(tail > 0, -tail * np.log(bound), 0.0)
    return head + rest


def top_k_signals(
    token_ids: Sequence[int],
    entries: Sequence[Mapping[int, tuple[float, int | None]] | None],
    k: int,
    signals: Sequence[str],
) -> dict[str, np.ndarray]:
    """``logprobs`` and signal columns from per-position top-k log-probabilities.

    ``entries[t]`` maps token id -> ``(logprob, rank)`` for the distribution that predicted
    token t: the k most likely tokens plus the actual one, as vLLM returns them (the actual
    token's rank counts every token with a logprob >= its own; ``entries[0]`` is empty). Exact:
    ``logprobs``, ``top1_id``/``top1_logprob`` (ties: the lowest id, as ``argmax``) and
    ``rank`` (``1 +`` tokens strictly more likely; ties seen in the top-k share the best rank, as
    in :class:`TransformersScorer`). ``entropy`` is :func:`top_k_entropy` of the top k.

    >>> top = {5: (-0.2, 1), 9: (-2.0, 2)}
    >>> cols = top_k_signals([1, 9], [None, {**top, 7: (-3.0, 4)}], 2, ("top1", "rank"))
    >>> int(cols["top1_id"][1]), int(cols["rank"][1]), float(cols["logprobs"][1])
    (5, 2, -2.0)
    """
    n = len(token_ids)
    if len(entries) != n:
        raise RuntimeError(f"got {len(entries)} prompt logprobs for {n} tokens")
    m = max(n - 1, 0)
    logprobs = np.empty(m, np.float64)
    top = np.full((m, k), -np.inf)
    top1_id = np.empty(m, np.int32)
    rank = np.empty(m, np.int32)
    for t in range(1, n):
        entry = entries[t] or {}
        gold = int(token_ids[t])
        if gold not in entry:
            raise RuntimeError(f"prompt logprobs lack the actual token {gold} at position {t}")
        gold_lp, gold_rank = entry[gold]
        # Sort by logprob, ties by id: the first k are the top k (the actual token can be an
        # extra (k+1)-th entry), and the first is argmax's choice.
        ranked = sorted(entry.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
        values = [v[0] for _, v in ranked]
        top[t - 1, : len(values)] = values
        logprobs[t - 1] = gold_lp
        top1_id[t - 1] = ranked[0][0]
        above = sum(v > gold_lp for v in values)
        if len(entry) <= k:  # the actual token is one of the top k: all better ones are seen
            rank[t - 1] = 1 + above
        else:  # vLLM counted logprob >= gold's; take the ties we can see back out
            if gold_rank is None:
                raise RuntimeError(f"prompt logprobs lack the actual token's rank at {t}")
            ties = sum(v == gold_lp for tid, (v, _) in entry.items() if tid != gold)
            rank[t - 1] = max(1 + above, gold_rank - ties)
    cols: dict[str, np.ndarray] = {"logprobs": logprobs.astype(np.float32)}
    if "entropy" in signals:
        cols["entropy"] = top_k_entropy(top).astype(np.float32)
    if "top1" in signals:
        cols["top1_id"], cols["top1_logprob"] = top1_id, top[:, 0].astype(np.float32)
    if "rank" in signals:
        cols["rank"] = rank
    out = {}
    for name, values in cols.items():  # position 0 has no context: NaN or -1
        first = np.array([-1 if values.dtype == np.int32 else np.nan], values.dtype)
        out[name] = np.concatenate([first, values])[:n]
    return out


def gold_logprobs(
    entries: Sequence[Entry | None], token_ids: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The actual token's log-probability and rank at every position (NaN and -1 at 0).

    Looking the actual id up by key (not taking the best entry) keeps ties and "actual token
    outside the top k" right; a position without it means a mismatched request and answer.
    """
    n = len(token_ids)
    if len(entries) != n:
        raise RuntimeError(f"got {len(entries)} prompt logprobs for {n} tokens")
    logprobs = np.full(n, np.nan, dtype=np.float32)
    ranks = np.full(n, -1, dtype=np.int32)
    for t in range(1, n):
        actual = int(token_ids[t])
        found = (entries[t] or {}).get(actual)
        if found is None:
            raise RuntimeError(f"prompt logprobs lack the actual token {actual} at position {t}")
        logprobs[t] = found[0]
        ranks[t] = -1 if found[1] is None else found[1]
    return logprobs, ranks


class TopKScorer(ScorerSetup):
    """``score`` and ``score_with_signals`` from per-position top-k entries.

    A backend implements :meth:`prompt_logprobs` (``k`` prompt logprobs per position, as
    :data:`Entry` dicts) and :meth:`answer_error` (how a malformed answer is reported).
    """

    backend = "top-k"
    signals: tuple[str, ...] = ()
    top_k: int = 20
    k: int = 0  # prompt logprobs asked for by ``score`` (0: only the actual token)

    def prompt_logprobs(
        self, sequences: Sequence[np.ndarray], k: int
    ) -> list[list[Entry | None]]:
        raise NotImplementedError

    def answer_error(self, exc: RuntimeError) -> Exception:
        return RuntimeError(f"{self.backend}: {exc}")

    def score(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        out, ranks = [], []
        for seq, entries in zip(sequences, self.prompt_logprobs(sequences, self.k), strict=True):
            try:
                lp, rank = gold_logprobs(entries, seq)
            except RuntimeError as exc:
                raise self.answer_error(exc) from None
            out.append(lp)
            ranks.append(rank)
        self.last_ranks = ranks  # the actual tokens' ranks (meaningful when k > 0)
        return out

    def score_with_signals(self, sequences: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per sequence: ``logprobs`` plus the columns of ``signals``, from ``top_k`` prompt
        logprobs per position: the same shape, names and dtypes as
        :meth:`profit_prep.scorers.transformers_model.TransformersScorer.score_with_signals`."""
        if not self.signals:
            return [{"logprobs": lp} for lp in self.score(sequences)]
        result = []
        per_sequence = self.prompt_logprobs(sequences, self.top_k)
        for seq, entries in zip(sequences, per_sequence, strict=True):
            try:
                result.append(top_k_signals(seq, entries, self.top_k, self.signals))
            except RuntimeError as exc:
                raise self.answer_error(exc) from None
        return result
