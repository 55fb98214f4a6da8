"""Read a pipeline config file (YAML or TOML) into a :class:`~profit_prep.config.ScoreConfig`.

Keys are ScoreConfig fields, i.e. the ``profit-prep score`` options (``max_length`` or
``max-length``). ``key=value`` arguments after the file override it, parsed as YAML scalars::

    python pipelines/score_local.py pipelines/configs/gsm8k_cpu.yaml limit=20 out=/tmp/x

Example:
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "c.toml"
    >>> _ = f.write_text('data = "d.jsonl"\\nout = "o"\\nmax-length = 512\\n')
    >>> load(f, ["limit=10"]).max_length, load(f, ["limit=10"]).limit
    (512, 10)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Scripts run as `python pipelines/x.py` from the repository root (also under `ray job submit
# --working-dir .`): make the checkout's profit_prep importable without an install.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from profit_prep.config import ScoreConfig  # noqa: E402
from profit_prep.errors import InputError  # noqa: E402


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) mapping."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise InputError(f"{path}: config files are .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise InputError(f"{path}: the config must be a mapping of option: value")
    return data


def load(path: str | Path, overrides: Sequence[str] = ()) -> ScoreConfig:
    """The ScoreConfig a file (plus ``key=value`` overrides) describes; unknown keys fail."""
    import yaml

    values = read_file(path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r}: write key=value")
        values[key] = yaml.safe_load(raw)
    known = {f.name for f in dataclasses.fields(ScoreConfig)}
    config: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            options = ", ".join(sorted(known))
            raise InputError(f"{path}: unknown option {key!r} (options: {options})")
        config[name] = value
    for name in ("data", "out"):
        if name not in config:
            raise InputError(f"{path}: {name!r} is required")
    return ScoreConfig(**config)


def run(argv: Sequence[str], *, force_ray: bool = False) -> int:
    """Shared main of the pipeline scripts: load, then score as ``profit-prep score`` does
    (:func:`profit_prep.cli.run_score`: the same executor choice, messages and summary).
    ``force_ray``: at least one Ray worker, for a config that names none (pipelines/ray_job.py).
    """
    from profit_prep.cli import guarded, run_score

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python {sys.argv[0]} CONFIG.yaml|CONFIG.toml [key=value ...]")
        return 0 if argv else 2

    def score_file() -> int:
        config = load(argv[0], argv[1:])
        if force_ray and config.num_workers < 1:
            config = dataclasses.replace(config, num_workers=1)
        return run_score(config)

    return guarded(score_file)
