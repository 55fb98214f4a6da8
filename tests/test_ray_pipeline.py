"""The Ray pipeline writes exactly what the single-process pipeline writes, and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from profit_prep import ScoreConfig, score
from profit_prep.store.reader import verify
from tests.conftest import DEMO_GSM8K, REPO

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: starting Ray costs ~10 s on 2 cores."""
    import ray

    started = not ray.is_initialized()
    if started:
        # "local": a cluster someone left running here (`ray start`) is not joined
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data_with_a_bad_row(tmp_path_factory) -> Path:
    """14 GSM8K rows with an unreadable line in the middle: rejections must match too."""
    lines = DEMO_GSM8K.read_text().splitlines()[:14]
    lines.insert(5, "{not json")
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(data: Path, out: Path, model: Path, **kw) -> ScoreConfig:
    return ScoreConfig(data=str(data), out=str(out), model=str(model), prompt_field="question",
                       response_field="answer", shard_size=4, quiet=True, **kw)


def read_output(out: Path) -> tuple[list[dict], str]:
    """All rows sorted by source index, and the gathered rejections."""
    table = pq.read_table(out / "data").to_pylist()
    return sorted(table, key=lambda r: r["source_index"]), (out / "rejected.jsonl").read_text()


FLOAT_LISTS = ("logprobs", "entropy", "top1_logprob")


def assert_same_output(a: Path, b: Path) -> None:
    rows_a, rejected_a = read_output(a)
    rows_b, rejected_b = read_output(b)
    assert len(rows_a) == len(rows_b) > 0
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key in FLOAT_LISTS:  # NaN at position 0: compare as text so NaN == NaN
                assert repr(ra[key]) == repr(rb[key]), ra["example_id"]
            else:
                assert ra[key] == rb[key], (key, ra["example_id"])
    assert rejected_a == rejected_b
    for name in ("data", "rejected"):
        assert sorted(p.name for p in (a / name).iterdir()) == sorted(
            p.name for p in (b / name).iterdir()
        )
    assert verify(a) == [] and verify(b) == []


def test_ray_equals_single_process(ray_session, tiny_model_dir, data_with_a_bad_row, tmp_path):
    """The library picks the executor from the config: num_workers=2 scores on two Ray actors,
    and ids, masks, logprobs and rejections equal the in-process run's."""
    from profit_prep.executors.ray import score_with_ray

    local = score(config(data_with_a_bad_row, tmp_path / "local", tiny_model_dir))
    assert "actors" not in json.loads((tmp_path / "local" / "manifest.json").read_text())["run"]
    ray2 = score(config(data_with_a_bad_row, tmp_path / "ray2", tiny_model_dir, num_workers=2))
    assert_same_output(tmp_path / "local", tmp_path / "ray2")
    for key in ("scored_rows", "rejected_rows", "tokens", "kept_tokens"):
        assert local[key] == ray2[key]
    assert ray2["rejected_rows"] == 1 and ray2["num_workers"] == 2
    manifest = json.loads((tmp_path / "ray2" / "manifest.json").read_text())
    assert manifest["run"]["num_workers"] == 2 and manifest["scorer"]["backend"] == "transformers"
    actors = manifest["run"]["actors"]
    assert len(actors) == 2 and sum(a["shards"] for a in actors) == 4, actors
    assert len({a["pid"] for a in actors}) == 2

    # score_with_ray: Ray even with num_workers=0 (one actor); a rerun scores nothing.
    ray1 = score_with_ray(config(data_with_a_bad_row, tmp_path / "ray1", tiny_model_dir))
    assert_same_output(tmp_path / "local", tmp_path / "ray1")
    assert ray1["num_workers"] == 1
    again = score(config(data_with_a_bad_row, tmp_path / "ray2", tiny_model_dir, num_workers=2))
    assert again["scored_tokens_this_run"] == 0 and again["resumed_shards"] == 4


def test_ray_with_signals_equals_single_process(
    ray_session, tiny_model_dir, data_with_a_bad_row, tmp_path
):
    import pyarrow as pa

    signals = dict(signals="rank,top1,entropy", limit=9)
    score(config(data_with_a_bad_row, tmp_path / "local", tiny_model_dir, **signals))
    score(config(data_with_a_bad_row, tmp_path / "ray", tiny_model_dir, num_workers=1, **signals))
    assert_same_output(tmp_path / "local", tmp_path / "ray")  # every column, value for value
    schema = pq.read_schema(next((tmp_path / "ray" / "data").glob("*.parquet")))
    assert {"entropy", "top1_id", "top1_logprob", "rank"} <= set(schema.names)
    assert schema.field("rank").type == pa.list_(pa.int32())
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("local", "ray")]
    assert manifests[0]["columns"] == manifests[1]["columns"]
    assert manifests[1]["scorer"]["signals"] == ["entropy", "top1", "rank"]


