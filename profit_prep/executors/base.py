"""What every executor shares: the run loop and the per-shard body.

:func:`run_job` owns what does not depend on where shards are scored: preparing the job, the
output's lock and parameters, pending shards (resume), progress, timings, every message of a run,
the summary and the manifest written last. An *executor* only scores the pending shards, and
every executor runs the same per-shard body: :func:`read_shard` (read and render),
:func:`score_shard`, :func:`write_shard` (mask, one atomic file), as datatrove's local and Ray
executors share one run loop. :class:`profit_prep.executors.local.LocalExecutor` runs them in
this process, :class:`profit_prep.executors.ray.RayExecutor` as Ray Data stages.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from profit_prep.config import ScoreConfig
from profit_prep.inputs.sources import RawRow
from profit_prep.job import (
    Prepared,
    prepare,
    render_rows,
    score_sequences,
    write_scored_shard,
)
from profit_prep.rendering.renderer import Rendered
from profit_prep.scorers.base import Scorer
from profit_prep.store.outputs import Output, open_output


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


@dataclass
class ShardWork:
    """One shard on its way through the per-shard steps (pickled between Ray's stages): what
    :func:`read_shard` made, then what :func:`score_shard` added."""

    index: int
    rendered: list[tuple[RawRow, Rendered]]
    rejected: list[dict[str, Any]]
    input_digest: str
    timing: dict[str, float]  # seconds per step (TIMINGS); Ray adds scored_at
    logprobs: list[np.ndarray] | None = None
    extras: list[dict[str, np.ndarray]] | None = None  # signal columns, when asked for
    scorer: dict[str, Any] | None = None  # the scorer's describe() (Ray)
    model_load_s: float | None = None  # set on the first shard a Ray actor scores
    actor: dict[str, Any] | None = None  # where the Ray scoring actor ran

    @property
    def tokens(self) -> int:
        return sum(len(r.input_ids) for _, r in self.rendered)

    def dumps(self) -> bytes:
        return pickle.dumps(self, protocol=5)


def read_shard(prepared: Prepared, index: int) -> ShardWork:
    """Step 1 of a shard: read its input rows and render them (rejections with reasons)."""
    start, stop = prepared.shard_range(index)
    t0 = time.perf_counter()
    rows = prepared.source.read(start, stop)
    digest = prepared.source.digest(start, stop)
    t1 = time.perf_counter()
    rendered, rejected = render_rows(rows, prepared.fmt, prepared.config.fields(),
                                     prepared.renderer, prepared.duplicates)
    # The raw text is not needed downstream; dropping it keeps a shard (and Ray's payload) small.
    rendered = [(dataclasses.replace(row, data=None), r) for row, r in rendered]
    return ShardWork(index, rendered, rejected, digest,
                     {"read_s": t1 - t0, "render_s": time.perf_counter() - t1})


def score_shard(
    work: ShardWork,
    scorer: Scorer,
    step: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Step 2: score the shard's rows, ``step`` rows per scoring call (all at once without),
    telling ``progress`` (rows, tokens) after each call."""
    logprobs: list[np.ndarray] = []
    extras: list[dict[str, np.ndarray]] | None = [] if scorer.signals else None
    score_s = 0.0
    n = step or max(1, len(work.rendered))
    for i in range(0, len(work.rendered), n):
        part = [r.input_ids for _, r in work.rendered[i : i + n]]
        t = time.perf_counter()
        part_logprobs, part_extras = score_sequences(scorer, part)
        score_s += time.perf_counter() - t
        logprobs += part_logprobs
        if extras is not None and part_extras is not None:
            extras += part_extras
        if progress is not None:
            progress(len(part), sum(len(p) for p in part))
    work.logprobs, work.extras = logprobs, extras
    work.timing["score_s"] = score_s


def write_shard(prepared: Prepared, out: Output, work: ShardWork) -> None:
    """Step 3: mask, then write the shard as one atomic file."""
    assert work.logprobs is not None, "a shard reached the writer unscored"
    t = time.perf_counter()
    write_scored_shard(out, work.index, work.rendered, work.logprobs, prepared.config.mask_rule(),
                       work.extras, prepared.end_of_turn_ids, work.rejected, work.input_digest)
    work.timing["write_s"] = time.perf_counter() - t


class Executor(Protocol):
    """Scores the pending shards of a prepared job (in this process, or on Ray)."""

    def start(self, prepared: Prepared, out: Output) -> Prepared:
        """Before run.json is written (may change the backend, e.g. auto's fallback)."""
        ...

    def run(
        self, prepared: Prepared, out: Output, todo: list[int], progress: Progress
    ) -> Scored: ...

    def close(self) -> None: ...


def run_job(config: ScoreConfig, executor: Executor) -> dict[str, Any]:
    """Prepare, lock and check the output, score what is pending with ``executor``, write the
    manifest; return the summary. A rerun with the same config resumes. Every message of a run
    (backend line, progress, warnings) is said here, whichever executor and entry point."""
    t_start = time.perf_counter()
    prepared = checked = prepare(config)
    try:
        out = open_output(config.out)
        out.check_writable(config.overwrite)
        if not config.quiet:
            print(prepared.backend_line(), file=sys.stderr)
        prepared = executor.start(prepared, out)
        config = prepared.config
        with out.open(prepared.params, overwrite=config.overwrite):
            todo, done_rows = prepared.pending(out)
            progress = Progress(prepared.n_rows, done_rows, config.quiet)
            scored = executor.run(prepared, out, todo, progress) if todo else Scored.nothing()
            run = run_figures(scored, prepared.n_shards - len(todo), t_start)
            describe = scored.scorer or out.earlier_scorer() or {"backend": config.backend}
            prepared.check_input_unchanged()  # rows of two versions must never be finished
            manifest = out.finalize(
                {**prepared.manifest, "scorer": describe, "run": run}, prepared.n_shards,
                prepared.end_of_turn_ids,
            )
    finally:
        executor.close()
        checked.close()
    summary = {"out": str(out.path), **manifest["counts"], **run, "protect": config.protect}
    warning = end_of_turn_warning(summary)
    if warning:
        print(warning, file=sys.stderr)
    return summary


def run_figures(scored: Scored, resumed_shards: int, t_start: float) -> dict[str, Any]:
    """The manifest's ``run`` section: timings, speed, resume, and the executor's own."""
    return {
        **{k: round(v, 3) for k, v in scored.timing.items()},
        "model_load_s": round(scored.model_load_s, 3),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "scored_tokens_this_run": scored.tokens,
        "tokens_per_s": (round(scored.tokens / scored.timing["score_s"], 1)
                         if scored.tokens else None),
        "resumed_shards": resumed_shards,
        **scored.run,
    }


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
