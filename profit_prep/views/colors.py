"""Colour scales for any stored per-token column: five quantile buckets over the output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profit_prep.views.flat import Flat

# -- colour scales and rule comparison --------------------------------------------------------

COLOR_BUCKETS = 5


@dataclass(frozen=True)
class Scale:
    """Quantile buckets of one per-token column over the response tokens of an output.

    ``edges`` are the distinct values among the quantiles 0, 0.2, ..., 1 of the column, so there
    are up to ``COLOR_BUCKETS`` buckets; bucket ``b`` holds ``edges[b] <= v < edges[b + 1]`` (the
    last one includes the maximum). A column with many ties (``rank``: most tokens are 1) gets
    fewer buckets rather than empty ones. Non-finite values are in bucket -1.

    >>> scale = Scale("x", np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    >>> scale.bucket(np.array([0.0, 0.99, 1.0, 4.5, 5.0, np.nan])).tolist()
    [0, 0, 1, 4, 4, -1]
    >>> Scale("rank", np.array([1.0, 3.0, 9.0])).shade(1)
    4
    """

    column: str
    edges: np.ndarray

    @property
    def n_buckets(self) -> int:
        return max(len(self.edges) - 1, 1)

    def bucket(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        b = np.searchsorted(self.edges[1:-1], values, side="right")
        return np.where(np.isfinite(values), b, -1)

    def shade(self, bucket: int) -> int:
        """The colour of a bucket, 0 (lowest) .. ``COLOR_BUCKETS - 1``: few buckets spread out."""
        if self.n_buckets == 1:
            return COLOR_BUCKETS // 2
        return round(bucket * (COLOR_BUCKETS - 1) / (self.n_buckets - 1))

    def ranges(self) -> list[str]:
        """One ``lo–hi`` text per bucket, for legends."""
        e = self.edges if len(self.edges) > 1 else np.repeat(self.edges, 2)
        return [f"{e[b]:.4g}–{e[b + 1]:.4g}" for b in range(len(e) - 1)]


def color_scale(flat: Flat, column: str) -> Scale:
    """The :class:`Scale` of ``column`` over every response token of ``flat`` (finite values)."""
    values = flat.column(column)[flat.response].astype(np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return Scale(column, np.array([np.nan, np.nan]))
    return Scale(column, np.unique(np.quantile(values, np.linspace(0, 1, COLOR_BUCKETS + 1))))


