"""Normalize (the clean stage's first step): turn raw bytes or text into clean Unicode text, or say why it is not text.

Decodes strict UTF-8, repairs mojibake with ``ftfy``, applies Unicode NFC and strips control
characters. It must never change what a text says: no quote uncurling, no full-width folding
(Chinese punctuation is full-width), no HTML unescaping (code holds literal ``&amp;``).
"""

from __future__ import annotations

import re
import unicodedata

import ftfy
from ftfy.badness import is_bad

STAGE = "normalize"
_FIXER = ftfy.TextFixerConfig(
    unescape_html=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    normalization=None,  # NFC is applied to every text below, fixed or not
    explain=False,
)
# C0/C1 controls and DEL, except tab and newline (carriage returns are folded into newlines first).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def normalize(payload: bytes | str) -> tuple[str | None, str, str]:
    """Return ``(text, "", "")`` or ``(None, reason, detail)`` for a document that is not valid text."""
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, "invalid_utf8", f"byte {exc.start}: {exc.reason}"
    text = payload.replace("\r\n", "\n").replace("\r", "\n")
    # ftfy works line by line in Python, slowly; its own mojibake detector, one regex over the
    # whole text, lets the clean majority skip it
    if is_bad(text):
        text = ftfy.fix_text(text, _FIXER)
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    if not text.strip():
        return None, "empty", "no text after cleaning"
    return text, "", ""
