"""Intent recognition behind one interface, two methods chosen by config (``SupportConfig.intent_method``):

* ``head``: a linear head trained on the model's mean-pooled hidden states (:mod:`.head`, :mod:`.features`);
  confidence calibrated by temperature scaling on held-out data.
* ``zero_shot``: label log-likelihoods after an instruction prompt (:mod:`.zero_shot`); confidence is
  the normalised (calibrated) label likelihood. Needs no training data.

Both return the intent, its confidence and the runner-up; below ``threshold`` the intent is
``out_of_scope`` (the top label is still reported as ``predicted``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from r1kit.apps.support.dataset import OUT_OF_SCOPE
from r1kit.apps.support.features import pooled_features
from r1kit.apps.support.head import IntentHead
from r1kit.apps.support.zero_shot import DESCRIPTIONS, LabelScorer
from r1kit.errors import ConfigError

HEAD_DIR = "intent-head"  # a model directory's trained head, unless --out put it elsewhere


@dataclass(frozen=True)
class IntentResult:
    intent: str  # ``out_of_scope`` when the confidence is below the threshold
    confidence: float  # calibrated probability of ``predicted``
    predicted: str  # the most likely label
    runner_up: str
    runner_up_confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def decide(labels: Sequence[str], probabilities: torch.Tensor, threshold: float) -> IntentResult:
    """The result for one message's label probabilities [labels]."""
    values, index = probabilities.topk(min(2, len(labels)))
    top, confidence = labels[int(index[0])], float(values[0])
    second = (labels[int(index[1])], float(values[1])) if len(labels) > 1 else ("", 0.0)
    return IntentResult(top if confidence >= threshold else OUT_OF_SCOPE, confidence, top, *second)


class IntentRecognizer(Protocol):
    labels: list[str]
    threshold: float

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """Calibrated label probabilities [len(texts), len(labels)]."""
        ...

    def recognize(self, texts: Sequence[str]) -> list[IntentResult]:
        """One result per text."""
        ...


class _Recognizer:
    labels: list[str]
    threshold: float

    def recognize(self, texts: Sequence[str]) -> list[IntentResult]:
        return [decide(self.labels, row, self.threshold) for row in self.probabilities(texts)]


class HeadRecognizer(_Recognizer):
    """A trained :class:`IntentHead` over ``model`` (which must be the model it was trained on)."""

    def __init__(self, model, tokenizer, head: IntentHead, threshold: float) -> None:
        if head.mean.numel() != model.config.hidden_size:
            raise ConfigError(f"the intent head was trained on a model with hidden size {head.mean.numel()} ({head.model!r}), "
                              f"this one has {model.config.hidden_size}: train a head for this model", param="head_dir")  # fmt: skip
        self.model, self.tokenizer, self.head, self.threshold = model, tokenizer, head, threshold
        self.labels = head.labels

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        return self.head.probabilities(pooled_features(self.model, self.tokenizer, texts, self.head.layer))


class ZeroShotRecognizer(_Recognizer):
    """Label likelihoods of ``labels`` (intent -> words; default: every shipped intent)."""

    def __init__(self, model, tokenizer, template, threshold: float, labels: dict[str, str] | None = None,
                 examples: Sequence[tuple[str, str]] = ()) -> None:  # fmt: skip
        self.scorer = LabelScorer(model, tokenizer, template, dict(labels or DESCRIPTIONS), examples)
        self.labels, self.threshold = self.scorer.intents, threshold

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.scorer.log_likelihoods(t).softmax(-1) for t in texts]) if texts else torch.empty(0, len(self.labels))


def default_head_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / HEAD_DIR


def build_recognizer(method: str, model, tokenizer, template, threshold: float, head_dir: str | Path | None = None) -> IntentRecognizer:
    """The recogniser ``method`` names (``head`` reads the head in ``head_dir``)."""
    if method == "head":
        if head_dir is None:
            raise ConfigError("intent_method=head needs the directory of a trained head (head_dir)", param="head_dir")
        return HeadRecognizer(model, tokenizer, IntentHead.load(head_dir), threshold)
    if method == "zero_shot":
        return ZeroShotRecognizer(model, tokenizer, template, threshold)
    raise ConfigError(f"intent method {method!r}: choose head or zero_shot", param="intent_method")
