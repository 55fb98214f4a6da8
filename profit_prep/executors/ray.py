"""Score with Ray Data: render, score on a pool of model actors, write shards.

The same per-shard steps as the in-process executor (:func:`profit_prep.executors.base.read_shard`,
``score_shard``, ``write_shard``), each in a Ray Data stage::

    from_items([{index} of each missing shard])                 # one block per shard
      .map(RenderShards)                an actor: read_shard (read and render)
      .map_batches(ScoringActor, batch_size=1, concurrency=num_workers, num_gpus=...)
      .map(WriteShards)                 an actor: write_shard (mask, one atomic file), counts
      .iter_rows()                      the driver prints progress as shards finish

The stages get the prepared job itself (:class:`profit_prep.job.Prepared`) and a
:class:`WorkerPlan` (each scoring actor's CPUs and GPUs). The backend sets its actors up through
the Scorer contract (their environment, their CPUs): nothing here names a backend.

Each scoring actor is one engine holding ``--tensor-parallel-size`` GPUs (vLLM, and ``null``
placed alike) on one node; a run that the alive nodes cannot hold is refused before scoring,
and a node that dies mid-run costs only its actors' shards, scored again elsewhere
(:mod:`profit_prep.executors.placement`; docs/scaling.md, "A multi-node GPU cluster").

One Ray row carries one whole shard, pickled into a single ``bytes`` value: a shard never
splits across blocks, and Ray never tries to infer Arrow types for ragged token arrays. Ray
Data streams with backpressure, so memory is bounded by the shards in flight, not by the
dataset. The output directory, its lock, ``run.json`` and resume are exactly the local
executor's (:func:`profit_prep.executors.base.run_job`): a rerun after a crash scores only
the shards whose files are missing.

Example:
    >>> from profit_prep import ScoreConfig, score
    >>> summary = score(ScoreConfig(data="train.jsonl", out="out", num_workers=2,
    ...                             prompt_field="question", response_field="answer"))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from profit_prep.config import ScoreConfig
from profit_prep.errors import InputError
from profit_prep.executors.base import (
    TIMINGS,
    Progress,
    Scored,
    ShardWork,
    read_shard,
    run_job,
    score_shard,
    write_shard,
)
from profit_prep.executors.placement import (
    alive_nodes,
    check_fit,
    default_cpus_per_worker,
    gpus_per_worker,
)
from profit_prep.job import Prepared
from profit_prep.store.outputs import Output, open_output
from profit_prep.store.safe_files import os_reason


@dataclass(frozen=True)
class WorkerPlan:
    """Where the stages run: the output folder, and each scoring actor's share of a node."""

    out: str  # absolute: the stages run in other processes
    cpus_per_worker: float
    use_gpu: bool
    gpus_per_worker: int = 0


# --------------------------------------------------------------------------- stages


class RenderShards:
    """Stage 1 (actor on the driver's node): read and render one shard per call.

    An actor rather than a task: Ray kills idle task workers and starts new ones, and each new
    worker imports transformers and the tokenizer again (seconds of CPU taken from scoring).
    """

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        work = read_shard(self.prepared, int(item["index"]))
        return {"index": work.index, "payload": work.dumps()}


class ScoringActor:
    """Stage 2 (actor): owns one reference model, scores one shard per call."""

    def __init__(self, prepared: Prepared, plan: WorkerPlan) -> None:
        t0 = time.perf_counter()
        backend = prepared.scorer_class
        # A CPU actor's share of its node, taken as its backend takes CPUs (held for life).
        self._cpus = None if plan.use_gpu else backend.bind_worker(
            max(1, int(plan.cpus_per_worker)))
        self.placement = {**placement(), "vllm_env": backend.env_names()}
        self.scorer = prepared.make_scorer()
        self.describe = self.scorer.describe()
        self.load_s: float | None = time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for blob in batch["payload"]:
            work: ShardWork = pickle.loads(blob)
            score_shard(work, self.scorer)
            work.timing["scored_at"] = time.time()  # wall clock: comparable across nodes
            work.scorer = self.describe
            work.model_load_s, self.load_s = self.load_s, None
            work.actor = self.placement
            payloads.append(work.dumps())
        return {"index": batch["index"], "payload": np.array(payloads, dtype=object)}


class WriteShards:
    """Stage 3 (actor on the driver's node): mask and write one shard atomically per call."""

    def __init__(self, prepared: Prepared, plan: WorkerPlan) -> None:
        self.prepared = prepared
        self.out = open_output(plan.out)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        work: ShardWork = pickle.loads(item["payload"])
        # The run scores only shards whose file was missing when it started: one that exists
        # now came back twice (Ray re-ran a task). The file is complete (atomic rename) and
        # the scores deterministic, so it is kept, and the driver records the repeat.
        again = self.out.shard_done(work.index)
        work.timing["write_s"] = 0.0
        if not again:
            write_shard(self.prepared, self.out, work)
        # Ray Data rows are flat columns: the figures the driver sums, per shard.
        return {
            "index": work.index,
            "rows": len(work.rendered) + len(work.rejected),
            "tokens": work.tokens,
            **work.timing,
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
    }


# --------------------------------------------------------------------------- driver


