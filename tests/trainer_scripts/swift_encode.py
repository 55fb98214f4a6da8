"""Run in the ms-swift venv: encode every row of an exported JSONL with ms-swift's own template.

usage: swift_encode.py DATA.jsonl MODEL_DIR MODEL_TYPE TEMPLATE OUT.json
Writes [{"input_ids": [...], "labels": [...]}, ...] (one per row, in order) to OUT.json.
"""

import json
import sys

from swift import get_model_processor, get_template

data, model, model_type, template_type, out = sys.argv[1:6]
_, processor = get_model_processor(model, load_model=False, model_type=model_type,
                                   download_model=False)
template = get_template(processor, template_type=template_type)  # default backend: swift
template.set_mode("train")
rows = []
with open(data, encoding="utf-8") as f:
    for line in f:
        encoded = template.encode(json.loads(line))
        rows.append({"input_ids": list(map(int, encoded["input_ids"])),
                     "labels": list(map(int, encoded["labels"]))})
with open(out, "w") as f:
    json.dump(rows, f)
