"""Run in the ms-swift venv: load an exported JSONL with ms-swift's own dataset loader and encode
every row with its own template, as `swift sft` does.

usage: swift_encode.py DATA.jsonl MODEL_DIR MODEL_TYPE TEMPLATE OUT.json [SFT FLAGS...]
SFT FLAGS: the export's extra `swift sft` flags (only --remove_unused_columns is read).
Writes [{"input_ids": [...], "labels": [...]}, ...] (one per row, in order) to OUT.json.
"""

import json
import sys

from swift import get_model_processor, get_template, load_dataset

data, model, model_type, template_type, out = sys.argv[1:6]
flags = dict(zip(sys.argv[6::2], sys.argv[7::2]))
remove_unused = flags.get("--remove_unused_columns", "true").lower() == "true"
_, processor = get_model_processor(model, load_model=False, model_type=model_type,
                                   download_model=False)
template = get_template(processor, template_type=template_type)  # default backend: swift
template.set_mode("train")
train, _ = load_dataset([data], remove_unused_columns=remove_unused)
rows = []
for row in train:
    encoded = template.encode(row)
    rows.append({"input_ids": list(map(int, encoded["input_ids"])),
                 "labels": list(map(int, encoded["labels"]))})
with open(out, "w") as f:
    json.dump(rows, f)
