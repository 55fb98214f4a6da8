"""Rules: which response tokens stay in the loss, decided from the stored scores.

``profit`` is ProFit's probability rule (``MaskRule``: higher / lower / middle / random),
``selection`` the load-time selection rules over other stored signals (``Select``).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # ``profit_prep.rules`` was one module before 0.3: its names still resolve here.
    from profit_prep.moved import forward_names

    return forward_names(__name__, "profit_prep.rules", "profit_prep.rules.selection", name)