def test_ray_refuses_other_parameters(ray_session, tiny_model_dir, data_with_a_bad_row, tmp_path):
    from profit_prep.errors import InputError

    score(config(data_with_a_bad_row, tmp_path / "o", tiny_model_dir, limit=4))
    with pytest.raises(InputError, match="other parameters"):
        score(config(data_with_a_bad_row, tmp_path / "o", tiny_model_dir, limit=8,
                     num_workers=1))


SLOW_SCORER = """
import os, time
import profit_prep.scorers.transformers_model as scoring
_score = scoring.TransformersScorer.score
def _slow_score(self, sequences):  # a test hook: makes each shard take a visible moment
    time.sleep(float(os.environ["PROFIT_PREP_TEST_SCORE_DELAY"]))
    return _score(self, sequences)
scoring.TransformersScorer.score = _slow_score
"""


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_output(tiny_model_dir: Path, tmp_path: Path):
    """kill -9 the whole run (driver, Ray, workers) after its first shard; rerun; compare.

    Every Python process of the run (the driver and Ray's workers) loads a sitecustomize that
    slows scoring to 0.4 s a shard, so the kill lands mid-run whatever the machine's speed.
    """
    n_shards = 8
    common = dict(data=str(DEMO_GSM8K), model=str(tiny_model_dir), prompt_field="question",
                  response_field="answer", limit=n_shards, shard_size=1, max_length=512,
                  quiet=True)
    reference = tmp_path / "reference"
    score(ScoreConfig(out=str(reference), **common))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "profit_prep.cli", "score", "--out", str(out),
           "--num-workers", "1"]
    for key, value in common.items():
        cmd += ["--quiet"] if key == "quiet" else [f"--{key.replace('_', '-')}", str(value)]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SCORER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
           "PROFIT_PREP_TEST_SCORE_DELAY": "0.4"}
    env.pop("RAY_ADDRESS", None)
    # A session of its own: killing the group takes Ray's processes down too, like a crash.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not list((out / "data").glob("part-*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard appeared in time"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(list((out / "data").glob("part-*.parquet")))
    assert not (out / "manifest.json").exists() and 1 <= done_before < n_shards
    env["PROFIT_PREP_TEST_SCORE_DELAY"] = "0"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["resumed_shards"] >= done_before
    assert manifest["run"]["scored_tokens_this_run"] > 0
    assert_same_output(reference, out)


@pytest.mark.slow
@pytest.mark.vllm
def test_ray_with_vllm_matches_transformers(smollm2_dir: Path, tmp_path: Path):
    import numpy as np

    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"vllm does not import: {type(exc).__name__}: {exc}")
    base = dict(data=str(DEMO_GSM8K), model=str(smollm2_dir), prompt_field="question",
                response_field="answer", limit=8, shard_size=4, max_length=512, quiet=True)
    score(ScoreConfig(out=str(tmp_path / "hf"), **base))
    summary = score(ScoreConfig(out=str(tmp_path / "vllm"), backend="vllm", num_workers=1, **base))
    assert summary["scored_rows"] == 8
    a, _ = read_output(tmp_path / "hf")
    b, _ = read_output(tmp_path / "vllm")
    worst = max(float(np.nanmax(np.abs(np.array(x["logprobs"], float)
                                       - np.array(y["logprobs"], float))))
                for x, y in zip(a, b, strict=True))
    assert [x["input_ids"] for x in a] == [y["input_ids"] for y in b]
    assert worst < 2e-3, worst
    manifest = json.loads((tmp_path / "vllm" / "manifest.json").read_text())
    assert manifest["scorer"]["backend"] == "vllm"