def connect(config: ScoreConfig) -> bool:
    """Join ``--ray-address`` / ``$RAY_ADDRESS``, or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    log = not config.quiet
    # No job-wide runtime_env: only the scoring actors need their backend's environment (they
    # get it in their own), and a job-wide one would keep every task from using the idle workers Ray
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
    """Score on Ray whatever ``num_workers`` says (at least one scoring actor); return the same
    summary as :func:`profit_prep.score`, which picks Ray itself when ``num_workers`` > 0."""
    return run_job(config, RayExecutor())


class RayExecutor:
    """Scores the pending shards as a Ray Data pipeline (render actors, scoring actors, writer)."""

    def __init__(self) -> None:
        self.plan: WorkerPlan | None = None
        self.started = False  # True when we started a local Ray (and so shut it down)
        self.ray_start_s = 0.0

    def start(self, prepared: Prepared, out: Output) -> Prepared:
        """Join Ray and check the scoring actors fit, before run.json is written: a run that
        cannot be placed stops here with one line. The scoring actors build their own scorers;
        a finished output (a rerun) needs no Ray at all."""
        config = prepared.config
        if not (config.ray_address or os.environ.get("RAY_ADDRESS")):
            # Actors on this machine import the backend here: a cluster's nodes may have it.
            prepared.scorer_class.check_importable()
        if config.overwrite or not out.all_done(prepared.n_shards):
            self._connect(prepared, out)
        return prepared

    def _connect(self, prepared: Prepared, out: Output) -> None:
        t0 = time.perf_counter()
        self.started = connect(prepared.config)
        self.ray_start_s = time.perf_counter() - t0
        self.plan = _plan(prepared, out, max(1, prepared.config.num_workers))

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def run(
        self, prepared: Prepared, out: Output, todo: list[int], progress: Progress
    ) -> Scored:
        if self.plan is None:  # start() saw every shard done, yet some are missing now
            self._connect(prepared, out)
        assert self.plan is not None
        plan, workers = self.plan, max(1, prepared.config.num_workers)
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
            for row in _dataset(prepared, plan, todo, workers).iter_rows():
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
            "cpus_per_worker": plan.cpus_per_worker,
            "gpus_per_worker": plan.gpus_per_worker,
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


def _plan(prepared: Prepared, out: Output, workers: int) -> WorkerPlan:
    """Each scoring actor's CPUs and GPUs; refuses (one line) a ``--num-workers`` that the
    alive nodes cannot hold."""
    import ray

    config = prepared.config
    resources = ray.cluster_resources()
    use_gpu = config.device == "cuda" or (config.device is None and resources.get("GPU", 0) > 0)
    nodes = alive_nodes(ray.nodes())
    gpus = gpus_per_worker(prepared.scorer_class.engine_gpus(config.tensor_parallel_size), use_gpu)
    cpus = config.cpus_per_worker
    if cpus is None:
        # On CPU the model is the work: split the nodes' CPUs between the actors.
        cpus = 1.0 if use_gpu else default_cpus_per_worker(nodes, workers)
    check_fit(nodes, workers, gpus, cpus)
    return WorkerPlan(out.location, cpus, use_gpu, gpus)


def _dataset(prepared: Prepared, plan: WorkerPlan, todo: list[int], workers: int) -> Any:
    """The Ray Data pipeline of the pending shards: render, score, write (module docstring)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line replaces Ray's bars
    ctx.print_on_execution_start = not prepared.config.quiet
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
    renderers = prepared.config.render_workers
    render_pool = (ray.data.ActorPoolStrategy(size=renderers) if renderers
                   else light["compute"])
    # Scoring and writing need neither the tokenizer nor the source: without them in its
    # pickle, such an actor does not import transformers (~2 s of CPU taken from scoring).
    lean = prepared.for_workers(inputs=False)
    return (
        ray.data.from_items([{"index": i} for i in todo], override_num_blocks=len(todo))
        .map(RenderShards, fn_constructor_kwargs={"prepared": prepared.for_workers(inputs=True)},
             **{**light, "compute": render_pool})
        .map_batches(
            ScoringActor,
            fn_constructor_kwargs={"prepared": lean, "plan": plan},
            batch_size=1,
            batch_format="numpy",
            # max_tasks_in_flight_per_actor=2: the next shard is queued while one is scored,
            # without piling every rendered shard onto the actors.
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
            # One node's resources per actor: Ray grants an actor's GPUs from one node and sets
            # its CUDA_VISIBLE_DEVICES to them, where vLLM's "mp" executor runs its TP ranks.
            num_cpus=plan.cpus_per_worker,
            num_gpus=plan.gpus_per_worker,
            # The backend's own environment for its actors. Ray starts workers at nice 15, so
            # on a small node its own processes (driver, raylet, the light tasks) preempt the
            # scorer and stall its OpenMP threads; the actor is the job, so it runs at normal
            # priority (as Ray Jobs does for drivers).
            runtime_env={"env_vars": {**prepared.scorer_class.worker_env(plan.use_gpu),
                                      "RAY_worker_niceness": "0"}},
        )
        .map(WriteShards, fn_constructor_kwargs={"prepared": lean, "plan": plan}, **light)
    )
