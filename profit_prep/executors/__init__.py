"""Executors: where a scoring job runs. ``local`` in this process, ``ray`` on a Ray cluster
(``placement`` decides where its actors go). Both run ``base``'s run loop and per-shard body over
the prepared job (``profit_prep.job``), and set a backend up only through the ``Scorer`` contract
(``profit_prep.scorers.base``): no executor names a backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from profit_prep.errors import InputError

if TYPE_CHECKING:
    from profit_prep.config import ScoreConfig
    from profit_prep.scorers.base import Scorer


def score(config: ScoreConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Score ``config.data`` into ``config.out``; return the run's summary.

    The executor follows the config: ``num_workers`` > 0 or ``ray_address`` scores on Ray
    (:class:`profit_prep.executors.ray.RayExecutor`), else this process does. A rerun with the
    same config resumes: finished shards are kept, the rest are done. ``scorer`` (tests,
    benchmarks) scores in this process.
    """
    from profit_prep.executors.base import run_job

    if config.num_workers > 0 or config.ray_address:
        if scorer is not None:
            raise InputError("a scorer object scores in this process: drop num_workers and "
                             "ray_address, or the scorer")
        from profit_prep.executors.ray import RayExecutor

        return run_job(config, RayExecutor())
    from profit_prep.executors.local import LocalExecutor

    return run_job(config, LocalExecutor(scorer))
