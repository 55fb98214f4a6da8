"""The thin loader: a scored output as a trainer-ready ``datasets.Dataset``.

``load(OUT)`` checks the output against its manifest (row counts, checksums), optionally checks the
trainer's tokenizer, and returns a memory-mapped Arrow dataset with the columns TRL's
``SFTTrainer`` takes for pre-tokenized data:

==================  ===========================================================================
``example_id``      the row's stable id
``input_ids``       token ids (int32 lists)
``completion_mask`` 1 on tokens that stay in the loss (int8 lists); the stored ``loss_mask``, or
                    the mask of another rule recomputed from the stored log-probabilities
``labels``          optional: ``input_ids`` with -100 where ``completion_mask`` is 0 (HF Trainer)
``response_mask``   optional: 1 on all response tokens, for the paper's normalisation
``weights``         optional: per-token float weights, ``"prob"`` = p on response tokens, else 0
``excess_loss``     with ``reference=OTHER_OUT``: ``loss - loss_reference`` per token (NaN at 0)
==================  ===========================================================================

``select=`` (a :class:`profit_prep.rules.selection.Select`) replaces the mask by another method's
rule: top-k%
per example or over the whole dataset, or a band, of probability, loss, entropy, rank or excess
loss (Rho-1, token cleaning, entropy selection; docs/methods.md).

Re-thresholding and truncation run on the flat Arrow child arrays with numpy, one shard at a
time, and the result is written once to an Arrow file in the ``datasets`` cache (keyed by the
shards' checksums and the arguments), which the returned dataset memory-maps.

Example:
    >>> from profit_prep.training.loader import load
    >>> ds = load("out", tau=0.3, labels=True, max_length=2048)  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['example_id', 'input_ids', 'completion_mask', 'labels']
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.rules.keep import (
    Resolved,
    Tokens,
    global_threshold_of,
    kept,
    resolve,
    with_rule_keywords,
)
from profit_prep.rules.profit import RuleParams
from profit_prep.rules.selection import Select
from profit_prep.store.cache import local_output
from profit_prep.store.combine import Reference
from profit_prep.store.reader import check_shards, read_manifest
from profit_prep.store.safe_files import atomic_path_file
from profit_prep.store.schema import flat_list

if TYPE_CHECKING:
    import datasets

LOADER_VERSION = 2  # bump when the loaded layout changes: it is part of the cache key
WEIGHTS = ("prob",)
_PER_TOKEN = ("input_ids", "response_mask", "logprobs", "loss_mask")


@with_rule_keywords  # strategy, tau, ...: MaskRule's fields, each None by default
def load(
    path: str | Path,
    *,
    tokenizer: Any = None,
    allow_tokenizer_mismatch: bool = False,
    labels: bool = False,
    weights: str | None = None,
    max_length: int | None = None,
    response_mask: bool = False,
    select: Select | None = None,
    reference: str | Path | None = None,
    **rule: Any,
) -> datasets.Dataset:
    """Load a scored output as a ``datasets.Dataset`` (see the module docstring for the columns).

    Any of the rule parameters (:class:`~profit_prep.rules.profit.MaskRule`'s fields: ``strategy``,
    ``tau``, ``tau_low``, ``tau_high``, ``keep_fraction``, ``seed``) recomputes the mask from the
    stored log-probabilities: the run's own rule with those parameters replaced, ANDed with the
    response mask. ``max_length`` keeps the first N tokens of every per-token column together.
    ``tokenizer`` (object or folder) is checked against the one used for scoring.
    ``weights`` are read only by :mod:`profit_prep.training.losses` (``weighted_profit_loss``,
    ``ProFitLossMixin``); TRL and the HF Trainer ignore the column (docs/trainers.md).
    ``protect`` (``"end_of_turn"`` or ``"none"``; default: the stored rule's) keeps each
    answer's end-of-turn token in the loss, whatever the rule (docs/methods.md); with
    ``select`` it applies only when given, so other methods' rules stay as published.
    ``select`` applies a :class:`~profit_prep.rules.selection.Select` rule instead of ProFit's;
    ``reference`` (another output of the same rows and tokens) adds ``excess_loss``
    (:mod:`profit_prep.store.combine`). :mod:`profit_prep.rules.keep` decides the kept tokens,
    as for every view.

    Example:
        >>> ds = load("out", strategy="middle", tau_low=0.2, tau_high=0.8)  # doctest: +SKIP
    """
    import datasets

    params = RuleParams(**rule)  # a bad value (strategy="best") is refused before any reading
    if weights is not None and weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r} (choose from {', '.join(WEIGHTS)})")
    if max_length is not None and max_length < 1:
        raise InputError("max_length must be at least 1")
    out = local_output(path)  # a URL: its local copy, verified against the manifest
    manifest = read_manifest(out)  # InputError when unfinished, absent or damaged
    check_shards(out, manifest)  # presence, checksums, row counts, schema: one error line
    if tokenizer is not None:
        check_tokenizer(tokenizer, manifest, allow_mismatch=allow_tokenizer_mismatch)
    resolved = resolve(manifest, params, select)
    ref = Reference(out, reference) if reference is not None else None
    if select is not None:
        _check_select(out, manifest, select, ref)
    options = {"labels": labels, "weights": weights, "max_length": max_length,
               "response_mask": response_mask}

    key = hashlib.sha256(
        json.dumps(
            [LOADER_VERSION, [s["sha256"] for s in manifest["shards"]], resolved.describe(),
             options, ref.describe() if ref else None],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "profit_prep" / f"{key}.arrow"
    if not cache.exists():
        _write(out, manifest, resolved, options, cache, ref)
    return datasets.Dataset.from_file(str(cache))


def _check_select(
    out: Path, manifest: dict[str, Any], select: Select, ref: Reference | None
) -> None:
    column = select.column()
    if column and manifest["shards"]:
        names = pq.read_schema(out / manifest["shards"][0]["file"]).names
        if column not in names:
            flag = "top1" if column == "top1_logprob" else column
            raise InputError(f"{out} has no {column!r} column: score it with --signals {flag}")
    if select.signal == "excess_loss" and ref is None and not _stored_excess(out, manifest):
        raise InputError("signal excess_loss needs reference=OTHER_OUT (the reference's output), "
                         "or an output written by `profit-prep combine`")


def _stored_excess(out: Path, manifest: dict[str, Any]) -> bool:
    """True for an output of `profit-prep combine`, which stores ``excess_loss`` itself."""
    return bool(manifest["shards"]) and "excess_loss" in pq.read_schema(
        out / manifest["shards"][0]["file"]
    ).names


def _shard_columns(select: Select | None, ref: Reference | None) -> list[str]:
    columns = ["example_id", *_PER_TOKEN]
    if select is not None and select.column():
        columns.append(select.column())
    if select is not None and select.signal == "excess_loss" and ref is None:
        columns.append("excess_loss")  # stored by `profit-prep combine`
    return columns


def tokens_of(table: pa.Table, select: Select | None, ref: Reference | None) -> Tokens:
    """A shard's flat arrays, as the rule layer takes them (the selection's signal included)."""
    ids, offsets = flat_list(table["input_ids"])
    signal = None
    if select is not None and select.signal == "excess_loss":
        # An output of `profit-prep combine` stores it; else the reference computes it.
        signal = flat_list(table["excess_loss"])[0] if ref is None else ref.excess_loss(table)
    elif select is not None and select.signal not in ("prob", "loss"):
        signal = flat_list(table[select.column()])[0]
    return Tokens(ids, flat_list(table["response_mask"])[0], flat_list(table["logprobs"])[0],
                  np.diff(offsets), table["example_id"], flat_list(table["loss_mask"])[0], signal)


def _read(out: Path, shard: dict[str, Any], select: Select | None, ref: Reference | None
          ) -> pa.Table:
    return pq.read_table(out / shard["file"], columns=_shard_columns(select, ref),
                         memory_map=True)


def _write(
    out: Path, manifest: dict[str, Any], resolved: Resolved, options: dict[str, Any],
    target: Path, ref: Reference | None = None,
) -> None:
    """Transform the shards one at a time into one Arrow IPC file, streamed into place
    atomically (:func:`profit_prep.store.safe_files.atomic_path_file`)."""
    select = resolved.rule if isinstance(resolved.rule, Select) else None
    # A global top-k rule reads every shard once first, for the exact k-th value.
    threshold = global_threshold_of(
        select, (tokens_of(_read(out, s, select, ref), select, ref) for s in manifest["shards"])
    )
    with atomic_path_file(target) as f:
        writer = None
        for shard in manifest["shards"]:
            table = _read(out, shard, select, ref)
            batch = transform(table, resolved, **options, threshold=threshold, reference=ref)
            if writer is None:
                writer = pa.ipc.new_stream(f, batch.schema)
            writer.write_table(batch)
        if writer is None:  # an output with no shards: write an empty, well-typed file
            schema = _empty_schema(options, ref is not None)
            empty = pa.table({c: pa.array([], t.type) for c, t in schema.items()})
            writer = pa.ipc.new_stream(f, empty.schema)
        writer.close()  # the stream's end; the file stays open for atomic_path_file


def _empty_schema(options: dict[str, Any], excess: bool = False) -> dict[str, pa.Field]:
    fields = {
        "example_id": pa.field("example_id", pa.string()),
        "input_ids": pa.field("input_ids", pa.list_(pa.int32())),
        "completion_mask": pa.field("completion_mask", pa.list_(pa.int8())),
    }
    if options["labels"]:
        fields["labels"] = pa.field("labels", pa.list_(pa.int32()))
    if options["response_mask"]:
        fields["response_mask"] = pa.field("response_mask", pa.list_(pa.int8()))
    if options["weights"]:
        fields["weights"] = pa.field("weights", pa.list_(pa.float32()))
    if excess:
        fields["excess_loss"] = pa.field("excess_loss", pa.list_(pa.float32()))
    return fields


def transform(
    table: pa.Table,
    resolved: Resolved,
    *,
    labels: bool = False,
    weights: str | None = None,
    max_length: int | None = None,
    response_mask: bool = False,
    threshold: float | None = None,
    reference: Reference | None = None,
) -> pa.Table:
    """Scored rows -> loader columns, vectorised over all tokens (no Python loop over tokens).

    The kept tokens are :func:`profit_prep.rules.keep.kept`'s (``threshold``: a global top-k rule's,
    over the whole output).

    Example:
        >>> shard = pq.read_table("out/data/part-00000.parquet")  # doctest: +SKIP
        >>> transform(shard, resolve(read_manifest("out"), RuleParams(tau=0.3)))  # doctest: +SKIP
    """
    select = resolved.rule if isinstance(resolved.rule, Select) else None
    tokens = tokens_of(table, select, reference)
    ids, resp, lengths = tokens.input_ids, tokens.response, tokens.lengths
    offsets = flat_list(table["input_ids"])[1]
    keep = kept(resolved, tokens, threshold)
    columns: dict[str, np.ndarray] = {"input_ids": ids, "completion_mask": keep.astype(np.int8)}
    if labels:
        columns["labels"] = np.where(keep, ids, np.int32(-100)).astype(np.int32)
    if response_mask:
        columns["response_mask"] = resp.astype(np.int8)
    if weights == "prob":
        logprobs, _ = flat_list(table["logprobs"])
        # NaN at t = 0 is never a response token; np.where drops it before it can spread
        columns["weights"] = np.where(resp, np.exp(logprobs), np.float32(0)).astype(np.float32)
    if reference is not None:  # computed once when it is also the selection's signal
        reuse = select is not None and select.signal == "excess_loss"
        columns["excess_loss"] = tokens.signal if reuse else reference.excess_loss(table)

    if max_length is not None and int(lengths.max(initial=0)) > max_length:
        # keep_start truncation, applied to every per-token column with one index
        starts = np.repeat(offsets[:-1], lengths)
        position = np.arange(len(ids), dtype=np.int64) - starts
        index = position < max_length
        columns = {k: v[index] for k, v in columns.items()}
        lengths = np.minimum(lengths, max_length)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

    pa_offsets = pa.array(offsets.astype(np.int32))
    result = {"example_id": table["example_id"]}
    for name, values in columns.items():
        result[name] = pa.ListArray.from_arrays(pa_offsets, pa.array(values))
    return pa.table(result)


# -- tokenizer check -------------------------------------------------------------------------

PART_NAMES = {
    "vocab": "vocab", "special_tokens": "special tokens", "backend": "normalizer/pre-tokenizer/"
    "merges/post-processor", "settings": "settings (add_bos/eos, clean-up, ...)",
    "chat_template": "chat template",
}


def check_tokenizer(
    tokenizer: Any, manifest: dict[str, Any], *, allow_mismatch: bool = False
) -> list[str]:
    """Compare the trainer's tokenizer with the scoring one; the names of the parts that differ.

    Vocabulary, special tokens, the backend pipeline (normalizer, pre-tokenizer, merges, ...)
    and the id settings decide the token ids, so they must match. The chat template is compared
    only when the tokenizer has one of its own: it decides how the trained model is prompted
    later. A mismatch raises InputError, or warns with ``allow_mismatch=True``.

    An output written before the fingerprint covered the backend and settings cannot show that
    they match: it is refused like a mismatch (after its vocabulary and special tokens are
    compared), with that reason.

    Example:
        >>> check_tokenizer("models/my-model", read_manifest("out"))  # doctest: +SKIP
        []
    """
    from profit_prep.rendering.renderer import load_tokenizer, tokenizer_fingerprint

    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    ours = tokenizer_fingerprint(tokenizer, own or "")
    stored = manifest["tokenizer"]
    old = "backend" not in stored or "settings" not in stored
    parts = ["vocab", "special_tokens", *([] if old else ["backend", "settings"])]
    parts += ["chat_template"] if own else []
    differ = [PART_NAMES[p] for p in parts if ours[p] != stored.get(p)]
    if differ:
        message = (
            f"the tokenizer differs from the one the data was scored with: {', '.join(differ)} "
            f"differ (scored with {stored.get('path')}); pass allow_tokenizer_mismatch=True to "
            "load anyway"
        )
    elif old:
        differ = ["unknown (older fingerprint)"]
        message = (
            f"this output was written by an earlier profit-prep, whose tokenizer fingerprint "
            f"does not cover the normalizer, pre-tokenizer, merges or settings, so it cannot "
            f"show that this tokenizer gives the same ids (vocab and special tokens match; "
            f"scored with {stored.get('path')}): rescore with this version, or pass "
            "allow_tokenizer_mismatch=True if you know it is the same tokenizer"
        )
    if differ:
        if not allow_mismatch:
            raise InputError(message)
        warnings.warn(message, stacklevel=3)
    return differ
