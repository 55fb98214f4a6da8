"""A real multi-node Ray cluster with GPUs, simulated on one machine.

One cluster for the module (``ray.cluster_utils.Cluster``): a head with no CPUs (the driver's
node: render and write actors only) and two "GPU" nodes of 4 GPUs and 2 CPUs each.
Ray schedules declared GPUs on a CPU machine for real (ids, CUDA_VISIBLE_DEVICES); only kernels
are absent, so GPU placement is tested with ``--backend null`` and equality with the tiny model
on ``--device cpu``. The real CLI runs in a subprocess and joins with ``--ray-address``.

Every Ray worker of the cluster loads a sitecustomize hook (the nodes inherit this process's
environment when they start) that, while a file says so, slows each scoring call and marks the
node scoring it: so a kill lands while a node holds a shard, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep import ScoreConfig, score
from profit_prep.errors import InputError
from profit_prep.executors.placement import (
    Node,
    alive_nodes,
    check_fit,
    check_tensor_parallel,
    default_cpus_per_worker,
    engines_on,
    engines_that_fit,
    gpus_per_worker,
)
from profit_prep.store.reader import verify
from tests.conftest import DEMO_GSM8K, REPO, assert_one_error_line

# --------------------------------------------------------------------------- pure placement


def test_engines_fit_per_node_by_gpus_and_cpus() -> None:
    gpu_node = Node("a", cpus=8, gpus=4)
    assert engines_on(gpu_node, gpus=2, cpus=1) == 2  # GPUs bound it
    assert engines_on(Node("b", cpus=3, gpus=8), gpus=2, cpus=1) == 3  # CPUs bound it
    assert engines_on(Node("c", cpus=8, gpus=3), gpus=2, cpus=1) == 1  # an odd GPU is left
    assert engines_on(Node("head", cpus=4, gpus=0), gpus=1, cpus=1) == 0
    assert engines_on(Node("cpu", cpus=1, gpus=0), gpus=0, cpus=0.1) == 10  # no float loss
    nodes = [gpu_node, Node("b", cpus=8, gpus=4), Node("head", cpus=16, gpus=0)]
    assert engines_that_fit(nodes, gpus=2, cpus=1) == 4
    assert engines_that_fit(nodes, gpus=0, cpus=4) == 8  # on CPU every CPU counts


def test_fit_check_names_what_was_asked_and_what_the_nodes_have() -> None:
    nodes = [Node("10.0.0.1 (aaaa)", 2, 0), Node("10.0.0.2 (bbbb)", 2, 4),
             Node("10.0.0.3 (cccc)", 2, 4)]
    check_fit(nodes, workers=4, gpus=2, cpus=1)  # exactly full: fine
    with pytest.raises(InputError) as refused:
        check_fit(nodes, workers=5, gpus=2, cpus=1)
    message = str(refused.value)
    assert message.startswith("--num-workers 5 does not fit")
    assert "2 GPUs and 1 CPU on one node" in message and "hold 4" in message
    assert "10.0.0.2 (bbbb): 4 GPUs, 2 CPUs, holds 2" in message
    assert "use --num-workers 4 or fewer" in message and "\n" not in message
    with pytest.raises(InputError, match="hold 0 .*add nodes that can hold one"):
        check_fit(nodes, workers=1, gpus=8, cpus=1)


def test_alive_nodes_and_default_cpus() -> None:
    listed = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeID": "ab" * 28,
         "Resources": {"CPU": 4.0, "GPU": 2.0, "memory": 1e9}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.2", "NodeID": "cd" * 28,
         "Resources": {"CPU": 64.0}},  # dead: its resources are gone
        {"Alive": True, "NodeManagerAddress": "10.0.0.3", "NodeID": "ef" * 28, "Resources": {}},
    ]
    assert alive_nodes(listed) == [Node("10.0.0.1 (abababab)", 4, 2), Node("10.0.0.3 (efefefef)",
                                                                          0, 0)]
    # One node: its CPUs split between the workers, as before clusters were considered.
    assert default_cpus_per_worker([Node("a", 16, 0)], 3) == 5
    # Three 4-CPU nodes, 3 workers: 4 each (the cluster's 12 // 3 also), one per node.
    assert default_cpus_per_worker([Node(n, 4, 0) for n in "abc"], 3) == 4
    # Three 4-CPU nodes, 2 workers: 12 // 2 = 6 fits no node; 4 does.
    assert default_cpus_per_worker([Node(n, 4, 0) for n in "abc"], 2) == 4
    assert default_cpus_per_worker([Node("a", 2, 0)], 5) == 1  # too many: check_fit refuses


def test_gpus_per_actor_and_tensor_parallel_refusal() -> None:
    from profit_prep.scorers.base import NullScorer
    from profit_prep.scorers.transformers_model import TransformersScorer
    from profit_prep.scorers.vllm_engine import VLLMScorer

    assert gpus_per_worker(VLLMScorer.engine_gpus(2), True) == 2
    assert gpus_per_worker(NullScorer.engine_gpus(2), True) == 2  # placed like vLLM
    assert gpus_per_worker(TransformersScorer.engine_gpus(1), True) == 1
    assert gpus_per_worker(VLLMScorer.engine_gpus(2), False) == 0
    check_tensor_parallel("vllm", 4)
    check_tensor_parallel("transformers", 1)
    with pytest.raises(InputError, match=r"^--tensor-parallel-size 2 needs --backend vllm"):
        check_tensor_parallel("transformers", 2, "--backend")


def test_tensor_parallel_with_transformers_is_refused_before_any_work(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = dict(data=str(DEMO_GSM8K), model=str(tiny_model_dir), prompt_field="question",
                response_field="answer", limit=2, quiet=True, tensor_parallel_size=2)
    with pytest.raises(InputError, match=r"--tensor-parallel-size 2 needs --backend vllm"):
        score(ScoreConfig(out=str(tmp_path / "a"), backend="transformers", **base))
    # auto resolved to transformers here: the refusal says why transformers was chosen.
    with pytest.raises(InputError, match=r"transformers backend \(\$PROFIT_PREP_BACKEND\)"):
        score(ScoreConfig(out=str(tmp_path / "b"), **base))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_shard_that_comes_back_twice_is_written_once(tmp_path: Path) -> None:
    """Ray may run a scoring task again (its node died after it finished): the writer keeps
    the shard already written and says so, for the driver to record."""
    from profit_prep.executors.base import ShardWork
    from profit_prep.executors.ray import WorkerPlan, WriteShards
    from profit_prep.job import Prepared

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "run.json").write_text("{}")  # a run's shard records name its run.json
    # The writer's copy of a prepared job: no source, no renderer (Prepared.for_workers).
    prepared = Prepared(ScoreConfig(data="d", out=str(out)), None, "plain", tmp_path, None,
                        {}, {})
    work = ShardWork(3, [], [{"example_id": "x", "source_index": 9, "reason": "bad"}], "d1",
                     {"read_s": 0.0, "render_s": 0.0, "score_s": 0.0, "scored_at": 0.0},
                     logprobs=[], scorer={"backend": "null"}, actor={"pid": 1})
    writer = WriteShards(prepared, WorkerPlan(str(out), 1.0, False))
    first = writer({"index": 3, "payload": work.dumps()})
    shard = out / "data" / "part-00003.parquet"
    written = shard.stat()
    again = writer({"index": 3, "payload": work.dumps()})
    assert (first["again"], again["again"]) == (False, True)
    assert shard.stat().st_ino == written.st_ino  # not replaced
    assert json.loads(again["actor"]) == {"pid": 1} and again["rows"] == 1


# --------------------------------------------------------------------------- the cluster

HOOK = """
import os, time
from pathlib import Path

