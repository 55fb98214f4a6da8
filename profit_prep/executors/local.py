"""Run a scoring job: the bookkeeping every driver shares, and the in-process driver.

:func:`run_job` owns what does not depend on where shards are scored: preparing the job, the
output's lock and parameters, pending shards (resume), progress, timings, the summary and the
manifest written last. An *executor* only scores the pending shards: :class:`LocalExecutor` in
this process, :class:`profit_prep.executors.ray.RayExecutor` on a Ray cluster (as datatrove's
local and Ray executors share one run loop).

Example:
    >>> summary = score(ScoreConfig(data="train.jsonl", out="out"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from profit_prep.config import ScoreConfig
from profit_prep.job import (
    Prepared,
    prepare,
    render_rows,
    score_sequences,
    write_scored_shard,
)
from profit_prep.scorers.base import Scorer
from profit_prep.scorers.choose import make_scorer
from profit_prep.store.outputs import open_output
from profit_prep.store.writer import OutputDir


class Progress:
    """One status line: rows, tokens/s, ETA. Rewritten in place on a terminal, logged otherwise."""

    def __init__(self, total_rows: int, done_rows: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total_rows, done_rows, quiet
        self.start_done = done_rows
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens
        now = time.perf_counter()
        if not self.quiet and (now - self.last_print > (0.5 if self.tty else 10) or self.finished):
            self.last_print = now
            print(self.line(), end="\r" if self.tty and not self.finished else "\n",
                  file=sys.stderr, flush=True)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:5.0f}s" if eta == eta else "    ?"
        pct = 100 * self.done / max(self.total, 1)
        return (f"rows {self.done}/{self.total} ({pct:3.0f}%) | {self.tokens / elapsed:7.0f} tok/s"
                f" | {rate:6.1f} rows/s | ETA {eta_text}")


def start_scorer(prepared: Prepared) -> tuple[Scorer, Prepared]:
    """Build the scorer; under ``auto``, a vLLM that does not start falls back to transformers
    with one warning line instead of failing the run."""
    try:
        return make_scorer(prepared.config, prepared.model_dir), prepared
    except Exception as exc:  # noqa: BLE001 - any engine start failure, when auto chose vLLM
        if not (prepared.backend_reason.startswith("auto") and prepared.config.backend == "vllm"):
            raise
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        print(f"warning: vLLM did not start ({first}); scoring with transformers instead",
              file=sys.stderr)
        prepared = prepared.fall_back_to_transformers()
        return make_scorer(prepared.config, prepared.model_dir), prepared


TIMINGS = ("read_s", "render_s", "score_s", "write_s")


@dataclass
class Scored:
    """What an executor reports about the shards it scored."""

    timing: dict[str, float]  # seconds per step (TIMINGS), summed over shards
    tokens: int
    model_load_s: float = 0.0
    scorer: dict[str, Any] | None = None  # the scorer's describe(), for the manifest
    run: dict[str, Any] = field(default_factory=dict)  # the executor's own run figures

    @classmethod
    def nothing(cls) -> Scored:
        return cls(dict.fromkeys(TIMINGS, 0.0), 0)


class Executor(Protocol):
    """Scores the pending shards of a prepared job (in this process, or on Ray)."""

    def start(self, prepared: Prepared, out: OutputDir) -> Prepared:
        """Before run.json is written (may change the backend, e.g. auto's fallback)."""
        ...

    def run(
        self, prepared: Prepared, out: OutputDir, todo: list[int], progress: Progress
    ) -> Scored: ...

    def close(self) -> None: ...


def run_job(config: ScoreConfig, executor: Executor) -> dict[str, Any]:
    """Prepare, lock and check the output, score what is pending with ``executor``, write the
    manifest; return the summary. A rerun with the same config resumes."""
    t_start = time.perf_counter()
    prepared = prepare(config)
    out = open_output(config.out)  # a local folder, or an object-store prefix
    out.check_writable(config.overwrite)
    if not config.quiet:
        print(prepared.backend_line(), file=sys.stderr)
    try:
        prepared = executor.start(prepared, out)
        config = prepared.config
        with out.open(prepared.params, overwrite=config.overwrite):
            todo, done_rows = prepared.pending(out)
            progress = Progress(prepared.n_rows, done_rows, config.quiet)
            scored = executor.run(prepared, out, todo, progress) if todo else Scored.nothing()
            run = {
                **{k: round(v, 3) for k, v in scored.timing.items()},
                "model_load_s": round(scored.model_load_s, 3),
                "wall_s": round(time.perf_counter() - t_start, 3),
                "scored_tokens_this_run": scored.tokens,
                "tokens_per_s": (round(scored.tokens / scored.timing["score_s"], 1)
                                 if scored.tokens else None),
                "resumed_shards": prepared.n_shards - len(todo),
                **scored.run,
            }
            describe = scored.scorer or {"backend": config.backend}
            prepared.check_input_unchanged()  # rows of two versions must never be finished
            manifest = out.finalize(
                {**prepared.manifest, "scorer": describe, "run": run}, prepared.n_shards,
                prepared.end_of_turn_ids,
            )
    finally:
        executor.close()
    return {"out": str(out.path), **manifest["counts"], **run, "protect": config.protect}


class LocalExecutor:
    """Scores shard after shard in this process, with one scorer (built here unless given)."""

    def __init__(self, scorer: Scorer | None = None) -> None:
        self.scorer, self.own = scorer, scorer is None
        self.load_s = 0.0

    def start(self, prepared: Prepared, out: OutputDir) -> Prepared:
        overwrite = prepared.config.overwrite
        if self.own and (overwrite or not out.all_done(prepared.n_shards)):
            t0 = time.perf_counter()
            self.scorer, prepared = start_scorer(prepared)
            self.load_s = time.perf_counter() - t0
        return prepared

    def run(
        self, prepared: Prepared, out: OutputDir, todo: list[int], progress: Progress
    ) -> Scored:
        assert self.scorer is not None
        timing, tokens = score_shards(prepared, out, self.scorer, todo, progress)
        return Scored(timing, tokens, self.load_s, self.scorer.describe())

    def close(self) -> None:
        if self.own and self.scorer is not None:
            self.scorer.close()
            self.scorer = None


def score(config: ScoreConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Score ``config.data`` into ``config.out`` in this process; return the run's summary.

    A rerun with the same config resumes: finished shards are kept, the rest are done.
    """
    return run_job(config, LocalExecutor(scorer))


def score_shards(
    prepared: Prepared, out: OutputDir, scorer: Scorer, todo: list[int], progress: Progress
) -> tuple[dict[str, float], int]:
    """Read, render, score, mask and write each pending shard; seconds per step, tokens."""
    config = prepared.config
    timing = dict.fromkeys(TIMINGS, 0.0)
    scored_tokens = 0
    rule = config.mask_rule()
    for index in todo:
        start, stop = prepared.shard_range(index)
        t = time.perf_counter()
        rows = prepared.source.read(start, stop)
        digest = prepared.source.digest(start, stop)
        timing["read_s"] += time.perf_counter() - t
        t = time.perf_counter()
        rendered, rejected = render_rows(
            rows, prepared.fmt, config.fields(), prepared.renderer, prepared.duplicates
        )
        timing["render_s"] += time.perf_counter() - t
        progress.update(len(rejected), 0)
        logprobs: list[np.ndarray] = []
        extras: list[dict[str, np.ndarray]] | None = [] if scorer.signals else None
        step = 16  # rows per scoring call: keeps the progress line moving on slow machines
        for i in range(0, len(rendered), step):
            part = [r.input_ids for _, r in rendered[i : i + step]]
            t = time.perf_counter()
            part_logprobs, part_extras = score_sequences(scorer, part)
            logprobs += part_logprobs
            if extras is not None and part_extras is not None:
                extras += part_extras
            timing["score_s"] += time.perf_counter() - t
            n_tok = sum(len(p) for p in part)
            scored_tokens += n_tok
            progress.update(len(part), n_tok)
        t = time.perf_counter()
        write_scored_shard(out, index, rendered, logprobs, rule, extras,
                           prepared.end_of_turn_ids, rejected, digest)
        timing["write_s"] += time.perf_counter() - t
    return timing, scored_tokens


def format_summary(summary: dict[str, Any]) -> str:
    """The summary a person reads at the end of a run."""
    masked = 1 - summary["kept_tokens"] / max(summary["response_tokens"], 1)
    rate = summary.get("tokens_per_s")
    lines = [
        f"output      {summary['out']}",
        f"rows        {summary['scored_rows']} scored, {summary['rejected_rows']} rejected "
        f"({summary['truncated_rows']} truncated)",
        f"tokens      {summary['tokens']} total, {summary['response_tokens']} response, "
        f"{summary['kept_tokens']} kept",
        f"masked      {masked:.1%} of response tokens",
        f"speed       {rate:.0f} tokens/s scoring" if rate else "speed       (nothing new scored)",
    ]
    if summary.get("end_of_turn_tokens"):
        kept = "all kept: protected" if summary.get("protect") == "end_of_turn" else "masked"
        lines.append(f"end of turn {summary['end_of_turn_masked']} of "
                     f"{summary['end_of_turn_tokens']} masked ({kept})")
    if summary["rejected_rows"]:
        lines.append(f"rejected    see {os.path.join(summary['out'], 'rejected.jsonl')}")
    return "\n".join(lines)


def end_of_turn_warning(summary: dict[str, Any]) -> str | None:
    """One warning line when most end-of-turn tokens fell out of an unprotected mask."""
    total, masked = summary.get("end_of_turn_tokens") or 0, summary.get("end_of_turn_masked", 0)
    if total and masked > total / 2:
        return (f"warning: {masked} of {total} end-of-turn tokens ({masked / total:.0%}) are "
                "masked: a model trained on this mask is barely taught to stop; --protect "
                "end_of_turn keeps them (docs/methods.md)")
    return None
