"""The million-row path of benchmarks/scale.py at 20,000 rows, through the real CLI.

Mixed-format rows (messages, ShareGPT, Alpaca, prompt/completion, a few of no known format, a few
repeated ids) are scored with the null scorer and the SmolLM2 tokenizer, verified, summarised with
``stats --json`` and loaded; a second run is killed with SIGKILL at ~60% of its shards and rerun,
and must end with the same output as the uninterrupted one. Speed targets are the benchmark's
(docs/benchmarks.md), not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from scale import KINDS, write_conversations  # noqa: E402


def test_synthetic_rows_mix_every_format_deterministically(tmp_path: Path) -> None:
    held = write_conversations(tmp_path / "a.jsonl", 10_000)
    assert write_conversations(tmp_path / "b.jsonl", 10_000) == held
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 10_000 and held["unknown_format"] == 1 and held["repeated_id"] == 2
    assert all(held[k] > 2000 for k in KINDS)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) - held["repeated_id"]
    keys = {"messages", "conversations", "instruction", "prompt"}
    assert sum(not keys & set(r) for r in rows) == held["unknown_format"]


@pytest.mark.slow
def test_twenty_thousand_rows_through_score_verify_stats_load_and_kill_9(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    rows, shard_size = 20_000, 1000  # run.py --scale's path, at 1/50 of its rows
    figures = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--scale", "--scale-rows",
         str(rows), "--ceiling-rows", "0", "--json", str(figures)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(figures.read_text())
    assert res["complete"] and res["scale_rows"] == rows
    held, counts = res["scale_input"], res["scale_score"]["counts"]
    # Every row scored once or rejected once, for the reasons planted in the input.
    assert counts["scored_rows"] == sum(held[k] for k in KINDS)
    assert counts["rejected_rows"] == held["unknown_format"] + held["repeated_id"] > 0
    assert res["scale_score"]["formats"] == {k: held[k] for k in sorted(KINDS)}
    assert res["scale_tokens"] == counts["tokens"] > rows * 20
    # kill -9 at ~60% of the shards, then a rerun: the same shards, no row lost or doubled.
    kill = res["scale_kill"]
    n_shards = rows // shard_size
    assert kill["of_shards"] == n_shards
    assert 0.5 * n_shards <= kill["killed_at_shards"] < n_shards
    assert kill["killed_at_shards"] <= kill["resumed_shards"] < n_shards
    assert kill["equal"] and kill["shards_identical_files"] == n_shards
    assert kill["rows"] == {"scored": counts["scored_rows"], "rejected": counts["rejected_rows"],
                            "lost": 0, "doubled": 0, "once": True}
    assert res["scale_kill_resume_equal"] is True
    # A rerun of the finished output scores nothing.
    assert res["scale_rerun_noop"]["rc"] == 0
    assert res["scale_rerun_noop"]["resumed_shards"] == n_shards
    assert res["scale_verify_ok"] and res["scale_stats_ok"]
    assert res["scale_load"]["rows"] == counts["scored_rows"]
    assert res["scale_load"]["tokens_per_s"] > 0
    # Peak RSS of the score process on 10% of the rows and on all: reported, and flat.
    rss = res["scale_rss"]
    assert rss[f"peak_mb_{rows // 10}_rows"] > 100 and rss[f"peak_mb_{rows}_rows"] > 100
    assert res["scale_rss_growth"] <= 1.10, rss
    for key in ("scale_plan_s", "scale_rerun_noop_s", "scale_run_json_bytes"):
        assert res[key] > 0, key
    # The manifest lists one entry per shard (not per row): small.
    assert res["scale_manifest_bytes"] < 600 * n_shards + 20_000
    assert res["scale_targets"]["scale_kill_resume_equal"]["met"] is True
    # Skipped here (Ray runs): present, and null with the reason.
    assert res["pipeline_ceiling_tokens_per_s"] is None and res["pipeline_ceiling_error"]
    assert "scale_rss_growth" in proc.stdout  # the printed table
