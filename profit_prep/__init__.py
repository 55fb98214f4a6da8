"""profit-prep: offline ProFit-style token masks for SFT data.

Score a dataset once with a reference model, store per-token log-probabilities and loss masks
in Parquet, and feed them to any trainer, re-thresholding at load time.

Example:
    >>> import profit_prep
    >>> summary = profit_prep.score(profit_prep.ScoreConfig(
    ...     data="train.jsonl", out="out", prompt_field="question", response_field="answer"))
    ... # doctest: +SKIP
"""

__version__ = "0.3.0"

from profit_prep import moved  # noqa: E402 - first: old import paths resolve from here on

moved.install()

from profit_prep.config import ScoreConfig  # noqa: E402
from profit_prep.errors import InputError, RowError  # noqa: E402
from profit_prep.executors import score  # noqa: E402
from profit_prep.rules.profit import MaskRule  # noqa: E402
from profit_prep.training.exports import check_export, export  # noqa: E402
from profit_prep.training.loader import load  # noqa: E402 - cheap: datasets is imported on first call

__all__ = ["InputError", "MaskRule", "RowError", "ScoreConfig", "check_export", "export", "load",
           "score", "__version__"]
