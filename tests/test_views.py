"""`profit-prep stats` and `inspect` on a real scored output, checked against the Parquet itself."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from profit_prep.cli import main

SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
HEADER = re.compile(
    r"^─── example (\S+) \(source row \d+\) · (\d+) tokens · (\d+) response · "
    r"(\d+) kept · ([\d.]+)% masked",
    re.M,
)


def read_rows(out: Path) -> pd.DataFrame:
    """Every row of the output, in shard order, read by pandas (not by the code under test)."""
    files = sorted((out / "data").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def row_arrays(row: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    resp = np.asarray(row["response_mask"], dtype=bool)
    p = np.exp(np.asarray(row["logprobs"], dtype=np.float64))
    loss = np.asarray(row["loss_mask"], dtype=bool)
    return ids, resp, p, loss


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_stats_json_matches_a_direct_computation(
    scored_output: Path, smollm2_tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "stats", str(scored_output), "--json")
    assert code == 0
    stats = json.loads(out)
    rows = read_rows(scored_output)

    tokens = response = kept = 0
    masked_ids: Counter[int] = Counter()
    kept_ids: Counter[int] = Counter()
    resp_probs: list[np.ndarray] = []
    per_example: list[float] = []
    ends = ends_below = 0  # answers' <|im_end|> (id 2): protected, whatever their p
    for _, row in rows.iterrows():
        ids, resp, p, loss = row_arrays(row)
        end = resp & (ids == 2)
        ends += int(end.sum())
        ends_below += int((end & ~(p >= 0.1)).sum())
        tokens += len(ids)
        response += int(resp.sum())
        kept += int(loss.sum())
        masked = resp & ~loss
        masked_ids.update(ids[masked].tolist())
        kept_ids.update(ids[loss].tolist())
        resp_probs.append(p[resp])
        if resp.any():
            per_example.append(masked.sum() / resp.sum())
    probs = np.concatenate(resp_probs)

    assert stats["examples"] == len(rows) == 24
    assert (stats["tokens"], stats["response_tokens"], stats["kept_tokens"]) == (
        tokens,
        response,
        kept,
    )
    assert stats["masked_fraction"] == pytest.approx(1 - kept / response)
    assert stats["rule"] == {"strategy": "higher", "tau": 0.1, "protect": "end_of_turn"}
    assert stats["end_of_turn"] == {"tokens": ends, "masked": 0, "masked_fraction": 0.0}
    assert ends == 24 and ends_below > 0  # protection really kept some
    # The sweep is the paper's rule at each tau: at 0.1 it masks what the stored mask masks,
    # plus the protected end-of-turn tokens below 0.1.
    for point, tau in zip(stats["threshold_sweep"]["points"], SWEEP, strict=True):
        below = int((~(probs >= tau)).sum())
        assert point["tau"] == tau
        assert point["masked_tokens"] == below
        assert point["masked_fraction"] == pytest.approx(below / response)
    at_stored = next(p for p in stats["threshold_sweep"]["points"] if p["tau"] == 0.1)
    assert at_stored["masked_tokens"] == response - kept + ends_below

    counts, edges = np.histogram(probs[np.isfinite(probs)], bins=20, range=(0, 1))
    assert stats["probability_histogram"]["counts"] == counts.tolist()
    assert stats["probability_histogram"]["edges"] == pytest.approx(edges.tolist())
    assert sum(counts) == response

    for key, counter in (("top_masked", masked_ids), ("top_kept", kept_ids)):
        top = stats[key]
        assert len(top) == min(20, len(counter))
        assert [t["count"] for t in top] == [c for _, c in counter.most_common(20)]
        for t in top:
            assert t["count"] == counter[t["token_id"]]
            assert t["token"] == smollm2_tokenizer.decode([t["token_id"]])

    per = stats["per_example_masked_fraction"]
    frac = np.array(per_example)
    assert per["examples_with_response"] == len(frac)
    assert per["mean"] == pytest.approx(frac.mean())
    assert per["quantiles"]["median"] == pytest.approx(np.median(frac))
    assert per["quantiles"]["min"] == pytest.approx(frac.min())
    assert per["quantiles"]["max"] == pytest.approx(frac.max())
    assert per["histogram"]["counts"] == np.histogram(frac, bins=20, range=(0, 1))[0].tolist()


@pytest.mark.slow
def test_stats_rethresholds_and_prints_text(
    scored_output: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = read_rows(scored_output)
    response = masked = 0
    for _, row in rows.iterrows():
        ids, resp, p, _ = row_arrays(row)
        response += int(resp.sum())
        masked += int((resp & ~(p >= 0.3) & (ids != 2)).sum())  # answers' ends stay protected
    code, out, _ = run_cli(capsys, "stats", str(scored_output), "--json", "--tau", "0.3")
    stats = json.loads(out)
    assert code == 0 and stats["rule_source"] == "re-thresholded"
    assert stats["masked_tokens"] == masked
    assert stats["kept_tokens"] == response - masked

    code, out, _ = run_cli(capsys, "stats", str(scored_output))
    assert code == 0
    assert "threshold sweep" in out and "most often masked" in out
    assert f"{response} response" in out


def expected_brackets(row: pd.Series, tokenizer, tau: float) -> list[str]:
    """The masked tokens of one row as the plain view shows them: ``[text]``, newlines as \\n."""
    ids, resp, p, _ = row_arrays(row)
    masked = resp & ~(p >= tau) & (ids != 2)  # the answer's <|im_end|> is protected
    return [tokenizer.decode([int(i)]).replace("\n", "\\n") for i in ids[masked]]


def check_plain_view(text: str, rows: pd.DataFrame, tokenizer, tau: float, n: int) -> None:
    assert "\x1b[" not in text
    heads = list(HEADER.finditer(text))
    assert len(heads) == n
    by_id = {str(r["example_id"]): r for _, r in rows.iterrows()}
    for k, head in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        block = text[head.end() : end]
        row = by_id[head.group(1)]
        want = expected_brackets(row, tokenizer, tau)
        assert re.findall(r"\[([^\]]*)\]", block) == want
        _, resp, _, _ = row_arrays(row)
        assert int(head.group(2)) == len(resp) and int(head.group(3)) == int(resp.sum())
        assert int(head.group(4)) == int(resp.sum()) - len(want)
    # Prompt text shows plainly, special tokens included.
    assert "<|im_start|>user" in text


@pytest.mark.slow
def test_inspect_plain_marks_exactly_the_masked_tokens(
    scored_output: Path, smollm2_tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = read_rows(scored_output)
    code, out, _ = run_cli(capsys, "inspect", str(scored_output), "--limit", "4")
    assert code == 0
    check_plain_view(out, rows, smollm2_tokenizer, 0.1, 4)
    assert "(4 of 24 examples shown)" in out

    # Re-thresholding: now every response token with p < 0.5 is bracketed.
    code, out, _ = run_cli(
        capsys, "inspect", str(scored_output), "--limit", "3", "--tau", "0.5", "--color", "never"
    )
    assert code == 0 and "higher tau=0.5 (re-thresholded)" in out
    check_plain_view(out, rows, smollm2_tokenizer, 0.5, 3)


@pytest.mark.slow
def test_inspect_row_grep_and_errors(
    scored_output: Path, smollm2_tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = read_rows(scored_output)
    wanted = str(rows["example_id"].iloc[7])
    code, out, _ = run_cli(capsys, "inspect", str(scored_output), "--row", wanted)
    assert code == 0 and [m.group(1) for m in HEADER.finditer(out)] == [wanted]

    # --grep: exactly the examples whose decoded text contains the word (case-insensitive).
    texts = {
        str(r["example_id"]): smollm2_tokenizer.decode(list(r["input_ids"]))
        for _, r in rows.iterrows()
    }
    hits = [i for i, t in texts.items() if "clips" in t.lower()]
    assert hits
    code, out, _ = run_cli(
        capsys, "inspect", str(scored_output), "--grep", "CLIPS", "--limit", "50"
    )
    assert code == 0 and [m.group(1) for m in HEADER.finditer(out)] == hits

    code, _, err = run_cli(capsys, "inspect", str(scored_output), "--row", "no-such-id")
    assert code == 2 and err.strip().splitlines() == [
        "error: no example with id 'no-such-id' in this output"
    ]
    code, _, err = run_cli(capsys, "stats", str(scored_output), "--tau", "1.5")
    assert code == 2 and err.startswith("error: tau must be a probability")
    code, _, err = run_cli(capsys, "inspect", str(scored_output.parent / "missing"))
    assert code == 2 and "not a profit-prep output" in err


def run_in_pty(argv: list[str], timeout: float = 180) -> str:
    """Run a command with its stdout on a pseudo-terminal; return what it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv,
        stdout=slave,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TERM": "xterm-256color", "NO_COLOR": ""},
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:  # read as it comes: a full pty buffer would block the child
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data or time.monotonic() > deadline:
            break
        chunks.append(data)
    os.close(master)
    proc.wait(timeout=30)
    assert proc.returncode == 0
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_inspect_in_a_terminal_is_coloured(scored_output: Path) -> None:
    from profit_prep.views.terminal import MASKED_STYLE, PROMPT_STYLE

    text = run_in_pty(
        [sys.executable, "-m", "profit_prep.cli", "inspect", str(scored_output), "--limit", "2"]
    )
    assert MASKED_STYLE in text and PROMPT_STYLE in text
    assert re.search(r"\x1b\[38;5;\d+m", text)  # response tokens coloured by probability
    assert "[token] = masked" not in text  # the plain legend is for pipes only
    # --color never wins over the terminal.
    text = run_in_pty(
        [
            sys.executable,
            "-m",
            "profit_prep.cli",
            "inspect",
            str(scored_output),
            "--limit",
            "1",
            "--color",
            "never",
        ]
    )
    assert "\x1b[" not in text and "───" in text