_control = os.environ.get("PROFIT_PREP_TEST_CONTROL")
if _control:
    import profit_prep.scorers.base as scoring
    import profit_prep.scorers.transformers_model as transformers_model

    def _slowed(score):
        # A test hook: while control/delay says so, each scoring call takes that long, and
        # control/busy/NODE-PID marks the node scoring meanwhile.
        def wrapped(self, sequences):
            delay_file = Path(_control, "delay")
            delay = float(delay_file.read_text()) if delay_file.exists() else 0.0
            if not delay:
                return score(self, sequences)
            import ray

            node = ray.get_runtime_context().get_node_id()
            mark = Path(_control, "busy", f"{node}-{os.getpid()}")
            mark.touch()
            try:
                time.sleep(delay)
                return score(self, sequences)
            finally:
                mark.unlink(missing_ok=True)
        return wrapped

    transformers_model.TransformersScorer.score = _slowed(
        transformers_model.TransformersScorer.score)
    scoring.NullScorer.score = _slowed(scoring.NullScorer.score)
"""

N_SHARDS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Head (0 CPUs) + 2 nodes x (4 GPUs, 2 CPUs); shut down after. The CPU tests use 2 of the 4
    CPUs, so when a node dies the other still holds every scoring actor."""
    import ray
    from ray.cluster_utils import Cluster

    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(HOOK)
    control = tmp_path_factory.mktemp("control")
    (control / "busy").mkdir()
    saved = dict(os.environ)
    # The nodes' raylets (and so every worker they start) inherit this environment.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO)])
    os.environ["PROFIT_PREP_TEST_CONTROL"] = str(control)
    os.environ.pop("RAY_ADDRESS", None)
    # Notice a dead node in ~2 s rather than Ray's default ~30 s.
    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    made = None
    try:
        made = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": fast})
        # Cluster writes its address where a plain ray.init() on this machine would join it;
        # no other Ray user here (another test, another program) should.
        ray._common.utils.reset_ray_address()
        gpu_nodes = [made.add_node(num_cpus=2, num_gpus=4) for _ in range(2)]
        env = dict(os.environ)
        yield SimpleNamespace(cluster=made, control=control, env=env, gpu_nodes=gpu_nodes)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if made is not None:
            made.shutdown()


