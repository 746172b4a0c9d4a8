"""The clean stage's normalize and language steps as one worker task: normalize a chunk of raw documents and filter their language.

Runs inside worker processes (local pool or Dask), so it takes and returns plain picklable data and
must never touch the output folder: the driver writes what it returns, in input order.
"""

from __future__ import annotations

from r1kit.data import langid
from r1kit.data.normalize import STAGE as NORMALIZE, normalize
from r1kit.data.readers import RawDoc
from r1kit.data.records import Doc, Drop


def clean_chunk(chunk: list[RawDoc | Drop], languages: tuple[str, ...], threshold: float,
                sample_chars: int) -> list[Doc | Drop]:
    """Return one ``Doc`` or ``Drop`` per item, in order (the reader's drops pass through unchanged)."""
    out: list[Doc | Drop] = []
    for raw in chunk:
        if isinstance(raw, Drop):
            out.append(raw)
            continue
        text, reason, detail = normalize(raw.payload)
        if text is None:
            out.append(Drop(raw.id, raw.source, raw.loc, NORMALIZE, reason, detail))
            continue
        if raw.kind == "code":
            out.append(Doc(raw.id, raw.source, raw.loc, raw.kind, text, lang="code"))
            continue
        lang, confidence = langid.detect(text, languages, sample_chars)
        if confidence < threshold:
            out.append(Drop(raw.id, raw.source, raw.loc, langid.STAGE, "language",
                            f"detected {lang}; confidence {confidence:.2f} in {list(languages)} < {threshold}"))
        else:
            out.append(Doc(raw.id, raw.source, raw.loc, raw.kind, text, lang=lang if lang in languages else languages[0]))
    return out