def test_workers_get_the_users_vllm_settings_not_the_drivers_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A vLLM engine started in the driver first sets a core binding for the driver itself.

    Ray actors must still claim their own cores: passing that binding on would pin every
    scoring actor to the same cores. Settings the user made do travel.
    """
    import profit_prep.scorers.vllm_engine as backend
    from profit_prep.scorers.vllm_engine import worker_env

    for key in backend.cpu_env_defaults():
        monkeypatch.setenv(key, "")  # so that monkeypatch removes what the test leaves behind
        monkeypatch.delenv(key)
    monkeypatch.setattr(backend, "ENV_SET_BY_DEFAULTS", set())
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # the user's choice

    backend.set_cpu_env_defaults()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"]  # bound for this process
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"  # not overridden
    env = worker_env(use_gpu=False)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env  # each actor binds its own slot
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # still the CPU default

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # now the user sets one
    backend.ENV_SET_BY_DEFAULTS.discard("VLLM_CPU_OMP_THREADS_BIND")
    assert worker_env(use_gpu=False)["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


@pytest.mark.parametrize("user_env", [{}, {"VLLM_USE_V2_MODEL_RUNNER": "0"},
                                      {"VLLM_ATTENTION_BACKEND": "FLASH_ATTN",
                                       "VLLM_CPU_KVCACHE_SPACE": "8"}])
def test_gpu_actors_get_the_callers_vllm_settings_and_no_cpu_default(
    monkeypatch: pytest.MonkeyPatch, user_env: dict[str, str],
) -> None:
    """A GPU actor's engine must run in its own process (no VLLM_ENABLE_V1_MULTIPROCESSING=0)
    and gets no CPU KV space or binding; a CPU actor gets every CPU default but the binding.
    What the caller set (even a CPU variable) travels to both, unchanged."""
    import profit_prep.scorers.vllm_engine as backend
    from profit_prep.scorers.vllm_engine import worker_env

    for key in [k for k in os.environ if k.startswith("VLLM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(backend, "ENV_SET_BY_DEFAULTS", set())
    backend.set_cpu_env_defaults()  # this (driver) process's own defaults never travel
    for key, value in user_env.items():
        monkeypatch.setenv(key, value)
        backend.ENV_SET_BY_DEFAULTS.discard(key)
    cpu_defaults = set(backend.cpu_env_defaults()) - {"VLLM_CPU_OMP_THREADS_BIND"}
    gpu = worker_env(use_gpu=True)
    assert gpu == user_env
    assert not (cpu_defaults - set(user_env)) & set(gpu)
    cpu = worker_env(use_gpu=False)
    assert cpu_defaults <= set(cpu) and "VLLM_CPU_OMP_THREADS_BIND" not in cpu
    assert all(cpu[k] == v for k, v in user_env.items())
    for key in backend.cpu_env_defaults():
        monkeypatch.delenv(key, raising=False)


RAY_DEVICES = """
import json, sys
import ray
from profit_prep import ScoreConfig, score
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
seen = {}
for device in (None, "cpu"):
    out = sys.argv[2] + f"/{device}"
    score(ScoreConfig(data=sys.argv[1], out=out, model=sys.argv[3], backend="null",
                   prompt_field="question", response_field="answer", limit=4, shard_size=2,
                   num_workers=1, device=device, quiet=True, tensor_parallel_size=2))
    seen[str(device)] = json.load(open(out + "/manifest.json"))["run"]["actors"]
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_ray_actors_get_the_environment_of_their_device(tiny_model_dir: Path, tmp_path: Path):
    """On a Ray node that declares GPUs (ray.init(num_gpus=2): no real GPU needed), a scoring
    actor given GPUs gets no CPU engine default; with --device cpu it gets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", RAY_DEVICES, str(DEMO_GSM8K), str(tmp_path),
                           str(tiny_model_dir)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    [gpu_actor], [cpu_actor] = seen["None"], seen["cpu"]
    assert sorted(gpu_actor["gpu_ids"]) == ["0", "1"]  # TP 2: both declared GPUs, one actor
    cpu_only = {"VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
                "VLLM_CPU_OMP_THREADS_BIND"}
    assert not cpu_only & set(gpu_actor["vllm_env"])
    assert cpu_actor["gpu_ids"] == []
    assert {"VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"} <= set(
        cpu_actor["vllm_env"])


def test_each_backend_sets_up_its_own_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The executors ask the backend's class for its actors' environment and CPUs: only vLLM
    (and null, placed as vLLM) gives VLLM_* variables; transformers and servers give none."""
    import torch

    from profit_prep.scorers.base import NullScorer
    from profit_prep.scorers.transformers_model import TransformersScorer
    from profit_prep.scorers.vllm_engine import VLLMScorer, worker_env
    from profit_prep.scorers.vllm_server import ServerScorer

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # the user's own setting
    for use_gpu in (False, True):
        assert TransformersScorer.worker_env(use_gpu) == {} == ServerScorer.worker_env(use_gpu)
        assert VLLMScorer.worker_env(use_gpu) == worker_env(use_gpu)
        assert NullScorer.worker_env(use_gpu) == worker_env(use_gpu)
        assert VLLMScorer.worker_env(use_gpu)["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "VLLM_CPU_KVCACHE_SPACE" in VLLMScorer.env_names()
    assert TransformersScorer.env_names() == [] == ServerScorer.env_names()
    threads = torch.get_num_threads()
    try:
        assert TransformersScorer.bind_worker(1) is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's binding is left alone
    assert VLLMScorer.bind_worker(1) is None and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"
