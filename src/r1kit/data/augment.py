"""The augment stage of `r1kit prepare` (optional): synonym substitution and number perturbation, as marked copies.

The seed scales numbers by 1.2 and prints floats such as ``3.5999999999999996``; here integers stay
integers and decimals keep their number of decimal places, so the text stays valid. Code is never
augmented (a changed constant changes the program). This module must never edit an original
document: it only returns new copies, and the same (document, seed) always gives the same copy.
"""

from __future__ import annotations

import random
import re
from typing import Mapping

from r1kit.data.records import Doc

STAGE = "augment"
# A number not glued to Latin letters, digits or a further ".digit" (so "x86", "utf8" and version
# strings such as "3.11.2" are left alone). CJK neighbours are allowed: "共有3个".
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])(\d+)(?:\.(\d+))?(?![A-Za-z0-9_]|\.\d)")


def scale_numbers(text: str, scale: float) -> str:
    """Multiply every standalone number by ``scale``, keeping integers integral and decimals' places."""

    def repl(m: re.Match[str]) -> str:
        whole, frac = m.group(1), m.group(2)
        if frac is None:
            return str(round(int(whole) * scale))
        value = float(f"{whole}.{frac}") * scale
        return f"{value:.{len(frac)}f}"

    return _NUMBER.sub(repl, text)


def substitute(text: str, table: Mapping[str, str], probability: float, rng: random.Random) -> str:
    """Replace each occurrence of a table word by its synonym with ``probability``."""
    if not table:
        return text
    pattern = re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))
    return pattern.sub(lambda m: table[m.group(0)] if rng.random() < probability else m.group(0), text)


def augment(doc: Doc, table: Mapping[str, str], probability: float, scale: float, seed: int) -> Doc | None:
    """The augmented copy of ``doc``, or None when it is code or nothing would change."""
    if doc.kind != "text":
        return None
    rng = random.Random(f"{seed}:{doc.id}")  # per-document stream: independent of order and workers
    text = scale_numbers(substitute(doc.text, table, probability, rng), scale)
    if text == doc.text:
        return None
    return Doc(f"{doc.id}#aug", doc.source, doc.loc, doc.kind, text, lang=doc.lang, augmented=True)
