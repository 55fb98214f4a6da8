"""The dataset card: ``OUT/README.md``, so that the Hub and ``datasets.load_dataset(OUT)`` read
an output.

Its YAML front matter holds the ``configs:`` that name the shards (``default``) and the rejected
rows (``rejected``, when there are any), the licence when known, and a ``profit_prep:`` block
with the provenance a reader needs; the body repeats that provenance for people and says how to
load the masks. Everything comes from the manifest, never from the rows (dataset text is
untrusted and a card is published); every string the user chose (model name, paths, template
source) is escaped for YAML and for Markdown. Written by the writer's ``finalize`` after the
manifest, and by ``profit-prep card OUT`` for an existing output (:func:`write_card`).

Example:
    >>> text = card_text(read_manifest("out"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import yaml

from profit_prep.errors import InputError
from profit_prep.store.names import CARD, REJECTED, REJECTED_PARQUET
from profit_prep.store.safe_files import open_regular, place
from profit_prep.store.urls import is_url, redact

# Inputs whose name and licence profit-prep knows: the bundled demo rows (docs: README).
_BUNDLED = Path(__file__).resolve().parent / "data"
KNOWN_INPUTS: dict[str, dict[str, str]] = {
    "gsm8k_demo.jsonl": {
        "name": "GSM8K (openai/grade-school-math), the first 300 rows of train.jsonl",
        "license": "mit",
        "license_file": "profit_prep/data/GSM8K_LICENSE",
        "source": "https://github.com/openai/grade-school-math",
    },
}
# A Hub licence identifier ("mit", "apache-2.0", "cc-by-sa-4.0", "other").
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
HOME = "https://github.com/profit-prep/profit-prep"


class _CardDumper(yaml.SafeDumper):
    """YAML with every string on one line: a string holding a line break or any character
    that is not printable is double-quoted with escapes, so no value can end the front matter
    (a ``---`` line) or carry control characters into the card."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if not value.isprintable() or value != value.strip() else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_CardDumper.add_representer(str, _str)


def _yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_CardDumper, allow_unicode=False, sort_keys=False,
                     width=1 << 30, default_flow_style=False)


_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")


def md(value: Any) -> str:
    r"""``value`` as inert Markdown text: every ASCII punctuation character backslash-escaped
    (no link, emphasis, table cell end, code span or HTML tag can start), every character that
    is not printable shown as an escape (a line break cannot start a new block).

    >>> md("<b>x|y</b>\n# z")
    '\\<b\\>x\\|y\\<\\/b\\>\\\\n\\# z'
    """
    text = str(value)
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return _PUNCTUATION.sub(r"\\\1", text)


def input_name(path: Any) -> str:
    """How the card names the input: a local file by its name only (a card is published; the
    folders it sat in are the user's business), a URL without credentials or query, a hub
    dataset by its name."""
    text = str(path) if path is not None else "unknown"
    if "://" in text:  # no user info, no query (store URLs carrying them are refused anyway)
        parts = urllib.parse.urlsplit(redact(text))
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    # The manifest holds local inputs as absolute paths; anything else is a hub name.
    if os.path.isabs(text) or text.startswith((".", "~")):
        return PurePosixPath(text.replace(os.sep, "/")).name or text
    return text


