"""``profit-prep``: a thin command line over the library.

Every ``score`` option is a :class:`~profit_prep.config.ScoreConfig` field, so the CLI and the
Python API cannot drift apart. User errors print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from profit_prep.errors import InputError
from profit_prep.options import add_dataclass_arguments, values_of
from profit_prep.rules.profit import MaskRule, RuleParams

__all__ = ["add_dataclass_arguments", "build_parser", "config_from_args", "main"]

if TYPE_CHECKING:
    from profit_prep.config import ScoreConfig


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**values_of(cls, args))


def rule_params(args: argparse.Namespace) -> RuleParams:
    """The rule parameters given to a view command (None: the stored rule's)."""
    return RuleParams(**values_of(MaskRule, args))


def cmd_score(args: argparse.Namespace) -> int:
    from profit_prep.config import ScoreConfig

    return run_score(config_from_args(ScoreConfig, args))


def run_score(config: ScoreConfig) -> int:
    """Every entry point that scores a config (``score``, pipelines/*.py): the library picks
    the executor and says the run's messages; this prints the summary."""
    from profit_prep import score
    from profit_prep.executors.base import format_summary

    if config.quiet:
        quiet_libraries()
    print(format_summary(score(config)))
    return 0


def quiet_libraries() -> None:
    """--quiet silences the libraries' chatter too: transformers' weight-loading bars, vLLM's
    INFO lines and its import-time FutureWarnings. The CLI owns the process, so it may set this;
    the Python API leaves the caller's logging alone."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read when vllm is first imported
    warnings.filterwarnings("ignore", category=FutureWarning, module="vllm")


def demo_data_path() -> str:
    return str(resources.files("profit_prep") / "data" / "gsm8k_demo.jsonl")


def cmd_demo(args: argparse.Namespace) -> int:
    from profit_prep import score
    from profit_prep.config import ScoreConfig
    from profit_prep.executors.base import format_summary

    print(
        f"demo: SmolLM2-135M-Instruct scores {args.rows} GSM8K rows (MIT licence, "
        "openai/grade-school-math) shipped in the package",
        file=sys.stderr,
    )
    config = ScoreConfig(
        data=demo_data_path(),
        out=args.out,
        model="builtin:smollm2",
        prompt_field="question",
        response_field="answer",
        limit=args.rows,
        shard_size=100,
        overwrite=args.overwrite,
    )
    summary = score(config)
    print(format_summary(summary))
    from profit_prep.views.report import write_report

    print(f"report      {write_report(args.out)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from profit_prep.store.reader import verify

    problems = verify(args.out)
    for p in problems:
        print(f"problem: {p}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_card(args: argparse.Namespace) -> int:
    from profit_prep.store.card import rewrite_card

    print(f"card        {rewrite_card(args.out, license=args.license)}")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from profit_prep.store.combine import combine

    manifest = combine(args.out, args.reference, args.into, overwrite=args.overwrite)
    counts = manifest["counts"]
    print(f"{args.into}: {counts['scored_rows']} rows, {counts['tokens']:,} tokens with "
          "reference_logprobs and excess_loss; load(..., select=Select('top', 'excess_loss', "
          "fraction=0.6)) reads them")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from profit_prep.training.exports import check_export, export

    if args.check:
        problems = check_export(args.out)
        for p in problems:
            print(f"problem: {_one_line(p)}")
        print("ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if not args.to or not args.dest:
        raise InputError("export needs --to FORMAT and --dest DIR (or --check DIR)")
    summary = export(args.out, args.dest, args.to, overwrite=args.overwrite, model=args.model,
                     tokenizer=args.tokenizer, max_length=args.max_length,
                     weights=args.weights, **rule_params(args).given())
    print(summary.line())
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from profit_prep.store.cache import local_output
    from profit_prep.store.reader import read_manifest

    manifest = read_manifest(local_output(args.out))
    manifest.get("chat_template", {}).pop("text", None)
    print(json.dumps(manifest, indent=2))
    return 0


def _use_color(choice: str) -> bool:
    import os

    if choice != "auto":
        return choice == "always"
    plain = os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb"
    return sys.stdout.isatty() and not plain


def _view_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--color-by`` and ``--compare``, checked: rule arguments for ``load_flat`` included."""
    from profit_prep.rules.selection import parse_rule, rule_columns
    from profit_prep.views.flat import PROB

    rule = rule_params(args)
    if args.compare is None:
        return {"color_by": args.color_by, "compare": None, "columns": [args.color_by],
                "rule": rule}
    if args.color_by != "prob":
        raise InputError("--color-by and --compare both decide token colours; choose one")
    given = [f"--{k.replace('_', '-')}" for k in rule.given()]
    if given:
        raise InputError(f"--compare names both rules; drop {'/'.join(given)} "
                         "(write the rule instead, e.g. higher:tau=0.3)")
    from profit_prep.store.cache import local_output
    from profit_prep.store.reader import read_manifest

    # Unset keys of a rule keep the stored values.
    stored = read_manifest(local_output(args.out)).get("mask")
    a, b = (parse_rule(text, stored) for text in args.compare)
    return {"color_by": PROB, "compare": (a, b), "columns": rule_columns(a) + rule_columns(b),
            "rule": rule}


def cmd_inspect(args: argparse.Namespace) -> int:
    from profit_prep.views.flat import load_flat, load_output_tokenizer
    from profit_prep.views.terminal import render_examples

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    view = _view_options(args)
    flat = load_flat(args.out, rule=view["rule"], columns=view["columns"])
    tokenizer = load_output_tokenizer(args.out, args.tokenizer)
    try:
        for block in render_examples(flat, tokenizer, row=args.row, grep=args.grep,
                                     limit=args.limit, color=_use_color(args.color),
                                     color_by=view["color_by"], compare=view["compare"]):
            print(block)
        sys.stdout.flush()
    except BrokenPipeError:  # `profit-prep inspect OUT | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from profit_prep.views.flat import iter_flat, load_output_tokenizer
    from profit_prep.views.stats import StatsAccumulator, format_stats
    from profit_prep.views.text import stats_json

    # Shard by shard: memory stays that of one shard, however large the output.
    acc = StatsAccumulator()
    for flat in iter_flat(args.out, rule=rule_params(args)):
        acc.add(flat)
        del flat  # not held while the next shard is read
    stats = acc.finish(load_output_tokenizer(args.out, args.tokenizer))
    print(stats_json(stats) if args.json else format_stats(stats))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from profit_prep.store.safe_files import writes_through
    from profit_prep.views.report import write_report

    if args.examples < 1 or args.per_page < 1:
        raise InputError("--examples and --per-page must be at least 1")
    view = _view_options(args)
    # A report streamed to /dev/stdout, a FIFO or a link: the status line must not join it.
    streamed = args.html is not None and writes_through(args.html)
    path = write_report(args.out, args.html, examples=args.examples,
                        sample_seed=args.sample_seed, per_page=args.per_page,
                        tokenizer_path=args.tokenizer, color_by=view["color_by"],
                        compare=view["compare"], rule=view["rule"])
    print(f"report      {path}", file=sys.stderr if streamed else sys.stdout)
    return 0


def _add_view_arguments(p: argparse.ArgumentParser, sample_seed: bool = False) -> None:
    """Arguments shared by inspect, stats, report and export: the output, a tokenizer, a new mask
    rule (MaskRule's fields, as ``score`` and ``load`` take them). ``report`` keeps ``--seed`` for
    its example sample: the rule's seed is ``--rule-seed`` there (and on every command)."""
    p.add_argument("out", help="a finished profit-prep output directory")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer folder to decode tokens (default: the manifest's)")
    g = p.add_argument_group("re-threshold (default: the stored loss_mask)")
    add_dataclass_arguments(g, MaskRule, optional=True, default_note="default: the stored rule's",
                            drop_flags=("--seed",) if sample_seed else ())


def _add_colour_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by inspect and report: what colours the tokens (docs/inspect.md)."""
    g = p.add_argument_group("token colours")
    g.add_argument("--color-by", metavar="COLUMN", default="prob",
                   help="prob (default: masked vs kept, tinted by probability) or a stored "
                   "per-token column (logprobs, entropy, top1_logprob, rank): 5 quantile buckets")
    g.add_argument("--compare", nargs=2, metavar=("RULE_A", "RULE_B"),
                   help="mark tokens kept by A only, B only, both, neither; a RULE is stored, "
                   "STRATEGY[:tau=..] (higher:tau=0.3, middle:tau_low=0.2,tau_high=0.8) or a "
                   "selection rule (top:signal=entropy,fraction=0.2; band:signal=rank,hi=3)")


def _add_view_commands(
    sub: Any, commands: dict[str, Callable[[argparse.Namespace], int]]
) -> None:
    """inspect, stats and report: an output seen through a rule (the stored one by default)."""
    p = sub.add_parser("inspect", help="print examples with masked tokens marked")
    _add_view_arguments(p)
    p.add_argument("--row", metavar="ID", help="show the example with this example_id")
    p.add_argument("--limit", type=int, default=5, help="examples to show (default: 5)")
    p.add_argument("--grep", metavar="TEXT", help="only examples whose text contains TEXT")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colours (default: auto, when stdout is a terminal)")
    _add_colour_arguments(p)
    commands["inspect"] = cmd_inspect

    p = sub.add_parser("stats", help="token counts, threshold sweep, histograms, top tokens")
    _add_view_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    commands["stats"] = cmd_stats

    p = sub.add_parser("report", help="write a self-contained HTML report with plots")
    _add_view_arguments(p, sample_seed=True)
    p.add_argument("--html", metavar="FILE", help="report file (default: OUT/report.html)")
    p.add_argument("--examples", type=int, default=200,
                   help="examples to include, a seeded random sample (default: 200)")
    p.add_argument("--seed", type=int, default=0, dest="sample_seed", metavar="SEED",
                   help="seed of the example sample (default: 0)")
    p.add_argument("--per-page", type=int, default=20, help="examples per page (default: 20)")
    _add_colour_arguments(p)
    commands["report"] = cmd_report


def build_parser() -> argparse.ArgumentParser:
    from profit_prep import __version__
    from profit_prep.config import SECTIONS, ScoreConfig

    parser = argparse.ArgumentParser(
        prog="profit-prep",
        description="Offline ProFit token masks: score SFT data with a reference model once, "
        "store per-token log-probabilities and loss masks in Parquet.",
    )
    parser.add_argument("--version", action="version", version=f"profit-prep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("score", help="score a dataset into a Parquet output directory")
    add_dataclass_arguments(p, ScoreConfig, sections=SECTIONS)
    commands["score"] = cmd_score

    p = sub.add_parser("demo", help="score bundled GSM8K rows with the built-in SmolLM2")
    p.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--rows", type=int, default=300, help="rows to score (default: all 300)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    commands["demo"] = cmd_demo

    p = sub.add_parser("verify", help="check an output's shards against its manifest")
    p.add_argument("out")
    commands["verify"] = cmd_verify

    p = sub.add_parser("card", help="write OUT/README.md again: the dataset card "
                       "(configs for datasets and the Hub, provenance)")
    p.add_argument("out")
    p.add_argument("--license", metavar="ID", help="the input's licence as a Hub identifier "
                   "(mit, apache-2.0, cc-by-4.0, other), when profit-prep does not know it")
    commands["card"] = cmd_card

    p = sub.add_parser("combine", help="join a second model's scores of the same tokens "
                       "(reference_logprobs, excess_loss) into a new output")
    p.add_argument("out", help="the scored output (e.g. the model to be trained)")
    p.add_argument("--reference", required=True, metavar="REF_OUT",
                   help="another output of the same rows and tokens (e.g. a reference model)")
    p.add_argument("--into", required=True, metavar="DIR", help="the new output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --into")
    commands["combine"] = cmd_combine

    from profit_prep.training.exports import FORMATS

    p = sub.add_parser("export", help="write the masks in the container a trainer reads "
                       "(LLaMA-Factory, axolotl, ms-swift, HF labels, TRL) with its config")
    _add_view_arguments(p)
    p.add_argument("--to", choices=FORMATS, help="the trainer's format")
    p.add_argument("--dest", metavar="DIR", help="folder to write (new, empty or an earlier "
                   "export)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    p.add_argument("--model", metavar="PATH", help="model named in the config snippet "
                   "(default: the scoring tokenizer's folder)")
    p.add_argument("--max-length", type=int, metavar="N", help="keep the first N tokens per row")
    p.add_argument("--weights", choices=("prob",), help="add DFT-style weights (hf only)")
    p.add_argument("--check", action="store_true",
                   help="check the export in OUT (the first argument) against its source")
    commands["export"] = cmd_export

    p = sub.add_parser("manifest", help="print an output's manifest")
    p.add_argument("out")
    commands["manifest"] = cmd_manifest

    _add_view_commands(sub, commands)
    parser.set_defaults(_commands=commands)
    return parser


def _one_line(text: str) -> str:
    """An error message as one line with no control characters and no URL password: it may
    quote data, and URLs given on the command line."""
    from profit_prep.scorers.server_answers import redact_url
    from profit_prep.store.urls import redact
    from profit_prep.views.text import visible

    return visible(" ".join(redact(redact_url(text)).split()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return guarded(lambda: args._commands[args.command](args))


def guarded(command: Callable[[], int]) -> int:
    """Run a command as every entry point does (the CLI, pipelines/*.py): a user error, a
    system error or Ctrl-C is one line on stderr and an exit status, never a traceback."""
    try:
        return command()
    except InputError as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `profit-prep stats OUT | head`: the reader left, stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a full or read-only disk, a vanished file: the system's own words
        if not exc.strerror:
            raise
        from profit_prep.store.safe_files import os_reason

        print(f"error: {_one_line(os_reason(exc))}; fix that and rerun the same command "
              "(finished work is kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