def cli(cluster: Any, out: Path, model: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "profit_prep.cli", "score", "--data", str(DEMO_GSM8K),
            "--model", str(model), "--prompt-field", "question", "--response-field", "answer",
            "--limit", str(N_SHARDS), "--shard-size", "1", "--max-length", "512", "--out",
            str(out), "--ray-address", cluster.cluster.address, *args]


def set_delay(cluster: Any, seconds: float) -> None:
    (cluster.control / "delay").write_text(str(seconds))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The single-process run of the rows the cluster runs score."""
    out = tmp_path_factory.mktemp("reference") / "out"
    score(ScoreConfig(data=str(DEMO_GSM8K), out=str(out), model=str(tiny_model_dir),
                      prompt_field="question", response_field="answer", limit=N_SHARDS,
                      shard_size=1, max_length=512, backend="transformers", device="cpu",
                      quiet=True))
    return out


FLOATS = ("logprobs", "entropy", "top1_logprob")


def assert_same_output(expected: Path, got: Path, atol: float = 1e-5) -> None:
    """Same rows, ids, masks and files; log-probabilities within ``atol`` (a scoring actor
    may run with another thread count than the reference, which reorders float sums)."""
    def rows(out: Path) -> list[dict]:
        return sorted(pq.read_table(out / "data").to_pylist(), key=lambda r: r["source_index"])

    a, b = rows(expected), rows(got)
    assert len(a) == len(b) == N_SHARDS
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key in FLOATS:
                np.testing.assert_allclose(np.array(ra[key], float), np.array(rb[key], float),
                                           rtol=0, atol=atol, err_msg=ra["example_id"])
            else:
                assert ra[key] == rb[key], (key, ra["example_id"])
    assert (expected / "rejected.jsonl").read_text() == (got / "rejected.jsonl").read_text()
    assert sorted(p.name for p in (expected / "data").iterdir()) == sorted(
        p.name for p in (got / "data").iterdir())
    assert verify(got) == []


def wait_for_first_shard(proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "data").glob("part-*.parquet")):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first shard: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "no shard appeared in time"
        time.sleep(0.05)


def busy_node(cluster: Any, proc: subprocess.Popen, timeout: float = 60) -> Any:
    """A worker node scoring a shard right now (the hook marks it while the delay lasts)."""
    workers = {node.node_id: node for node in cluster.cluster.worker_nodes}
    deadline = time.monotonic() + timeout
    while True:
        busy = [m.name.rsplit("-", 1)[0] for m in (cluster.control / "busy").iterdir()]
        found = [workers[node_id] for node_id in busy if node_id in workers]
        if found:
            return found[0]
        assert proc.poll() is None, "the run ended before a node could be caught scoring"
        assert time.monotonic() < deadline, "no worker node was seen scoring"
        time.sleep(0.02)


@pytest.mark.slow
def test_tensor_parallel_actors_hold_their_own_gpus_on_one_node(
    cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """--tensor-parallel-size 2 on 2 nodes x 4 GPUs: 4 actors, 2 GPU ids each, on one node,
    none shared; read from the placement every actor reports into manifest.json."""
    set_delay(cluster, 0.5)  # so that every actor gets shards, not the first one ready
    out = tmp_path / "out"
    run = subprocess.run(cli(cluster, out, tiny_model_dir, "--backend", "null",
                             "--tensor-parallel-size", "2", "--num-workers", "4"),
                         env=cluster.env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    actors = manifest["run"]["actors"]
    assert manifest["run"]["gpus_per_worker"] == 2 and manifest["run"]["cpus_per_worker"] == 1
    assert sum(a["shards"] for a in actors) == N_SHARDS
    assert len({(a["node_id"], a["pid"]) for a in actors}) == len(actors) == 4
    gpu_node_ids = {node.node_id for node in cluster.gpu_nodes}
    held: dict[str, list[str]] = defaultdict(list)
    for actor in actors:
        assert actor["node_id"] in gpu_node_ids
        assert len(actor["gpu_ids"]) == 2
        # What vLLM's ranks see: exactly the GPUs Ray granted, on the actor's one node.
        assert actor["cuda_visible_devices"] == ",".join(actor["gpu_ids"])
        held[actor["node_id"]] += actor["gpu_ids"]
    for ids in held.values():
        assert len(ids) == len(set(ids)) == 4  # both nodes full, no GPU id given twice
    assert manifest["run"]["repeated_shards"] == []


@pytest.mark.slow
def test_more_workers_than_the_cluster_holds_is_refused_before_scoring(
    cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = subprocess.run(cli(cluster, out, tiny_model_dir, "--backend", "null",
                             "--tensor-parallel-size", "2", "--num-workers", "5"),
                         env=cluster.env, capture_output=True, text=True, timeout=120)
    assert_one_error_line(run, "--num-workers 5 does not fit the Ray cluster")
    assert "2 GPUs and 1 CPU on one node" in run.stderr and "hold 4" in run.stderr
    assert not out.exists()  # refused before run.json, let alone a shard


@pytest.mark.slow
def test_a_node_killed_while_scoring_costs_nothing(
    cluster: Any, tiny_model_dir: Path, reference: Path, tmp_path: Path
) -> None:
    """Kill (SIGKILL, no goodbye) a node while it scores a shard: Ray restarts its actor on
    another node and retries its shards; the output equals the single-process run and no shard
    is written twice."""
    set_delay(cluster, 0.7)
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(cluster, out, tiny_model_dir, "--backend", "transformers",
                                "--device", "cpu", "--num-workers", "2",
                                "--cpus-per-worker", "1"),
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_first_shard(proc, out)
        victim = busy_node(cluster, proc)
        cluster.cluster.remove_node(victim, allow_graceful=False)
        set_delay(cluster, 0)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert_same_output(reference, out)
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert run["repeated_shards"] == []
    assert sum(a["shards"] for a in run["actors"]) == N_SHARDS
    # The shard the dead node held was scored on a node that lived.
    assert any(a["node_id"] != victim.node_id for a in run["actors"])


@pytest.mark.slow
def test_a_killed_driver_reruns_into_the_same_output(
    cluster: Any, tiny_model_dir: Path, reference: Path, tmp_path: Path
) -> None:
    """kill -9 the CLI mid-run (the cluster stays up: Ray ends the job's actors), rerun the same
    command against the same cluster: the lock is free, finished shards are kept, the output
    equals the single-process run."""
    set_delay(cluster, 0.7)
    out = tmp_path / "out"
    cmd = cli(cluster, out, tiny_model_dir, "--backend", "transformers", "--device", "cpu",
              "--num-workers", "1", "--cpus-per-worker", "1")
    proc = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_shard(proc, out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(list((out / "data").glob("part-*.parquet")))
    assert not (out / "manifest.json").exists() and 1 <= done_before < N_SHARDS
    set_delay(cluster, 0)
    rerun = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert run["resumed_shards"] >= done_before and run["scored_tokens_this_run"] > 0
    assert_same_output(reference, out)
