"""The in-process executor: shard after shard in this process, with one scorer.

The run loop and per-shard body are :mod:`profit_prep.executors.base`'s; ``profit_prep.score``
(:mod:`profit_prep.executors`) picks this executor when the config asks for no Ray workers.

Example:
    >>> from profit_prep import ScoreConfig, score
    >>> summary = score(ScoreConfig(data="train.jsonl", out="out"))  # doctest: +SKIP
"""

from __future__ import annotations

import time

from profit_prep.executors import score
from profit_prep.executors.base import (
    TIMINGS,
    Executor,
    Progress,
    Scored,
    end_of_turn_warning,
    format_summary,
    read_shard,
    run_job,
    score_shard,
    write_shard,
)
from profit_prep.job import Prepared
from profit_prep.scorers.base import Scorer

# Names this module had as profit_prep.driver, importable from here for one release.
__all__ = ["TIMINGS", "Executor", "LocalExecutor", "Progress", "Scored", "end_of_turn_warning",
           "format_summary", "run_job", "score", "score_shards"]
from profit_prep.store.outputs import Output


class LocalExecutor:
    """Scores shard after shard in this process, with one scorer (built here unless given)."""

    def __init__(self, scorer: Scorer | None = None) -> None:
        self.scorer, self.own = scorer, scorer is None
        self.load_s = 0.0

    def start(self, prepared: Prepared, out: Output) -> Prepared:
        overwrite = prepared.config.overwrite
        if self.own and (overwrite or not out.all_done(prepared.n_shards)):
            t0 = time.perf_counter()
            self.scorer, prepared = prepared.start_scorer()
            self.load_s = time.perf_counter() - t0
        return prepared

    def run(
        self, prepared: Prepared, out: Output, todo: list[int], progress: Progress
    ) -> Scored:
        assert self.scorer is not None
        timing, tokens = score_shards(prepared, out, self.scorer, todo, progress)
        return Scored(timing, tokens, self.load_s, self.scorer.describe())

    def close(self) -> None:
        if self.own and self.scorer is not None:
            self.scorer.close()
            self.scorer = None



def score_shards(
    prepared: Prepared, out: Output, scorer: Scorer, todo: list[int], progress: Progress
) -> tuple[dict[str, float], int]:
    """Read, render, score, mask and write each pending shard; seconds per step, tokens."""
    timing = dict.fromkeys(TIMINGS, 0.0)
    tokens = 0
    for index in todo:
        work = read_shard(prepared, index)
        progress.update(len(work.rejected), 0)
        # 16 rows per scoring call: keeps the progress line moving on slow machines
        score_shard(work, scorer, step=16, progress=progress.update)
        write_shard(prepared, out, work)
        for key in TIMINGS:
            timing[key] += work.timing[key]
        tokens += work.tokens
    return timing, tokens