def test_top1_column_is_shown_next_to_masked_tokens(
    tmp_path: Path, smollm2_dir: Path, smollm2_tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A future ``top1_id`` column: the model's top-1 token follows each masked token."""
    from profit_prep.store.schema import ScoredExample, to_table
    from profit_prep.store.writer import OutputDir

    tok = smollm2_tokenizer
    ids = np.array(tok("Hello world, this is fine.")["input_ids"], dtype=np.int32)
    n = len(ids)
    resp = np.arange(n) >= 2
    logprobs = np.log(np.where(np.arange(n) % 2 == 1, 0.05, 0.9)).astype(np.float32)
    logprobs[0] = np.nan
    loss = resp & (np.exp(logprobs) >= 0.1)
    top1 = np.full(n, tok.convert_tokens_to_ids("!"), dtype=np.int32)
    example = ScoredExample("ex-0", 0, ids, resp, logprobs, loss, False, n, extra={"top1_id": top1})
    out = OutputDir(tmp_path / "out")
    with out.open({"test": 1}):
        out.write_shard(0, to_table([example]), [])
        out.finalize(
            {"tokenizer": {"path": str(smollm2_dir)}, "mask": {"strategy": "higher", "tau": 0.1}}, 1
        )
    code, text, _ = run_cli(capsys, "inspect", str(out.path), "--color", "never")
    assert code == 0
    p = np.exp(logprobs.astype(np.float64))
    want = [f"{tok.decode([int(i)])}|!" for i in ids[resp & ~(p >= 0.1)]]
    body = text[HEADER.search(text).end() :]  # after the legend, which shows "[token]"
    assert want and re.findall(r"\[([^\]]*)\]", body) == want


# -- --color-by and --compare on a real output with signals -------------------------------------

QS = np.linspace(0, 1, 6)


@pytest.fixture(scope="module")
def signals_out(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """8 GSM8K rows scored by the tiny Llama with every signal (entropy, top1, rank).

    Its random weights give p of about 1/vocab, so tau = 2e-5 (near the median) makes the stored
    mask keep about half the response tokens, like a real model at tau = 0.1.
    """
    from tests.conftest import score_demo

    return score_demo(
        tmp_path_factory.mktemp("sig") / "out",
        tiny_model_dir,
        signals="entropy,top1,rank",
        tau=2e-5,
    )


def response_values(rows: pd.DataFrame, column: str) -> list[np.ndarray]:
    """Per row, the stored column on response tokens (float64), read by pandas."""
    return [
        np.asarray(r[column], dtype=np.float64)[np.asarray(r["response_mask"], dtype=bool)]
        for _, r in rows.iterrows()
    ]


def oracle_buckets(rows: pd.DataFrame, column: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Quantile edges (distinct) over all response tokens, and each row's bucket per token."""
    per_row = response_values(rows, column)
    values = np.concatenate(per_row)
    edges = np.unique(np.quantile(values[np.isfinite(values)], QS))
    return edges, [np.digitize(v, edges[1:-1]) for v in per_row]


def blocks(text: str, header: re.Pattern[str]) -> dict[str, str]:
    """Example id -> the text between its header and the next one."""
    heads = list(header.finditer(text))
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return {h.group(1): text[h.end() : e] for h, e in zip(heads, ends, strict=True)}


@pytest.mark.parametrize("column", ["entropy", "rank", "top1_logprob", "logprobs"])
def test_color_scale_buckets_equal_numpy_quantiles(signals_out: Path, column: str) -> None:
    from profit_prep.views.colors import color_scale
    from profit_prep.views.flat import load_flat

    rows = read_rows(signals_out)
    edges, want = oracle_buckets(rows, column)
    flat = load_flat(signals_out, columns=[column])
    scale = color_scale(flat, column)
    assert scale.edges == pytest.approx(edges, rel=1e-12)
    got = scale.bucket(flat.column(column))[flat.response]
    assert np.array_equal(got, np.concatenate(want))
    assert got.min() == 0 and got.max() == len(edges) - 2  # every bucket is reachable


def test_inspect_color_by_shades_and_prints_values(
    signals_out: Path, smollm2_tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    from profit_prep.views.terminal import SCALE_CODES

    rows = read_rows(signals_out)
    by_id = {str(r["example_id"]): r for _, r in rows.iterrows()}
    edges, want = oracle_buckets(rows, "entropy")
    assert len(edges) == 6  # distinct floats: five buckets, bucket b drawn in SCALE_CODES[b]
    want_by_id = dict(zip(by_id, want, strict=True))

    code, out, _ = run_cli(
        capsys,
        "inspect",
        str(signals_out),
        "--color-by",
        "entropy",
        "--color",
        "always",
        "--limit",
        "8",
    )
    assert code == 0
    legend, _, rest = out.partition("\n\n")
    for b in range(5):  # the legend prints each bucket's edges in its colour
        assert f"\x1b[38;5;{SCALE_CODES[b]}m■ {edges[b]:.4g}–{edges[b + 1]:.4g}" in legend
    colored = re.compile(r"^\x1b\[1m─── example (\S+) ", re.M)
    shown = blocks(rest, colored)
    assert list(shown) == list(by_id)
    for eid, block in shown.items():
        codes = [int(c) for c in re.findall(r"\x1b\[(?:9;)?38;5;(\d+)m", block)]
        assert codes == [SCALE_CODES[b] for b in want_by_id[eid]]
        # masked response tokens are struck through: exactly the stored mask's
        ids, resp, _, loss = row_arrays(by_id[eid])
        assert len(re.findall(r"\x1b\[9;38;5;\d+m", block)) == int((resp & ~loss).sum())

    # Piped: every response token is followed by its stored value; masked ones stay bracketed.
    code, out, _ = run_cli(
        capsys, "inspect", str(signals_out), "--color-by", "rank", "--limit", "8"
    )
    assert code == 0 and "\x1b[" not in out
    rank_edges, _ = oracle_buckets(rows, "rank")
    assert "rank by quantile over " in out
    assert (
        " · ".join(
            f"q{b} {rank_edges[b]:.4g}–{rank_edges[b + 1]:.4g}" for b in range(len(rank_edges) - 1)
        )
        in out
    )
    for eid, block in blocks(out, HEADER).items():
        stored = response_values(by_id[eid].to_frame().T, "rank")[0]
        assert re.findall(r"\{(-?[\d.e+]+|nan)\}", block) == [str(int(v)) for v in stored]
        ids, resp, _, loss = row_arrays(by_id[eid])
        top1 = np.asarray(by_id[eid]["top1_id"])
        masked = [
            f"{smollm2_tokenizer.decode([int(i)])}|{smollm2_tokenizer.decode([int(t)])}".replace(
                "\n", "\\n"
            )
            for i, t in zip(ids[resp & ~loss], top1[resp & ~loss])
        ]
        assert re.findall(r"\[([^\]]*)\]\{", block) == masked


def numpy_keep(rows: pd.DataFrame, rule: str) -> list[np.ndarray]:
    """Independent per-row keep masks of the rules the compare test uses."""
    out = []
    resp_all = [np.asarray(r["response_mask"], dtype=bool) for _, r in rows.iterrows()]
    if rule == "top:signal=entropy,fraction=0.4,scope=global":
        ent = [np.asarray(r["entropy"], dtype=np.float64) for _, r in rows.iterrows()]
        pool = np.sort(np.concatenate([e[m] for e, m in zip(ent, resp_all, strict=True)]))[::-1]
        threshold = pool[int(np.ceil(0.4 * len(pool))) - 1]
        return [m & (e >= threshold) for e, m in zip(ent, resp_all, strict=True)]
    for (_, r), resp in zip(rows.iterrows(), resp_all, strict=True):
        p = np.exp(np.asarray(r["logprobs"], dtype=np.float64))
        rank = np.asarray(r["rank"], dtype=np.int64)
        if rule == "stored":
            keep = np.asarray(r["loss_mask"], dtype=bool)
        elif rule == "higher:tau=0.000018":
            keep = p >= 0.000018
        elif rule == "band:signal=rank,hi=20000":
            keep = rank <= 20000
        elif rule == "top:signal=loss,fraction=0.3":  # per row: the 30% least likely tokens
            idx = np.flatnonzero(resp)
            order = idx[np.argsort(p[idx], kind="stable")]
            keep = np.zeros(len(p), dtype=bool)
            keep[order[: int(np.ceil(round(0.3 * len(idx), 9)))]] = True
        else:
            raise AssertionError(rule)
        out.append(resp & keep)
    return out


COMPARE_HEADER = re.compile(
    r"^─── example (\S+) \(source row \d+\) · \d+ tokens · (\d+) response · both (\d+) · "
    r"A only (\d+) · B only (\d+) · neither (\d+)",
    re.M,
)


@pytest.mark.parametrize(
    "a, b",
    [
        ("stored", "band:signal=rank,hi=20000"),
        ("higher:tau=0.000018", "top:signal=entropy,fraction=0.4,scope=global"),
        ("top:signal=loss,fraction=0.3", "stored"),
    ],
)
def test_compare_categories_equal_numpy(
    signals_out: Path, smollm2_tokenizer, a: str, b: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from profit_prep.rules.selection import parse_rule, rule_columns
    from profit_prep.views.flat import compare_rules, load_flat

    rows = read_rows(signals_out)
    keep_a, keep_b = numpy_keep(rows, a), numpy_keep(rows, b)
    want = []
    for (_, r), ka, kb in zip(rows.iterrows(), keep_a, keep_b, strict=True):
        resp = np.asarray(r["response_mask"], dtype=bool)
        cat = np.select([ka & kb, ka & ~kb, ~ka & kb], [0, 1, 2], 3)
        want.append(np.where(resp, cat, -1))
    ra, rb = parse_rule(a), parse_rule(b)
    flat = load_flat(signals_out, columns=rule_columns(ra) + rule_columns(rb))
    got = compare_rules(flat, ra, rb).category
    assert np.array_equal(got, np.concatenate(want))
    assert len(set(got[got >= 0].tolist())) >= 3  # a comparison, not one category everywhere

    code, out, _ = run_cli(capsys, "inspect", str(signals_out), "--compare", a, b, "--limit", "8")
    assert code == 0 and out.startswith("compare: A = ")
    heads = {m.group(1): m for m in COMPARE_HEADER.finditer(out)}
    assert len(heads) == 8
    for (_, r), cat in zip(rows.iterrows(), want, strict=True):
        m = heads[str(r["example_id"])]
        counts = [int((cat == c).sum()) for c in range(4)]
        assert [int(m.group(k)) for k in range(3, 7)] == counts
        assert int(m.group(2)) == sum(counts)
    totals = [int((np.concatenate(want) == c).sum()) for c in range(4)]
    assert (
        f"all 8 examples, response tokens kept by: both {totals[0]} · A only {totals[1]} · "
        f"B only {totals[2]} · neither {totals[3]}"
    ) in out
    # The plain markers wrap exactly the tokens of each category.
    for eid, block in blocks(out, COMPARE_HEADER).items():
        row = next(r for _, r in rows.iterrows() if str(r["example_id"]) == eid)
        cat = want[int(row["source_index"])]
        ids = np.asarray(row["input_ids"])
        text = {
            c: [smollm2_tokenizer.decode([int(i)]).replace("\n", "\\n") for i in ids[cat == c]]
            for c in (1, 2)
        }
        assert re.findall(r"\{A:([^}]*)\}", block) == text[1]
        assert re.findall(r"\{B:([^}]*)\}", block) == text[2]


def test_unknown_column_and_bad_rules_are_refused_in_one_line(
    signals_out: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import score_demo

    def error(*argv: str) -> str:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    out = str(signals_out)
    assert error("inspect", out, "--color-by", "nope") == (
        f"error: no per-token column 'nope' in {out}; choose from: prob, logprobs, entropy, "
        "rank, top1_logprob"
    )
    assert "no per-token column 'top1_id'" in error("inspect", out, "--color-by", "top1_id")
    assert "start with one of stored, higher" in error(
        "inspect", out, "--compare", "stored", "bogus"
    )
    assert "expected KEY=VALUE with KEY in tau, tau_low" in error(
        "inspect", out, "--compare", "stored", "higher:cutoff=0.3"
    )
    assert "tau must be a probability" in error(
        "inspect", out, "--compare", "stored", "higher:tau=2"
    )
    assert "is not a float" in error("inspect", out, "--compare", "stored", "top:fraction=x")
    assert "drop --tau" in error("inspect", out, "--compare", "stored", "higher", "--tau", "0.3")
    assert "choose one" in error(
        "inspect", out, "--compare", "stored", "higher", "--color-by", "rank"
    )
    assert "excess_loss needs a reference" in error(
        "inspect", out, "--compare", "stored", "top:signal=excess_loss,fraction=0.5"
    )
    # An output scored without --signals says how to get more columns.
    plain = str(score_demo(tmp_path / "plain", tiny_model_dir, limit=2))
    capsys.readouterr()  # the model's loading messages
    assert error("inspect", plain, "--color-by", "entropy") == (
        f"error: no per-token column 'entropy' in {plain}; choose from: prob, logprobs "
        "(score with --signals entropy,top1,rank for more)"
    )
    assert "no per-token column 'rank'" in error(
        "inspect", plain, "--compare", "stored", "band:signal=rank,hi=3"
    )


# -- control characters from the data never reach the terminal raw ------------------------------

# Each kind of control sequence a dataset can carry: the raw text put into the rows (prompt,
# response and example id), and how the views must show it (visible escapes).
CONTROL_KINDS = {
    "csi-screen-clear": ("\x1b[2J\x1b[H", r"\x1b[2J\x1b[H"),
    "osc-window-title": ("\x1b]0;owned\x07", r"\x1b]0;owned\x07"),
    "osc52-clipboard": ("\x1b]52;c;cm0gLXJmIH4K\x07", r"\x1b]52;c;cm0gLXJmIH4K\x07"),
    "c0-controls": ("\x00\x01\x07\x08\r\x0b\x0c\x1f", r"\x00\x01\x07\x08\x0d\x0b\x0c\x1f"),
    "del": ("\x7f", r"\x7f"),
    "c1-csi": ("\x9b2J", r"\x9b2J"),
    "c1-osc": ("\x9d0;owned\x9c", r"\x9d0;owned\x9c"),
    "bidi-override": ("\u202eevil\u202c", r"\u202eevil\u202c"),
    "bidi-embedding": ("\u202a\u202b\u202d", r"\u202a\u202b\u202d"),
    "bidi-isolate": ("\u2066\u2067\u2068\u2069", r"\u2066\u2067\u2068\u2069"),
    "bidi-marks": ("\u200e\u200f\u061c", r"\u200e\u200f\u061c"),
    "line-separators": ("\u2028\u2029", r"\u2028\u2029"),
    "invisible-tags": ("\U000e0041\U000e0042\u206e", r"\U000e0041\U000e0042\u206e"),
}
# In every row's response, so that control characters are among stats' most frequent tokens.
CONTROL_NOISE = "\x1b[2J\x9b\u202e\x07" * 6
# What must never appear raw in a view: C0 (not line break or tab), DEL, C1, bidi controls,
# line separators, invisible format and tag characters.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e"
                         "\u2066-\u206f\U000e0000-\U000e007f]")
SGR = re.compile(r"\x1b\[[0-9;]*m")  # the views' own colour codes: the only ESC allowed
EVIL_MODEL = "evil\x1b]0;x\x07\u202emodel"


def escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else \
        f"\\U{code:08x}"


def score_controls(out: Path, model: Path) -> Path:
    """One row per kind of control sequence, scored by ``model``; the manifest's model name
    carries control characters too."""
    from profit_prep import ScoreConfig, score
    from tests.conftest import write_jsonl

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": f"id-{kind}-{raw}",
            "question": f"Kind {kind} says {raw} in the prompt.",
            "answer": f"Answer for {kind}: {raw} then {raw}\nand {CONTROL_NOISE} more {raw}.",
        }
        for kind, (raw, _) in CONTROL_KINDS.items()
    ]
    data = write_jsonl(out.parent / "controls.jsonl", rows)
    summary = score(ScoreConfig(data=str(data), out=str(out), model=str(model),
                                prompt_field="question", response_field="answer", id_field="id",
                                tau=2e-5, shard_size=4, backend="transformers", quiet=True))
    assert summary["scored_rows"] == len(CONTROL_KINDS)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["name"] = EVIL_MODEL
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def control_out(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return score_controls(tmp_path_factory.mktemp("controls") / "out", tiny_model_dir)


@pytest.fixture(scope="module")
def control_views(control_out: Path) -> dict:
    """What the real CLI writes to stdout for the views, on an output full of control chars."""
    out = str(control_out)
    commands = {
        "inspect --color always": ["inspect", out, "--limit", "50", "--color", "always"],
        "inspect --color never": ["inspect", out, "--limit", "50", "--color", "never"],
        "inspect --color-by always": ["inspect", out, "--limit", "50", "--color", "always",
                                      "--color-by", "logprobs"],
        "stats": ["stats", out],
        "stats --json": ["stats", out, "--json"],
    }
    views = {}
    for name, argv in commands.items():
        result = subprocess.run([sys.executable, "-m", "profit_prep.cli", *argv],
                                capture_output=True, timeout=600)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        views[name] = result.stdout.decode("utf-8")  # strict: a raw 8-bit C1 byte would fail
    return views


VIEWS = ["inspect --color always", "inspect --color never", "inspect --color-by always", "stats",
         "stats --json"]


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_control_characters_from_the_data_are_shown_escaped(
    control_views: dict, kind: str, view: str
) -> None:
    raw, shown = CONTROL_KINDS[kind]
    text = control_views[view]
    own_codes_removed = SGR.sub("", text)
    assert "\x1b" not in own_codes_removed  # every ESC is one of the view's own colour codes
    assert not RAW_CONTROL.search(own_codes_removed)
    leaked = [c for c in raw if not c.isprintable() and c in own_codes_removed]
    assert not leaked, leaked
    if view.startswith("inspect"):
        assert f"example id-{kind}-{shown} (source row" in own_codes_removed  # the id
        for char in filter(lambda c: not c.isprintable(), raw):  # token texts, escaped
            assert own_codes_removed.count(escaped(char)) >= 3, escaped(char)
    if view == "inspect --color never":
        assert SGR.search(text) is None
    elif view.startswith("inspect"):
        assert SGR.search(text)
    if view == "stats":
        assert r"\x1b" in text and r"\x07" in text  # noise tokens among the top ones
    if view == "stats --json":
        stats = json.loads(text)  # still valid JSON, with the real token texts in it
        tokens = "".join(t["token"] for t in stats["top_masked"] + stats["top_kept"])
        assert "\x1b" in tokens and "\x07" in tokens


def test_stats_json_escapes_every_control_character() -> None:
    from profit_prep.views.text import stats_json, visible

    value = {"token": "".join(raw for raw, _ in CONTROL_KINDS.values()) + "\t\n\u2028é"}
    text = stats_json(value)
    assert json.loads(text) == value and not RAW_CONTROL.search(text) and "é" in text
    assert "\u2028" not in text
    # visible(): escapes, keeps line breaks and tabs, leaves ordinary text (and backslashes) alone
    for raw, shown in CONTROL_KINDS.values():
        assert visible(f"a{raw}\tb\n\\c") == f"a{shown}\tb\n\\c"
    assert visible("x\ud800y") == "x\\ud800y"  # a lone surrogate could not even be printed
    assert visible("naïve 数学 \u00a0 🙂") == "naïve 数学 \u00a0 🙂"


def test_row_accepts_the_id_as_shown(control_out: Path) -> None:
    """--row takes the example id as the views print it (escapes), not only the raw one."""
    out = control_out
    shown = CONTROL_KINDS["csi-screen-clear"][1]
    result = subprocess.run(
        [sys.executable, "-m", "profit_prep.cli", "inspect", str(out), "--row",
         f"id-csi-screen-clear-{shown}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert [m.group(1) for m in HEADER.finditer(result.stdout)] == [
        f"id-csi-screen-clear-{shown}"]


# -- one rule, one signal mapping, in every reader ------------------------------------------------


def test_a_strategy_change_keeps_the_stored_tau_in_load_inspect_stats_and_report(
    tmp_path: Path, tiny_model_dir: Path, private_datasets_cache, capsys
) -> None:
    """Issue 16's example: scored with higher at tau T, every reader masks `lower` at T."""
    import pyarrow.parquet as pq

    from profit_prep.training.loader import load
    from profit_prep.views.flat import load_flat
    from profit_prep.views.report import write_report
    from tests.conftest import score_demo

    first = score_demo(tmp_path / "first", tiny_model_dir, limit=6)
    table = pq.read_table(first / "data")
    resp = np.concatenate(table["response_mask"].to_numpy(zero_copy_only=False))
    lp = np.concatenate(table["logprobs"].to_numpy(zero_copy_only=False))
    tau = float(np.median(np.exp(lp[resp])))  # splits this random model's tokens in two
    out = score_demo(tmp_path / "out", tiny_model_dir, limit=6, tau=tau)

    loaded = np.concatenate([np.array(m, bool) for m in
                             load(out, strategy="lower")["completion_mask"]])
    flat = load_flat(out, strategy="lower")
    np.testing.assert_array_equal(flat.keep, loaded)
    end = flat.end_of_turn
    with np.errstate(invalid="ignore"):
        expect = flat.response & ((np.exp(flat.logprobs) < tau) | end)  # lower, at the stored T
    np.testing.assert_array_equal(loaded, expect)
    assert 0 < (flat.keep & ~end).sum() < (flat.response & ~end).sum()  # the rule really splits

    assert main(["stats", str(out), "--strategy", "lower", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rule"] == {"strategy": "lower", "tau": tau, "protect": "end_of_turn"}
    assert stats["kept_tokens"] == int(loaded.sum())
    page = write_report(out, tmp_path / "r.html", strategy="lower").read_text()
    assert f"lower tau={tau}" in page and f">{int(loaded.sum())}<" in page


def test_top_k_ties_fall_the_same_in_the_loader_and_the_views(tmp_path: Path,
                                                              private_datasets_cache) -> None:
    """Many tokens share the k-th probability: load and the views keep exactly the same ones."""
    from profit_prep.rules.selection import parse_rule
    from profit_prep.store.schema import ScoredExample, to_table
    from profit_prep.store.writer import OutputDir
    from profit_prep.training.loader import load
    from profit_prep.views.flat import load_flat, rule_keep

    rng = np.random.default_rng(0)
    examples = []
    for i in range(6):
        n = 40
        lp = np.log(rng.choice([0.05, 0.2, 0.2, 0.2, 0.7], size=n)).astype(np.float32)
        lp[0] = np.nan
        resp = np.arange(n) >= 5
        examples.append(ScoredExample(str(i), i, rng.integers(3, 99, n).astype(np.int32), resp,
                                      lp, resp.copy(), False, n))
    out = OutputDir(tmp_path / "o")
    with out.open({"t": 1}):
        out.write_shard(0, to_table(examples), [])
        out.finalize({"mask": {"strategy": "higher", "tau": 0.0},
                      "render": {"end_of_turn_ids": []}}, 1)
    for text in ("top:signal=prob,fraction=0.3,scope=global", "top:signal=prob,fraction=0.3",
                 "top:signal=loss,fraction=0.45,scope=global,largest=false"):
        rule = parse_rule(text)
        loaded = np.concatenate([np.array(m, bool) for m in
                                 load(tmp_path / "o", select=rule)["completion_mask"]])
        np.testing.assert_array_equal(rule_keep(load_flat(tmp_path / "o"), rule), loaded, text)


# -- stats shard by shard -------------------------------------------------------------------------

STREAM_RULES = {
    "stored": {},
    "higher": {"tau": 3e-5},
    "lower-unprotected": {"strategy": "lower", "protect": "none"},
    "middle": {"strategy": "middle", "tau_low": 1.8e-5, "tau_high": 2.2e-5},
    "random": {"strategy": "random", "keep_fraction": 0.4, "seed": 7},
}


@pytest.mark.parametrize("rule", STREAM_RULES.values(), ids=STREAM_RULES.keys())
def test_stats_shard_by_shard_equal_the_whole_output(
    signals_out: Path, smollm2_tokenizer, rule: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accumulated over shards, every number (and the order of top tokens) is the whole's."""
    from profit_prep.views.flat import iter_flat, load_flat
    from profit_prep.views.stats import compute_stats
    from profit_prep.views.text import stats_json

    assert len(json.loads((signals_out / "manifest.json").read_text())["shards"]) == 3
    tok = smollm2_tokenizer
    whole = load_flat(signals_out, **rule)
    # Thresholds around this random model's p (about 1/vocab), so the sweep is not all-or-none.
    options = {"thresholds": (1.5e-5, 2e-5, 2.5e-5, 0.5), "bins": 7, "top": 200}
    expect = compute_stats(whole, tok, **options)
    assert compute_stats(iter_flat(signals_out, **rule), tok, **options) == expect
    sweep = [p["masked_tokens"] for p in expect["threshold_sweep"]["points"]]
    assert 0 < sweep[0] < sweep[2] < expect["response_tokens"]
    assert 0 < expect["masked_tokens"] < expect["response_tokens"]

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in rule.items()]
    assert main(["stats", str(signals_out), "--json", *flags]) == 0
    assert capsys.readouterr().out == stats_json(compute_stats(whole, tok)) + "\n"


@pytest.mark.parametrize("rule", STREAM_RULES.values(), ids=STREAM_RULES.keys())
def test_a_shard_read_alone_has_the_rows_of_the_whole(signals_out: Path, rule: dict) -> None:
    """Masks (random's too: drawn per example id and position) do not depend on the shard."""
    from profit_prep.views.flat import iter_flat, load_flat

    whole = load_flat(signals_out, **rule)
    parts = list(iter_flat(signals_out, **rule))
    alone = [load_flat(signals_out, shards=[i], **rule) for i in range(len(parts))]
    assert [p.n_examples for p in parts] == [3, 3, 2]
    for pieces in (parts, alone):
        assert sum((p.example_ids for p in pieces), []) == whole.example_ids
        for name in ("keep", "stored_keep", "response", "input_ids", "logprobs", "end_of_turn",
                     "top1", "source_index"):
            got = np.concatenate([getattr(p, name) for p in pieces])
            np.testing.assert_array_equal(got, getattr(whole, name), name)
    assert load_flat(signals_out, shards=[2, 0], **rule).example_ids == (
        alone[2].example_ids + alone[0].example_ids)


def test_stats_never_holds_more_than_one_shard(
    signals_out: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No column of more rows than a shard holds becomes numpy, and the checksums are read once.

    Counted, not timed: the old stats concatenated every shard into one table first.
    """
    import profit_prep.views.flat as flat_module

    rows: list[int] = []
    checks: list[bool] = []
    flat_list, check_shards = flat_module.flat_list, flat_module.check_shards

    def counting_flat_list(column: Any) -> tuple[np.ndarray, np.ndarray]:
        rows.append(len(column))
        return flat_list(column)

    def counting_check(path: Any, manifest: dict, *, checksum: bool = True) -> None:
        checks.append(checksum)
        return check_shards(path, manifest, checksum=checksum)

    monkeypatch.setattr(flat_module, "flat_list", counting_flat_list)
    monkeypatch.setattr(flat_module, "check_shards", counting_check)
    for rule in ([], ["--strategy", "random", "--keep-fraction", "0.3"]):
        rows.clear()
        checks.clear()
        assert main(["stats", str(signals_out), "--json", *rule]) == 0
        assert json.loads(capsys.readouterr().out)["examples"] == 8
        assert rows and max(rows) == 3  # shards of 3 rows; the whole output has 8
        assert checks.count(True) == 1  # the integrity check: once for the output, not per shard


def test_a_damaged_shard_is_refused_before_any_shard_is_read(
    signals_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from profit_prep.errors import InputError
    from profit_prep.views.flat import iter_flat

    out = tmp_path / "out"
    shutil.copytree(signals_out, out)
    shards = sorted((out / "data").glob("part-*.parquet"))
    shutil.copy(shards[0], shards[-1])  # a valid Parquet file, but not the one the run wrote
    with pytest.raises(InputError, match="damaged output: data/part-00002.parquet"):
        iter_flat(out)  # eager: no shard is yielded (or counted) before the refusal
    assert main(["stats", str(out)]) == 2
    assert "damaged output" in capsys.readouterr().err
