"""Real trainers on exported masks: LLaMA-Factory and axolotl train 2 steps with their own CLI in
their own venv, ms-swift's template encodes the exported messages.

The oracle is independent of the exporter: the kept tokens are recomputed from the shards'
log-probabilities, and the masked loss is a plain transformers forward of the same rows.
Venvs: scripts/trainer_venvs.sh (built once per machine); a test skips only when the package
registry is unreachable (exit 75).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, score_demo

pytestmark = [pytest.mark.slow, pytest.mark.trainers]

TAU = 0.3  # re-thresholded at export: many mask boundaries, and a loss far from the unmasked one
ROWS = 4


def trainer_venv(name: str) -> Path:
    result = subprocess.run(["bash", str(REPO / "scripts" / "trainer_venvs.sh"), name],
                            capture_output=True, text=True, timeout=3600)
    if result.returncode == 75:
        pytest.skip(f"{name} venv cannot be built: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four_rows(tmp_path_factory, smollm2_dir: Path) -> Path:
    return score_demo(tmp_path_factory.mktemp("trainers") / "out", smollm2_dir, limit=ROWS,
                      shard_size=ROWS)


def oracle_rows(out: Path, tau: float, protect: bool = True
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, kept, response) per row straight from the shard: p >= tau on response tokens, plus
    the end-of-turn tokens when protected (the scoring default)."""
    manifest = json.loads((out / "manifest.json").read_text())
    eot = manifest["render"]["end_of_turn_ids"]
    table = pq.read_table(out / manifest["shards"][0]["file"])
    rows = []
    for ids, resp, lp in zip(table["input_ids"].to_pylist(), table["response_mask"].to_pylist(),
                             table["logprobs"].to_pylist()):
        ids, resp = np.array(ids), np.array(resp, bool)
        with np.errstate(invalid="ignore"):
            kept = resp & ((np.exp(np.array(lp, float)) >= tau) | (protect & np.isin(ids, eot)))
        rows.append((ids, kept, resp))
    return rows


