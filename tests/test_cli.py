"""The command line as a user runs it: help, one-line errors, and the real model end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep.config import ScoreConfig
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
        (["--prompt-field", "question", "--response-field", "nope"], "column 'nope' not found"),
        (["--prompt-field", "question", "--response-field", "answer", "--model", "/no/such/model"],
         "no such folder"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, extra, message) -> None:
    result = run_cli("score", "--data", str(DEMO_GSM8K), "--out", str(tmp_path / "o"), *extra)
    assert_one_error_line(result, message)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from profit_prep.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_help_lists_every_option_choices() -> None:
    """Each command's --help shows the values of every option that has choices, and a choice
    declared on a dataclass field (ScoreConfig, MaskRule) is exactly argparse's list."""
    from profit_prep.rules.profit import MaskRule

    declared = {f.name: tuple(f.metadata["choices"])
                for cls in (ScoreConfig, MaskRule) for f in dataclasses.fields(cls)
                if "choices" in f.metadata}
    assert {"strategy", "protect", "format", "backend", "dtype", "device"} <= set(declared)
    seen = 0
    for name, sub in _subcommands().items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if not action.choices:
                continue
            seen += 1
            assert "{" + ",".join(map(str, action.choices)) + "}" in text, (name, action.dest)
            if action.dest in declared:
                assert tuple(action.choices) == declared[action.dest], (name, action.dest)
    assert seen >= 12


BOGUS = [
    ("score", ["--data", "d.jsonl", "--out", "{o}"], "--strategy"),
    ("score", ["--data", "d.jsonl", "--out", "{o}"], "--format"),
    ("score", ["--data", "d.jsonl", "--out", "{o}"], "--backend"),
    ("score", ["--data", "d.jsonl", "--out", "{o}"], "--device"),
    ("score", ["--data", "d.jsonl", "--out", "{o}"], "--protect"),
    ("inspect", ["{o}"], "--strategy"),
    ("stats", ["{o}"], "--protect"),
    ("report", ["{o}", "--html", "{o}/r.html"], "--strategy"),
    ("export", ["{o}", "--dest", "{o}/x"], "--to"),
]


@pytest.mark.parametrize(("command", "args", "flag"), BOGUS)
def test_bogus_choice_is_refused_before_anything_starts(
    tmp_path: Path, command: str, args: list[str], flag: str, capsys
) -> None:
    """exit 2, the valid choices named, nothing written (argparse checks, from the fields)."""
    from profit_prep.cli import main

    out = tmp_path / "o"
    argv = [command, *(a.format(o=out) for a in args), flag, "bogus"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    action = next(a for a in _subcommands()[command]._actions if flag in a.option_strings)
    assert f"argument {flag}" in err and "invalid choice: 'bogus'" in err
    assert all(repr(str(c)) in err for c in action.choices), err
    assert not out.exists()


def test_the_rule_seed_has_one_name(tmp_path: Path) -> None:
    """--rule-seed sets the rule's seed on every command; report's --seed samples examples."""
    parsers = _subcommands()
    for command in ("score", "inspect", "stats", "export", "report"):
        extra = ["--data", "d", "--out", "o"] if command == "score" else ["o"]
        args = parsers[command].parse_args([*extra, "--rule-seed", "7"])
        assert args.seed == 7, command
    assert parsers["inspect"].parse_args(["o", "--seed", "3"]).seed == 3
    report = parsers["report"].parse_args(["o", "--seed", "3"])
    assert (report.seed, report.sample_seed) == (None, 3)


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
        resp, ids = np.array(row["response_mask"]), np.array(row["input_ids"])
        # The default rule: p >= 0.1, and the answer's <|im_end|> (id 2) protected.
        assert np.array_equal(np.array(row["loss_mask"]),
                              resp & ((np.exp(lp) >= 0.1) | (ids == 2)))
        assert row["n_kept"] == int(np.sum(row["loss_mask"])) < row["n_response"]
    assert worst < 1e-4, worst
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["scored_rows"] == 8 and len(manifest["shards"]) == 3
    assert manifest["mask"] == {"strategy": "higher", "tau": 0.1, "protect": "end_of_turn"}
    assert manifest["render"]["end_of_turn_ids"] == [2]
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


def _gsm_args(out: Path, model: Path, *extra: str) -> list[str]:
    return ["score", "--data", str(DEMO_GSM8K), "--out", str(out), "--model", str(model),
            "--prompt-field", "question", "--response-field", "answer", "--limit", "4",
            "--quiet", *extra]


@pytest.mark.parametrize(("extra", "message"), [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "-1"], "--limit must be at least 1"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
    (["--max-in-flight", "0"], "--max-in-flight must be at least 1"),
])
def test_out_of_range_numbers_are_one_line(tmp_path: Path, tiny_model_dir: Path, extra,
                                           message) -> None:
    args = _gsm_args(tmp_path / "o", tiny_model_dir)
    args[args.index("--limit") : args.index("--limit") + 2] = []
    assert_one_error_line(run_cli(*args, *extra), message)
    assert not (tmp_path / "o").exists()


