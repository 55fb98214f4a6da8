"""Print docs/scaling.md's GPU sizing table and worked plans from profit_prep.scorers.sizing.

    python benchmarks/gpu_plan.py            # both tables, as markdown

Nothing is measured here: the default ``max_num_batched_tokens`` is
:func:`profit_prep.scorers.sizing.step_token_budget` for each of vLLM's model runners (V2, vLLM
0.32's
default on CUDA, and V1, under ``VLLM_USE_V2_MODEL_RUNNER=0`` or without Triton), the per-GPU
prefill rate is ``pipeline_ceiling.gpu_demand`` (MFU x an H100's dense bf16 peak / (2 x
params); the H200 has the same compute), the render rate and Parquet bytes per token are the
figures measured in docs/benchmarks.md. ``tests/test_sizing.py`` checks that the doc holds
exactly these lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_ceiling import MODELS, gpu_demand  # noqa: E402

from profit_prep.scorers.sizing import (  # noqa: E402
    GpuSpec,
    MiB,
    ModelSpec,
    plan_run,
    step_token_budget,
)

RUNNERS = ("v2", "v1")  # V2 first: what vLLM 0.32 uses on CUDA unless told otherwise

# Totals as nvidia-smi (NVML, which vLLM reads) reports them.
L4 = GpuSpec("L4 24GB", 23034 * MiB)
H100 = GpuSpec("H100 80GB", 81559 * MiB)
H200 = GpuSpec("H200 141GB", 143771 * MiB)

# Llama-3.1-8B and Llama-3.3-70B shapes; nominal parameter counts, as pipeline_ceiling's.
LLAMA_8B = ModelSpec("8B (Llama-3.1-8B)", MODELS["8B"], layers=32, kv_heads=8, head_dim=128,
                     vocab=128256)
LLAMA_70B = ModelSpec("70B (Llama-3.3-70B)", MODELS["70B"], layers=80, kv_heads=8,
                      head_dim=128, vocab=128256)

ROWS, TOKENS_PER_ROW, CLUSTER_GPUS = 1_000_000, 500, 8

# (reference model, vocab, dtype, GPU, GPUs per engine, gpu_memory_utilization)
SIZING_ROWS = [
    ("Qwen2.5-0.5B", 151936, "bfloat16", L4, 1, 0.6),
    ("Qwen2.5-7B", 152064, "bfloat16", L4, 2, 0.8),
    ("Qwen2.5-7B", 152064, "bfloat16", H100, 1, 0.8),
    ("Llama-3.3-70B", 128256, "bfloat16", H100, 4, 0.85),
    ("Llama-3.3-70B", 128256, "bfloat16", H200, 2, 0.85),
    ("SmolLM2-135M (gpu_check.py)", 49152, "float32", H200, 1, 0.9),
]

# (model, GPU, GPUs per engine) on CLUSTER_GPUS GPUs, at the default gpu_memory_utilization 0.9
PLANS = [
    (LLAMA_8B, H100, 1),
    (LLAMA_70B, H100, 4),
    (LLAMA_70B, H100, 8),
    (LLAMA_70B, H200, 4),
    (LLAMA_70B, H200, 8),
    (LLAMA_70B, H200, 2),
    (LLAMA_70B, H100, 2),
]


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def sizing_table() -> list[str]:
    lines = [
        "| reference model (vocab) | dtype | GPU x `--tensor-parallel-size` "
        "| `--gpu-memory-utilization` | model runner | default `--max-num-batched-tokens` "
        "| logits peak outside the profile, per GPU | free outside it (after the margin) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, vocab, dtype, gpu, tp, util in SIZING_ROWS:
        for runner in RUNNERS:
            b = step_token_budget(gpu.memory_bytes, vocab, util, dtype, runner)
            step = f"{b.tokens:,}" + (" (vLLM's)" if runner == "v2" else "")
            fits = "" if b.peak_bytes <= b.headroom_bytes else " (does not fit)"
            lines.append(
                f"| {name} ({vocab:,}) | {dtype} | {gpu.name} x {tp} | {util} "
                f"| {runner.upper()} | {step} | {b.peak_tokens:,} x {vocab:,} x "
                f"{b.bytes_per_token // vocab} B = {gb(b.peak_bytes)}{fits} "
                f"| {gb(b.headroom_bytes)} |"
            )
    return lines


def plans() -> list:
    return [
        plan_run(model, gpu, gpus=CLUSTER_GPUS, tensor_parallel_size=tp, rows=ROWS,
                 tokens_per_row=TOKENS_PER_ROW, gpu_tokens_per_s=gpu_demand(model.params),
                 runner=runner)
        for model, gpu, tp in PLANS for runner in RUNNERS
    ]


def plans_table() -> list[str]:
    lines = [
        "| reference on 8 GPUs | runner | `--num-workers` x `--tensor-parallel-size` "
        "| weights / GPU | KV of one step / GPU | vLLM budget / GPU (0.9) "
        "| `--max-num-batched-tokens` | logits peak / GPU (free outside) "
        "| budget left for activations and more KV | tokens/s | hours | render actors (load) "
        "| output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in plans():
        lines.append(
            f"| {p.model}, {p.gpu} | {p.runner.upper()} | {p.num_workers} x "
            f"{p.tensor_parallel_size} "
            f"| {gb(p.weights_bytes)} | {gb(p.kv_step_bytes)} | {gb(p.gpu_budget_bytes)} "
            f"| {p.max_num_batched_tokens:,} | {gb(p.logits_peak_bytes)} "
            f"({gb(p.headroom_bytes)}) | {gb(p.spare_bytes)} "
            f"| {p.tokens_per_s:,.0f} | {p.hours:.2f} | {p.render_actors} "
            f"({p.render_load:.0%}) | {gb(p.output_bytes)} |"
        )
    return lines


def main() -> None:
    print("\n".join(sizing_table()))
    print()
    print("\n".join(plans_table()))


if __name__ == "__main__":
    main()