def known_input(path: Any) -> dict[str, str] | None:
    """The name and licence of an input profit-prep ships (the demo rows), else None."""
    if not isinstance(path, str):
        return None
    p = Path(path)
    known = KNOWN_INPUTS.get(p.name)
    if known is None:
        return None
    try:
        bundled = p.resolve() == (_BUNDLED / p.name).resolve()
    except OSError:
        bundled = False
    # The same file of another checkout or install: .../profit_prep/data/NAME.
    return known if bundled or p.parent.parts[-2:] == ("profit_prep", "data") else None


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the card records about the run, all of it read from the manifest."""
    input_path = _get(manifest, "input", "path")
    known = known_input(input_path)
    source: dict[str, Any] = {"name": known["name"] if known else input_name(input_path),
                              "rows": _get(manifest, "input", "rows"),
                              "limit": _get(manifest, "input", "limit")}
    if known:
        source.update(license=known["license"], license_file=known["license_file"],
                      url=known["source"])
    return {
        "profit_prep_version": manifest.get("profit_prep_version"),
        "format_version": manifest.get("format_version"),
        "model": {"name": _get(manifest, "model", "name"),
                  "content_hash": _get(manifest, "model", "content_hash")},
        "tokenizer_fingerprint": _get(manifest, "tokenizer", "fingerprint"),
        "chat_template": {"source": _get(manifest, "chat_template", "source"),
                          "sha256": _get(manifest, "chat_template", "sha256")},
        "mask": manifest.get("mask"),
        "scorer": {"backend": _get(manifest, "scorer", "backend"),
                   "dtype": _get(manifest, "scorer", "dtype")},
        "counts": manifest.get("counts"),
        "input": source,
    }


def configs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``configs:`` that make ``datasets.load_dataset(OUT)`` read every scored row (the
    shards the manifest lists that hold rows, by name: a file in ``data/`` it does not list is
    not read) and, as ``rejected``, the rejected rows."""
    # A shard whose rows were all rejected is a zero-row file, which the datasets Parquet
    # reader refuses ("BatchSize must be greater than 0"): it holds no row, so it is left out.
    files = [shard["file"] for shard in manifest.get("shards", []) if shard.get("rows")]
    found = []
    if files:
        found.append({"config_name": "default", "default": True,
                      "data_files": [{"split": "train", "path": files}]})
    if (_get(manifest, "counts", "rejected_rows") or 0) > 0:
        # Every row rejected: the rejected rows are all there is to load.
        found.append({"config_name": "rejected", **({} if files else {"default": True}),
                      "data_files": [{"split": "train", "path": REJECTED_PARQUET}]})
    return found


def front_matter(manifest: dict[str, Any], license: str | None = None) -> dict[str, Any]:
    facts = provenance(manifest)
    license = license or facts["input"].get("license")
    meta: dict[str, Any] = {}
    if license:
        meta["license"] = license
    meta.update(
        task_categories=["text-generation"],
        tags=["profit-prep", "sft", "token-level-loss-mask", "logprobs"],
        configs=configs(manifest),
        profit_prep=facts,
    )
    return meta


def _rule(mask: Any) -> str:
    if not isinstance(mask, dict):
        return "unknown"
    return ", ".join(f"{k}={v}" for k, v in mask.items() if k != "protect")