def batch_loss(model_dir: Path, rows: list, which: str) -> float:
    """Token-mean NLL over the batch's trained tokens (which: 'kept' or 'response')."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, kept, resp in rows:
            mask = kept if which == "kept" else resp
            logits = model(torch.tensor(ids)[None]).logits[0, :-1].double()
            nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            total += float(nll[torch.tensor(mask[1:])].sum())
            count += int(mask[1:].sum())
    return total / count


def first_logged_loss(text: str) -> float:
    """The first ``{'loss': ...}`` the HF Trainer printed."""
    found = re.search(r"'loss': '?([0-9.]+)'?", text)
    assert found, text[-3000:]
    return float(found.group(1))


def cpu_steps(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return {**config, "output_dir": str(out_dir), "max_steps": 2, "learning_rate": 1.0e-5,
            "logging_steps": 1, "save_strategy": "no", "seed": 0}


def run_cli(argv: list[str], cwd: Path, timeout: int = 1500) -> str:
    # the venv's bin first: axolotl re-launches itself through `accelerate` found on PATH
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(argv[0]).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def assert_trainer_loss(logged: float, model_dir: Path, out: Path) -> None:
    rows = oracle_rows(out, TAU)
    masked, unmasked = batch_loss(model_dir, rows, "kept"), batch_loss(model_dir, rows, "response")
    print(f"first logged loss {logged:.5f}, masked {masked:.5f}, unmasked {unmasked:.5f}")
    assert abs(logged - masked) < 1e-3, (logged, masked, unmasked)
    assert abs(unmasked - masked) > 1e-2, (masked, unmasked)


def test_llamafactory_trains_on_the_exported_masks(four_rows, smollm2_dir, tmp_path):
    from profit_prep.training.exports import check_export, export

    venv = trainer_venv("llamafactory")
    dest = tmp_path / "lf"
    export(four_rows, dest, "llamafactory", tau=TAU, model=str(smollm2_dir))
    assert check_export(dest) == []
    config = yaml.safe_load((dest / "llamafactory.yaml").read_text())
    assert config["tokenized_path"] == str(dest / "tokenized")
    config = {**cpu_steps(config, tmp_path / "run"), "per_device_train_batch_size": ROWS,
              "use_cpu": True, "bf16": False, "disable_gradient_checkpointing": True,
              "overwrite_output_dir": True}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(config))
    run_cli([str(venv / "bin" / "llamafactory-cli"), "train", str(tmp_path / "x.yaml")],
            tmp_path)
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").open()]
    assert log[0]["current_steps"] == 1
    assert_trainer_loss(log[0]["loss"], smollm2_dir, four_rows)


def test_axolotl_trains_on_the_exported_masks(four_rows, smollm2_dir, tmp_path):
    from profit_prep.training.exports import check_export, export

    venv = trainer_venv("axolotl")
    dest = tmp_path / "ax"
    export(four_rows, dest, "axolotl", tau=TAU, model=str(smollm2_dir))
    assert check_export(dest) == []
    config = yaml.safe_load((dest / "axolotl.yaml").read_text())
    config = {**cpu_steps(config, tmp_path / "run"), "micro_batch_size": ROWS,
              "gradient_accumulation_steps": 1, "flash_attention": False,
              "sample_packing": False, "bf16": False, "fp16": False, "tf32": False,
              "gradient_checkpointing": False,
              "dataset_prepared_path": str(tmp_path / "prepared")}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(config))
    text = run_cli([str(venv / "bin" / "axolotl"), "train", str(tmp_path / "x.yaml")], tmp_path)
    assert_trainer_loss(first_logged_loss(text), smollm2_dir, four_rows)


# (protect, tau): at 0.9 with no protection some rows end with a masked end of turn right after a
# masked token, which ms-swift can train exactly; at 0.3 every such end follows a trained token.
@pytest.mark.parametrize("protect,tau", [("end_of_turn", TAU), ("none", TAU), ("none", 0.9)])
def test_ms_swift_template_encodes_the_exported_rows_exactly(four_rows, smollm2_dir, tmp_path,
                                                             protect, tau):
    from profit_prep.training.exports import check_export, export
    from profit_prep.training.exports import swift as export_swift

    venv = trainer_venv("ms-swift")
    dest = tmp_path / "swift"
    summary = export(four_rows, dest, "ms-swift", tau=tau, protect=protect)
    rows = oracle_rows(four_rows, tau, protect == "end_of_turn")
    # refused: a final end of turn masked right after a trained token (ms-swift's
    # Template._add_dynamic_eos trains such an end of turn whatever the messages say)
    refused = [str(i) for i, (ids, kept, resp) in enumerate(rows)
               if not kept[np.flatnonzero(resp)[-1]] and kept[np.flatnonzero(resp)[-1] - 1]]
    assert [r["example_id"] for r in summary.refused] == refused
    if protect == "end_of_turn":
        assert summary.rows == ROWS
    rows = [r for i, r in enumerate(rows) if str(i) not in refused]
    assert check_export(dest) == []
    if tau == 0.9:  # the masked end of turn is really exported, not only refused
        assert any(not kept[np.flatnonzero(resp)[-1]] for _, kept, resp in rows)
    if not rows:
        return  # nothing to encode (ms-swift cannot load an empty file)
    data = next(dest.glob("data-*.jsonl"))
    # the CLI line the export ships passes the flags this encoding uses, and nothing is extra
    assert " ".join(export_swift.SFT_FLAGS) in (dest / "ms-swift.sh").read_text()
    assert "template tokens" not in summary.line()
    encoded_file = tmp_path / "encoded.json"
    run_cli([str(venv / "bin" / "python"), str(REPO / "tests" / "trainer_scripts" /
                                               "swift_encode.py"),
             str(data), str(smollm2_dir), "llama", "chatml", str(encoded_file),
             *export_swift.SFT_FLAGS], tmp_path, timeout=600)  # the flags its CLI line passes
    encoded = json.loads(encoded_file.read_text())
    assert len(encoded) == len(rows)
    for (ids, kept, _), got in zip(rows, encoded):
        # exact: ms-swift's own encoding is the scored row, trained exactly where the mask keeps
        assert got["input_ids"] == ids.tolist()
        assert got["labels"] == np.where(kept, ids, -100).tolist()
