"""The command line as a user runs it: help, one-line errors, and the real model end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep.pipeline import ScoreConfig
from tests.conftest import ALPACA, DEMO_GSM8K, assert_one_error_line, need_shared, write_jsonl
from tests.test_scoring import oracle_logprobs


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profit_prep.cli", *args],
                          capture_output=True, text=True, timeout=900)


def test_score_help_documents_every_option() -> None:
    result = run_cli("score", "--help")
    assert result.returncode == 0
    for f in dataclasses.fields(ScoreConfig):
        assert "--" + f.name.replace("_", "-") in result.stdout, f.name


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "yaml"], "unknown --format 'yaml'"),
        (["--prompt-field", "question", "--response-field", "nope"], "column 'nope' not found"),
        (["--strategy", "best"], "unknown strategy 'best'"),
        (["--prompt-field", "question", "--response-field", "answer", "--model", "/no/such/model"],
         "no such folder"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, extra, message) -> None:
    result = run_cli("score", "--data", str(DEMO_GSM8K), "--out", str(tmp_path / "o"), *extra)
    assert_one_error_line(result, message)


@pytest.mark.slow
def test_real_model_gsm8k_matches_oracle_and_mask_rule(tmp_path: Path, smollm2_dir: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("score", "--model", str(smollm2_dir), "--data", str(DEMO_GSM8K),
                     "--out", str(out), "--prompt-field", "question", "--response-field",
                     "answer", "--limit", "8", "--shard-size", "3")
    assert result.returncode == 0, result.stderr
    assert "8 scored, 0 rejected" in result.stdout
    rows = pq.read_table(out / "data").sort_by("source_index").to_pylist()
    assert [r["example_id"] for r in rows] == [str(i) for i in range(8)]
    expected = oracle_logprobs(smollm2_dir, [np.array(r["input_ids"]) for r in rows])
    worst = 0.0
    for row, exp in zip(rows, expected):
        lp = np.array(row["logprobs"], dtype=np.float32)
        worst = max(worst, float(np.nanmax(np.abs(lp[1:] - exp[1:]))))
        resp = np.array(row["response_mask"])
        assert np.array_equal(np.array(row["loss_mask"]), resp & (np.exp(lp) >= 0.1))
        assert row["n_kept"] == int(np.sum(row["loss_mask"])) < row["n_response"]
    assert worst < 1e-4, worst
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["scored_rows"] == 8 and len(manifest["shards"]) == 3
    assert manifest["mask"] == {"strategy": "higher", "tau": 0.1}
    assert manifest["tokenizer"]["fingerprint"] and manifest["model"]["content_hash"]


@pytest.mark.slow
def test_real_alpaca_data_and_every_reader(tmp_path: Path, smollm2_dir: Path) -> None:
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    rows = json.loads(need_shared(ALPACA).read_text())[:6]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    result = run_cli("score", "--model", str(smollm2_dir), "--data", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    n_tok = pq.read_table(out / "data")["n_tokens"].to_pylist()
    assert len(n_tok) == 6
    assert pd.read_parquet(out / "data")["n_tokens"].tolist() == n_tok
    assert pl.read_parquet(out / "data" / "*.parquet")["n_tokens"].to_list() == n_tok
    total = duckdb.sql(f"select sum(n_tokens) from '{out}/data/*.parquet'").fetchall()[0][0]
    assert total == sum(n_tok)
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert ds["n_tokens"] == n_tok and len(ds[0]["input_ids"]) == n_tok[0]


def test_bad_input_file_finishes_with_summary(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        "{oops",
        {"instruction": "Say nothing", "input": "", "output": ""},
    ])
    result = run_cli("score", "--model", str(tiny_model_dir), "--data", str(data),
                     "--out", str(tmp_path / "o"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "1 scored, 2 rejected" in result.stdout
    assert "rejected.jsonl" in result.stdout
