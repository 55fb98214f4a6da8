"""Score on this machine from a config file: in-process, or on a local Ray with num_workers.

Usage (from the repository root)::

    python pipelines/score_local.py pipelines/configs/gsm8k_cpu.yaml
    python pipelines/score_local.py pipelines/configs/gsm8k_cpu.yaml num_workers=2 limit=50

The file's keys are the ``profit-prep score`` options (see ``profit-prep score --help``).
"""

from __future__ import annotations

import sys

from load_config import run

if __name__ == "__main__":  # the guard vLLM needs if it ever runs with multiprocessing on
    sys.exit(run(sys.argv[1:]))
