"""Language id (the clean stage's language step): which language a text is in, with a confidence, offline.

Uses ``lingua-language-detector`` (models ship inside the wheel: no download; Rust core: fast).
Code is not run through the detector: it passes by file type. This module must never fetch anything
at run time, and never decide on more than the first ``sample_chars`` characters (detection cost
must not grow with document length).
"""

from __future__ import annotations

from functools import lru_cache

STAGE = "language"


@lru_cache(maxsize=1)
def _detector():
    from lingua import LanguageDetectorBuilder

    # low-accuracy mode scores trigrams only: far faster and smaller than the full mode, and as
    # accurate on the document-length texts the pipeline sees (short texts are the weak spot)
    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def detect(text: str, targets: tuple[str, ...], sample_chars: int) -> tuple[str, float]:
    """Return ``(top language code, confidence that the text is in one of targets)``.

    The confidence sums the target languages, so a text that mixes Chinese and English scores
    as high as a text in either one alone. ``"und"`` means no language was recognised.
    """
    values = _detector().compute_language_confidence_values(text[:sample_chars])
    if not values or values[0].value <= 0.0:
        return "und", 0.0
    top = values[0].language.iso_code_639_1.name.lower()
    in_targets = sum(v.value for v in values if v.language.iso_code_639_1.name.lower() in targets)
    return top, in_targets
