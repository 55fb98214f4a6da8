"""Two-model scores: join a scored output with a second model's output of the same rows.

``excess_loss[t] = loss_model[t] - loss_reference[t] = (-logprobs_A[t]) - (-logprobs_B[t])``, the
score of Rho-1 (A = the model being trained, B = a reference trained on clean data) and of token
cleaning. Both outputs must hold the same tokens: the tokenizer fingerprints must match and every
row of A must exist in B with identical ``input_ids``; otherwise the join is refused, naming the
first row that differs. Two ways to use it:

* ``load(OUT_A, reference=OUT_B)``: the loader joins on the fly (nothing written);
* :func:`combine` (``profit-prep combine OUT_A --reference OUT_B --into OUT_AB``): writes a new
  output, OUT_A's rows plus two per-token columns, ``reference_logprobs`` and ``excess_loss``,
  that pandas/DuckDB/polars read like any other, and ``load(OUT_AB, select=...)`` uses directly.

Example:
    >>> ref = Reference("out-base", "out-ref")  # doctest: +SKIP
    >>> ref.excess_loss(pq.read_table("out-base/data/part-00000.parquet"))  # doctest: +SKIP
    >>> combine("out-base", "out-ref", "out-both")["counts"]["scored_rows"]  # doctest: +SKIP
    300
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.store.reader import read_manifest, verify
from profit_prep.store.schema import flat_list
from profit_prep.store.writer import OutputDir

# The columns :func:`combine` adds (documented in the combined manifest and docs/format.md).
COMBINED_DOCS = {
    "reference_logprobs": "log p(input_ids[t] | input_ids[:t]) under the second (reference) "
    "model of `profit-prep combine`; NaN at t = 0",
    "excess_loss": "loss - reference loss = reference_logprobs - logprobs (Rho-1's score); "
    "NaN at t = 0",
}


class Reference:
    """The reference output's ids and log-probabilities, indexed by example_id (held in memory:
    about 8 bytes per token)."""

    def __init__(self, out: str | Path, reference: str | Path) -> None:
        self.path = Path(reference)
        manifest = read_manifest(out)
        ref_manifest = read_manifest(self.path)
        problems = verify(self.path)
        if problems:
            raise InputError(f"{self.path}: damaged reference output ({'; '.join(problems)})")
        ours = manifest["tokenizer"].get("fingerprint")
        theirs = ref_manifest["tokenizer"].get("fingerprint")
        if ours != theirs:
            raise InputError(
                f"{out} and {self.path} were tokenized differently (tokenizer fingerprints "
                f"{str(ours)[:12]} vs {str(theirs)[:12]}): their tokens cannot be compared"
            )
        self.shards = [s["sha256"] for s in ref_manifest["shards"]]
        files = [self.path / s["file"] for s in ref_manifest["shards"]]
        table = pa.concat_tables(
            [pq.read_table(f, columns=["example_id", "input_ids", "logprobs"]) for f in files]
        ) if files else None
        if table is None or table.num_rows == 0:
            raise InputError(f"{self.path}: the reference output holds no rows")
        self.ids, self.offsets = flat_list(table["input_ids"])
        self.logprobs, _ = flat_list(table["logprobs"])
        self.row_of = {e: i for i, e in enumerate(table["example_id"].to_pylist())}

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "shards": self.shards}

    def logprobs_for(self, table: pa.Table) -> np.ndarray:
        """The reference's log-probabilities aligned to ``table``'s flat tokens (checked)."""
        example_ids = table["example_id"].to_pylist()
        ids, offsets = flat_list(table["input_ids"])
        rows = []
        for e in example_ids:
            if e not in self.row_of:
                raise InputError(f"example_id {e!r} is not in the reference output {self.path}")
            rows.append(self.row_of[e])
        rows_arr = np.asarray(rows, dtype=np.int64)
        starts, stops = self.offsets[rows_arr], self.offsets[rows_arr + 1]
        lengths = np.diff(offsets)
        same_length = (stops - starts) == lengths
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(len(ids))
        if same_length.all():
            row = np.repeat(np.arange(len(lengths)), lengths)
            differ = np.bincount(row[self.ids[index] != ids], minlength=len(lengths)) > 0
        else:
            differ = ~same_length
        if np.any(differ):
            first = example_ids[int(np.argmax(differ))]
            raise InputError(
                f"input_ids differ for example_id {first!r} between the output and the reference "
                f"{self.path}: both must be scored from the same rendered tokens"
            )
        return self.logprobs[index]

    def excess_loss(self, table: pa.Table) -> np.ndarray:
        """``loss_A - loss_B = logprobs_B - logprobs_A`` per flat token (NaN at t = 0)."""
        logprobs, _ = flat_list(table["logprobs"])
        return (self.logprobs_for(table) - logprobs).astype(np.float32)


def combine(
    out: str | Path, reference: str | Path, into: str | Path, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``out``'s rows with ``reference``'s log-probabilities joined in, as a new output.

    Refused (nothing written) unless both outputs hold the same tokens (see :class:`Reference`).
    Shards keep ``out``'s numbering, so a rerun after an interruption finishes the missing ones;
    a finished ``into`` is left alone unless ``overwrite``. Returns the new manifest.
    """
    out, into = Path(out), Path(into)
    if into.resolve() in (out.resolve(), Path(reference).resolve()):
        raise InputError(f"--into {into} must be a new directory, not one of the inputs")
    manifest = read_manifest(out)
    problems = verify(out)
    if problems:
        raise InputError(f"{out}: damaged output ({'; '.join(problems)})")
    ref = Reference(out, reference)
    ref_manifest = read_manifest(ref.path)
    # Check every row before writing any: a refusal leaves no half-combined output behind.
    # Shard by shard, ids only: OUT is never held in memory whole.
    shards = manifest["shards"]
    for shard in shards:
        ref.logprobs_for(pq.read_table(out / shard["file"], columns=["example_id", "input_ids"]))
    source = {"path": str(out), "shards": [s["sha256"] for s in shards]}
    target = OutputDir(into)
    with target.open({"combine": source, "reference": ref.describe()}, overwrite=overwrite):
        for index, shard in enumerate(shards):
            if target.shard_done(index):
                continue
            table = pq.read_table(out / shard["file"])
            ref_logprobs = ref.logprobs_for(table)
            logprobs, offsets = flat_list(table["logprobs"])
            offsets = pa.array(offsets, type=pa.int32())
            for name, values in (("reference_logprobs", ref_logprobs),
                                 ("excess_loss", ref_logprobs - logprobs)):
                column = pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.float32)))
                table = table.append_column(name, column)
            name = Path(shard["file"]).stem
            rejected_file = out / "rejected" / f"{name}.jsonl"
            try:
                lines = rejected_file.read_text(encoding="utf-8").split("\n")
            except FileNotFoundError:  # never combined as "no rejected rows"
                raise InputError(
                    f"{rejected_file} is missing; rerun the `profit-prep score` command that "
                    f"wrote {out} (it scores that shard again), then this command") from None
            rejected = [json.loads(line) for line in lines if line]
            target.write_shard(index, table, rejected)
        kept = {k: v for k, v in manifest.items()
                if k not in ("format_version", "counts", "shards", "schema")}
        return target.finalize(
            {
                **kept,
                "columns": {**manifest.get("columns", {}), **COMBINED_DOCS},
                "combined_from": source,
                "reference": {
                    **ref.describe(),
                    "model": ref_manifest.get("model"),
                    "scorer": ref_manifest.get("scorer"),
                },
            },
            len(shards),
        )
