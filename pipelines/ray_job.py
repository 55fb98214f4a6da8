"""Entry point for a Ray cluster job: always scores through Ray (at least one worker).

Submit from the repository root; the driver joins the cluster through ``$RAY_ADDRESS``, which
``ray job submit`` sets::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/ray_job.py pipelines/configs/gsm8k_gpu_7b.yaml

Render and write tasks run on the driver's node (input and ``out`` must exist there); the
scoring actors go wherever the GPUs are and need the model folder at the same path.
See docs/scaling.md.
"""

from __future__ import annotations

import sys

from load_config import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], force_ray=True))
