"""Exports of a scored output in the container and columns a given trainer reads.

``export(OUT, DEST, to=FORMAT, **rule)`` writes, into ``DEST``:

=================  ==========================================================================
``llamafactory``   ``tokenized/``: a ``datasets`` ``DatasetDict({"train": ...})`` saved to disk
                   (``input_ids``, ``attention_mask``, ``labels``), and ``llamafactory.yaml``
``axolotl``        ``data-<hash>.parquet`` (exactly ``input_ids``, ``attention_mask``,
                   ``labels``) and ``axolotl.yaml``
``ms-swift``       ``data-<hash>.jsonl``: ``messages`` whose assistant turns are split at the
                   mask's boundaries, each piece with ``"loss": true/false``; ``ms-swift.sh``
``hf``             ``dataset/`` (``input_ids``, ``attention_mask``, ``labels``) for any
                   -100-label trainer, and ``train_hf.py``
``trl``            ``dataset/`` (``input_ids``, ``completion_mask``) for ``SFTTrainer``, and
                   ``train_trl.py``
=================  ==========================================================================

plus ``profit_prep_export.json``: the source output, its shard checksums, tokenizer fingerprint
and rule, the counts, and the sha256 of every file written. Labels follow the Hugging Face
convention (``labels[t]`` belongs to token t; the model shifts), which is what all of these
trainers expect. :func:`check_export` re-reads an export and checks it against its source.

Rows with no trained token are left out and reported (TRL and others would drop them silently or
divide by zero); ms-swift rows whose mask cannot be written as whole messages are refused with
the reason. Nothing is written over a ``DEST`` holding files profit-prep did not write, and an
export appears all at once (built beside ``DEST``, then renamed into place).

Example:
    >>> summary = export("out", "lf", to="llamafactory", tau=0.3)  # doctest: +SKIP
    >>> print(summary.line())  # doctest: +SKIP
"""


from profit_prep.training.exports.check import check_export
from profit_prep.training.exports.driver import FORMATS, LOAD_OPTIONS, export
from profit_prep.training.exports.writers import EXPORT_MANIFEST, ExportSummary

__all__ = ["EXPORT_MANIFEST", "FORMATS", "LOAD_OPTIONS", "ExportSummary", "check_export", "export"]
