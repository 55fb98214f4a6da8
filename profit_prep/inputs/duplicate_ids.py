"""Rows whose user-given id (``--id-field``) was seen before: found in one pass over the ids
before scoring, so that every worker and every resume rejects the same rows."""

from __future__ import annotations

import numpy as np

from profit_prep.inputs.sources import Source


def find_duplicates(source: Source, n_rows: int) -> dict[int, int]:
    """Row index -> first row index, for every row whose user-given id was seen before.

    One pass over the ids before scoring, so that every worker rejects the same rows whatever
    order shards finish in, and a resumed run rejects exactly what the first run did.

    Memory: a 64-bit hash of each id (:meth:`Source.id_hashes`) and a sorted copy, ~18 bytes a
    row while it runs, not a dict of every id string (~130 bytes a row). Rows whose hash occurs
    more than once are read again and their ids compared exactly, so a hash collision never
    makes a duplicate.
    """
    hashes, valid = source.id_hashes(n_rows)
    ordered = hashes[valid]
    ordered.sort()  # in place: no third copy
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    duplicates: dict[int, int] = {}
    if not len(repeated):
        return duplicates
    # Rows whose hash repeats, found block by block: np.isin would sort all the hashes again
    # (~45 MB of temporaries at 1M rows, measured).
    found = []
    for start in range(0, len(hashes), 1 << 16):
        block = hashes[start : start + (1 << 16)]
        at = np.searchsorted(repeated, block).clip(max=len(repeated) - 1)
        hit = (repeated[at] == block) & valid[start : start + len(block)]
        found.append(np.flatnonzero(hit) + start)
    candidates = np.concatenate(found)
    del hashes, valid
    first_seen: dict[str, int] = {}
    # Consecutive candidates are read as one range.
    breaks = np.flatnonzero(np.diff(candidates) != 1) + 1
    for run in np.split(candidates, breaks):
        for row in source.read(int(run[0]), int(run[-1]) + 1):
            if row.error is not None:
                continue
            first = first_seen.setdefault(row.example_id, row.index)
            if first != row.index:
                duplicates[row.index] = first
    return duplicates