def test_overwrite_on_a_users_folder_deletes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The folder holding the input: the refusal names the files and suggests no --overwrite."""
    folder = tmp_path / "project"
    folder.mkdir()
    data = folder / "train.jsonl"
    data.write_bytes(DEMO_GSM8K.read_bytes())
    args = _gsm_args(folder, tiny_model_dir)
    args[args.index("--data") + 1] = str(data)
    refused = run_cli(*args)
    assert_one_error_line(refused, "holds no profit-prep output")
    assert "--overwrite" not in refused.stderr
    assert_one_error_line(run_cli(*args, "--overwrite"), "holds no profit-prep output")
    assert sorted(p.name for p in folder.iterdir()) == ["train.jsonl"]
    assert data.read_bytes() == DEMO_GSM8K.read_bytes()


def test_out_that_is_a_file_is_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "o").write_text("x")
    assert_one_error_line(run_cli(*_gsm_args(tmp_path / "o", tiny_model_dir)), "is a file")


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path: Path, tiny_model_dir: Path,
                                                      monkeypatch, capsys) -> None:
    import errno

    import pyarrow.parquet

    from profit_prep.cli import main

    real, calls = pyarrow.parquet.write_table, []

    def fill_up(table, where, **kw):  # the second shard's write finds the disk full
        calls.append(where)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", where)
        return real(table, where, **kw)

    monkeypatch.setattr(pyarrow.parquet, "write_table", fill_up)
    args = _gsm_args(tmp_path / "o", tiny_model_dir, "--shard-size", "2")
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith("error: No space left on device: "), err
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert not list((tmp_path / "o" / "data").glob(".part-*"))  # no half-written shard
    assert main(args) == 0  # the disk has room again: the rerun finishes the missing shard
    assert "scored" in capsys.readouterr().out


def test_damaged_inputs_and_outputs_are_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "o"
    assert run_cli(*_gsm_args(out, tiny_model_dir)).returncode == 0
    (out / "run.json").write_text("{truncated")
    assert_one_error_line(run_cli(*_gsm_args(out, tiny_model_dir)), "run.json is damaged")
    bad = tmp_path / "in.parquet"
    bad.write_bytes(b"PAR1 not really")
    args = _gsm_args(tmp_path / "o2", tiny_model_dir)
    args[args.index("--data") + 1] = str(bad)
    assert_one_error_line(run_cli(*args), "not a readable Parquet file")


def test_deeply_nested_rows_are_rejected_and_the_run_goes_on(tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    good = {"prompt": "What is 2+2?", "completion": "4"}
    deep = '{"prompt": "q", "completion": ' + "[" * 50_000 + "]" * 50_000 + "}"
    tools = {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "ok",
                           "meta": json.loads("[" * 900 + "]" * 900)}]}
    data = write_jsonl(tmp_path / "d.jsonl", [good, deep, good, json.dumps(tools)])
    result = run_cli("score", "--data", str(data), "--out", str(tmp_path / "o"), "--model",
                     str(tiny_model_dir), "--format", "prompt_completion", "--quiet")
    assert result.returncode == 0, result.stderr
    rejected = [json.loads(line) for line in (tmp_path / "o" / "rejected.jsonl").open()]
    reasons = {r["source_index"]: r["reason"] for r in rejected}
    assert reasons[1] == "JSON nested too deeply to parse"
    assert {0, 2} <= set(pq.read_table(tmp_path / "o" / "data")["source_index"].to_pylist())


def test_quiet_prints_only_the_summary(tmp_path: Path, tiny_model_dir: Path) -> None:
    """--quiet: no progress line and no library chatter (transformers' weight-loading bar)."""
    result = run_cli("score", "--model", str(tiny_model_dir), "--data", str(DEMO_GSM8K),
                     "--out", str(tmp_path / "out"), "--prompt-field", "question",
                     "--response-field", "answer", "--limit", "2", "--backend", "transformers",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    assert "2 scored" in result.stdout
    assert result.stderr == ""
