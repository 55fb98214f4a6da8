"""Text from the data, shown safely: control characters as visible escapes, token texts, rule
descriptions. Every terminal and HTML view goes through :func:`visible`.

    >>> visible("\x1b[2Jhi")
    '\\x1b[2Jhi'
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from profit_prep.rules.profit import MaskRule
from profit_prep.rules.selection import Rule


def describe_rule(rule: MaskRule) -> str:
    """``higher tau=0.1`` style text.

    >>> describe_rule(MaskRule("middle", tau_low=0.1, tau_high=0.9))
    'middle tau_low=0.1 tau_high=0.9'
    """
    params = " ".join(f"{k}={v}" for k, v in rule.to_dict().items()
                      if k not in ("strategy", "protect"))
    # Protection is the default: only the paper's exact rule (protect=none) is spelled out.
    none = " protect=none" if rule.protect == "none" else ""
    return visible(f"{rule.strategy} {params}{none}")  # parameters come from the manifest


# -- text from the data, shown safely -----------------------------------------------------------

# Characters that must never reach a terminal (or a page) raw from the data: C0 controls except
# line break and tab (ESC starts CSI/OSC sequences: screen clear, window title, OSC 52 clipboard),
# DEL, C1 controls (0x9b is an 8-bit CSI, 0x9d an 8-bit OSC), the Unicode bidi controls that
# reorder how text reads (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069), the line/paragraph
# separators U+2028/9, other invisible format controls that can hide text (U+206A-U+206F,
# U+FFF9-U+FFFB, the tag characters U+E0000-U+E007F), and lone surrogates (not encodable:
# printing one would fail).
CONTROL_CHARS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u206f"
    "\ufff9-\ufffb\U000e0000-\U000e007f\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    r"""``text`` with every control character shown as an escape: the one function every view
    (inspect, stats, the HTML report, error lines) passes data-derived text through, so that only
    the view's own colour codes reach the terminal. Line breaks and tabs are kept (layout).

    >>> visible("a\x1b[2Jb\x9b\u202ec\n")
    'a\\x1b[2Jb\\x9b\\u202ec\n'
    """
    return CONTROL_CHARS.sub(_escape, text)


def stats_json(stats: dict[str, Any]) -> str:
    r"""``stats`` as JSON for a terminal: readable UTF-8, but every control character escaped
    (``json.dumps`` escapes only U+0000-U+001F; DEL, C1 and bidi controls would stay raw).

    >>> stats_json({"token": "\x9b\u202e\x1b"})
    '{\n  "token": "\\u009b\\u202e\\u001b"\n}'
    """
    text = json.dumps(stats, indent=2, ensure_ascii=False)
    return CONTROL_CHARS.sub(_json_escape, text)


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON writes a character beyond the BMP as a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


# -- token text ------------------------------------------------------------------------------


def token_strings(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> list[str]:
    """One display string per token, in order.

    Byte-level BPE splits some characters over several tokens; decoding those alone gives
    U+FFFD, so such a run is decoded together and its text shown on the first token.
    """
    ids = [int(i) for i in ids]
    pieces = tokenizer.batch_decode(
        [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    i = 0
    while i < len(pieces):
        if "\ufffd" in pieces[i]:
            for j in range(i + 2, min(i + 5, len(ids)) + 1):
                joined = tokenizer.decode(
                    ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
                if "\ufffd" not in joined:
                    pieces[i:j] = [joined] + [""] * (j - i - 1)
                    i = j - 1
                    break
        i += 1
    return pieces


def describe_any(rule: Rule) -> str:
    """Text for any :data:`Rule`: ``stored``, ``higher tau=0.1``, ``top signal=entropy ...``.

    >>> describe_any(Select("band", "rank", hi=3))
    'band signal=rank hi=3'
    """
    if rule is None:
        return "stored loss_mask"
    if isinstance(rule, MaskRule):
        return describe_rule(rule)
    used = (
        ("signal", "fraction", "scope", "largest") if rule.kind == "top" else ("signal", "lo", "hi")
    )
    d = rule.to_dict()
    return visible(rule.kind + "".join(
        f" {k}={d[k]:g}" if isinstance(d[k], float) else f" {k}={d[k]}"
        for k in used
        if d[k] is not None
    ))