def card_text(manifest: dict[str, Any], license: str | None = None) -> str:
    """The whole README.md for an output with this manifest (``license``: a Hub licence id
    for the input, when the user knows it and profit-prep does not)."""
    if license is not None and not _LICENSE.fullmatch(license):
        raise InputError(f"--license {ascii(license)}: not a licence identifier such as mit, "
                         "apache-2.0 or cc-by-sa-4.0 (lower case; 'other' for anything else)")
    meta = front_matter(manifest, license)
    facts = meta["profit_prep"]
    counts = facts["counts"] if isinstance(facts["counts"], dict) else {}
    source = facts["input"]
    licence = meta.get("license")
    licence_line = (f"{md(licence)}" + (f" \\(see {md(source['license_file'])}\\)"
                                        if source.get("license_file") and not license else "")
                    if licence else "unknown: the input's own licence applies")
    rows = [
        ("input", md(source["name"])),
        ("input licence", licence_line),
        ("input rows", f"{md(source['rows'])}" + (f" \\(first {md(source['limit'])} scored\\)"
                                                   if source.get("limit") else "")),
        ("reference model", md(facts["model"]["name"])),
        ("model content hash", md(facts["model"]["content_hash"])),
        ("tokenizer fingerprint", md(facts["tokenizer_fingerprint"])),
        ("chat template", f"{md(facts['chat_template']['source'])}, sha256 "
                          f"{md(facts['chat_template']['sha256'])}"),
        ("mask rule", md(_rule(facts["mask"]))),
        ("protected tokens", md(_get(facts, "mask", "protect") or "none")),
        ("scorer", f"{md(facts['scorer']['backend'])}, {md(facts['scorer']['dtype'])}"),
        *((key.replace("_", " "), md(value)) for key, value in counts.items()),
        ("profit-prep", f"{md(facts['profit_prep_version'])} \\(output format "
                        f"{md(facts['format_version'])}\\)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    rejected = ("\n# the rejected rows (example_id, source_index, reason)\n"
                "rejected = load_dataset(\"USER/NAME\", \"rejected\", split=\"train\")"
                if any(c["config_name"] == "rejected" for c in meta["configs"]) else "")
    body = f"""# Token log-probabilities and ProFit loss masks

Each row is one SFT example rendered with the trainer's tokenizer and chat template
(`input_ids`), the reference model's log-probability of every token (`logprobs`), the
response tokens (`response_mask`) and the tokens kept in the loss (`loss_mask`). Written by
[profit-prep]({HOME}); the columns are described in its `docs/format.md`. This card holds
no text of the rows.

## Provenance

| | |
| --- | --- |
{table}

`manifest.json` holds all of it and the sha256 of every shard; `profit-prep verify` checks the
files against it.

## Loading

With profit-prep (checks every shard's checksum; `tau` or `strategy` re-threshold the mask
from the stored log-probabilities; `labels=True` adds `labels` for the HF Trainer):

```python
import profit_prep

# OUT: the output folder, or a copy of this repository:
#   hf download USER/NAME --repo-type dataset --local-dir OUT
ds = profit_prep.load("OUT", tau=0.2, labels=True)
```

With plain `datasets` (the stored columns as they are; train on `loss_mask`):

```python
from datasets import load_dataset

ds = load_dataset("USER/NAME", split="train")  # or the local folder{rejected}
```

Publish with the Hub's own client (profit-prep handles no token):
`hf upload USER/NAME OUT . --repo-type dataset --exclude .lock`.
"""
    return f"---\n{_yaml(meta)}---\n\n{body}"


def card_files(manifest: dict[str, Any], rejected: bytes | None = None,
               license: str | None = None) -> list[tuple[str, bytes]]:
    """What a finished output gets after its manifest, in writing order, for any writer (a
    folder, an object store): ``rejected.parquet`` when rows were rejected (``rejected``: the
    bytes of ``rejected.jsonl``; ``datasets`` reads all of a card's configs with one builder,
    so the rejected rows' config cannot be the JSONL), then ``README.md``."""
    files = []
    if any(c["config_name"] == "rejected" for c in configs(manifest)):
        if rejected is None:
            raise ValueError("rows were rejected: pass the bytes of rejected.jsonl")
        files.append((REJECTED_PARQUET, rejected_parquet(rejected)))
    files.append((CARD, card_text(manifest, license).encode("utf-8")))
    return files


def needs_rejected(manifest: dict[str, Any]) -> bool:
    """Whether :func:`card_files` needs the bytes of ``rejected.jsonl``."""
    return any(c["config_name"] == "rejected" for c in configs(manifest))


def write_card(out_fd: int, manifest: dict[str, Any], where: Path,
               license: str | None = None) -> Path:
    """Write :func:`card_files` into the output folder open as ``out_fd``: atomically, never
    through a link (:func:`profit_prep.store.safe_files.place`)."""
    rejected = None
    if needs_rejected(manifest):
        with os.fdopen(open_regular(REJECTED, out_fd, where / REJECTED), "rb") as f:
            rejected = f.read()
    for name, data in card_files(manifest, rejected, license):
        place(out_fd, name, data, where / name)
    return where / CARD


# The rejected rows' columns (docs/format.md): typed, so that every output has the same schema.
REJECTED_SCHEMA = pa.schema([("example_id", pa.string()), ("source_index", pa.int64()),
                             ("reason", pa.string())])


def rejected_parquet(rejected: bytes) -> bytes:
    """``rejected.jsonl``'s bytes as Parquet (the same rows, in order)."""
    table = pa_json.read_json(
        pa.BufferReader(rejected),
        parse_options=pa_json.ParseOptions(explicit_schema=REJECTED_SCHEMA,
                                           unexpected_field_behavior="ignore"))
    sink = pa.BufferOutputStream()
    pq.write_table(table.select(REJECTED_SCHEMA.names), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def rewrite_card(path: str | Path, license: str | None = None) -> Path:
    """``profit-prep card OUT``: write the card of a finished output again (its shards must
    match the manifest: a card never describes a damaged output)."""
    from profit_prep.store.reader import check_shards, read_manifest

    if is_url(str(path)):  # the object-store writer writes the card at the end of each run
        raise InputError(f"card {redact(str(path))}: writes a local output's card; on an object "
                         "store the run writes it (rerun the same score command to rewrite it)")
    out = Path(path)
    manifest = read_manifest(out)
    check_shards(out, manifest)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return write_card(fd, manifest, out, license)
    finally:
        os.close(fd)
