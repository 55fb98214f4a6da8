"""Two-model scores: load(OUT, reference=OTHER) joins by example_id and refuses different tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep.errors import InputError
from profit_prep.loading import load
from tests.conftest import score_demo
from tests.test_rules import rows_of

pytestmark = pytest.mark.usefixtures("private_datasets_cache")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """6 rows scored twice by the tiny model: bfloat16 vs float32 gives different logprobs."""
    base = tmp_path_factory.mktemp("pair")
    a = score_demo(base / "a", tiny_model_dir, limit=6, dtype="bfloat16")
    b = score_demo(base / "b", tiny_model_dir, limit=6, shard_size=4)
    return a, b


def test_excess_loss_equals_difference_of_losses(pair: tuple[Path, Path]) -> None:
    a, b = pair
    rows_a, rows_b = rows_of(a), rows_of(b)
    ds = load(a, reference=b)
    assert "excess_loss" in ds.column_names
    differs = 0
    for e, x in zip(ds["example_id"], ds["excess_loss"], strict=True):
        x = np.array(x, float)
        want = (-rows_a[e]["logprobs"]) - (-rows_b[e]["logprobs"])
        assert np.isnan(x[0])
        np.testing.assert_allclose(x[1:], want[1:], atol=1e-6, rtol=0)
        differs += int(np.any(np.abs(want[1:]) > 1e-4))
    assert differs > 0  # the two models really differ


def test_refused_naming_first_row_whose_tokens_differ(
    pair: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    a, _ = pair
    lengths = {r["example_id"]: len(r["input_ids"]) for r in pq.read_table(a / "data").to_pylist()}
    cut = sorted(lengths.values())[-1] - 1  # truncating at this length changes only the longest
    other = score_demo(tmp_path / "cut", tiny_model_dir, limit=6, max_length=cut)
    order = pq.read_table(a / "data", columns=["example_id"])["example_id"].to_pylist()
    first = next(e for e in order if lengths[e] > cut)
    with pytest.raises(InputError, match=f"input_ids differ for example_id '{first}'"):
        load(a, reference=other)
    partial = score_demo(tmp_path / "partial", tiny_model_dir, limit=4)
    with pytest.raises(InputError, match="is not in the reference output"):
        load(a, reference=partial)
