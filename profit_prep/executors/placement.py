"""Where the Ray scoring actors go: how many fit a cluster, and the checks that refuse a run
that cannot be placed before any shard is scored.

Pure functions over node resources (no Ray), so they are tested without a cluster. Each scoring
actor is one engine: it asks Ray for ``gpus`` GPUs and ``cpus`` CPUs, and Ray grants an actor's
resources from ONE node, so an engine's tensor-parallel ranks always share a node and no two
actors share a GPU id (docs/scaling.md, "A multi-node GPU cluster").

Example:
    >>> nodes = [Node("10.0.0.2", cpus=8, gpus=4), Node("10.0.0.3", cpus=8, gpus=4)]
    >>> engines_that_fit(nodes, gpus=2, cpus=1)
    4
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from profit_prep.errors import InputError

# Ray keeps resources in fixed point (1e-4); a little slack keeps 3 x 0.1 CPU from not fitting 0.3.
_SLACK = 1e-6


@dataclass(frozen=True)
class Node:
    """One alive Ray node's total resources, and how a person recognises it."""

    name: str  # "IP (short node id)"
    cpus: float
    gpus: float


def alive_nodes(ray_nodes: Iterable[Mapping[str, Any]]) -> list[Node]:
    """The alive nodes of ``ray.nodes()`` (dead ones stay listed there for a while)."""
    nodes = []
    for info in ray_nodes:
        if not info.get("Alive"):
            continue
        resources = info.get("Resources") or {}
        name = f"{info.get('NodeManagerAddress', '?')} ({str(info.get('NodeID', ''))[:8]})"
        nodes.append(Node(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0))))
    return nodes


def gpus_per_worker(engine_gpus: int, use_gpu: bool) -> int:
    """GPUs each scoring actor asks Ray for: all the GPUs one engine of the backend holds
    (``Scorer.engine_gpus``: a vLLM engine's tensor-parallel ranks all run in its actor, vLLM's
    "mp" executor), none on CPU."""
    return engine_gpus if use_gpu else 0


def check_tensor_parallel(backend: str, tensor_parallel_size: int, reason: str = "") -> None:
    """Refuse ``--tensor-parallel-size`` > 1 where nothing would split the model."""
    if tensor_parallel_size > 1 and backend == "transformers":
        why = f" ({reason})" if reason and reason != "--backend" else ""
        raise InputError(
            f"--tensor-parallel-size {tensor_parallel_size} needs --backend vllm: the "
            f"transformers backend{why} runs the whole model on one device; drop the option or "
            "choose --backend vllm"
        )


def engines_on(node: Node, gpus: int, cpus: float) -> int:
    """Scoring actors of ``gpus`` GPUs and ``cpus`` (> 0) CPUs that fit on ``node``."""
    fit = math.floor(node.cpus / cpus + _SLACK)
    if gpus > 0:
        fit = min(fit, math.floor(node.gpus / gpus + _SLACK))
    return fit


def engines_that_fit(nodes: Iterable[Node], gpus: int, cpus: float) -> int:
    """Scoring actors the whole cluster holds at once (each on one node)."""
    return sum(engines_on(node, gpus, cpus) for node in nodes)


def default_cpus_per_worker(nodes: list[Node], workers: int) -> float:
    """CPUs per CPU-scoring actor when the user names none: the most (whole) CPUs each of
    ``workers`` actors can have so that all of them fit, on one node as on many.

    On one node this is its CPUs split evenly (the model is the work); on a cluster of small
    nodes, dividing the cluster's total would ask for more CPUs than any one node has.

    >>> default_cpus_per_worker([Node("a", 8, 0)], 2), default_cpus_per_worker(
    ...     [Node("a", 2, 0), Node("b", 2, 0), Node("c", 2, 0)], 2)
    (4.0, 2.0)
    """
    biggest = int(max((node.cpus for node in nodes), default=1))
    for cpus in range(max(biggest, 1), 1, -1):
        if engines_that_fit(nodes, 0, cpus) >= workers:
            return float(cpus)
    return 1.0  # too few CPUs even at 1 each: check_fit says so


def check_fit(nodes: list[Node], workers: int, gpus: int, cpus: float) -> None:
    """Refuse, in one line, ``workers`` scoring actors that the alive nodes cannot hold at once:
    Ray Data would start those that fit and wait for the rest before scoring, forever."""
    fit = engines_that_fit(nodes, gpus, cpus)
    if fit >= workers:
        return
    need = f"{cpus:g} CPU{'s' * (cpus != 1)}"
    if gpus:
        need = f"{gpus} GPU{'s' * (gpus != 1)} and {need}"
    shown = "; ".join(f"{n.name}: {n.gpus:g} GPUs, {n.cpus:g} CPUs, holds "
                      f"{engines_on(n, gpus, cpus)}" for n in nodes[:6])
    more = f"; and {len(nodes) - 6} more nodes" if len(nodes) > 6 else ""
    nodes_hold = "nodes hold" if len(nodes) != 1 else "node holds"
    remedy = (f"use --num-workers {fit} or fewer, or add nodes" if fit else
              "add nodes that can hold one")
    raise InputError(
        f"--num-workers {workers} does not fit the Ray cluster: each scoring actor needs "
        f"{need} on one node, and its {len(nodes)} alive {nodes_hold} {fit} ({shown}{more}); "
        f"{remedy}"
    )
