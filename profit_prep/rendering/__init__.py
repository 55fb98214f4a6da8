"""Rendering: the trainer's tokenizer and chat template turn messages into ids and a response mask.

``tokenizer`` loads and fingerprints the tokenizer and template, ``renderer`` renders and marks
response tokens, ``protected`` keeps special-token text inside data as text.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # ``profit_prep.rendering`` was one module before 0.3: its names still resolve here.
    from profit_prep.moved import forward_names

    return forward_names(__name__, "profit_prep.rendering", "profit_prep.rendering.renderer", name)
