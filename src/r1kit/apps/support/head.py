"""The trained intent classifier: a linear head over pooled hidden states, trained with cross-entropy,
its confidence calibrated by temperature scaling (Guo et al., 2017) on held-out examples.

A head is two files in its directory: ``intent_head.safetensors`` (weights, bias, the feature
standardisation) and ``intent_head.json`` (labels, layer, temperature, the model it was trained on).
Both are written under a temporary name and renamed, so a crash never leaves half a head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from r1kit.data.records import AtomicWriter
from r1kit.errors import CheckpointError, ConfigError

WEIGHTS, META = "intent_head.safetensors", "intent_head.json"


@dataclass
class IntentHead:
    labels: list[str]
    layer: int
    weight: torch.Tensor  # [classes, hidden]
    bias: torch.Tensor  # [classes]
    mean: torch.Tensor  # [hidden]: features are standardised before the linear map
    std: torch.Tensor
    temperature: float = 1.0
    model: str = ""  # the model directory's name, for the error when a head meets another model

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Uncalibrated class scores [N, classes] of features [N, hidden]."""
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities [N, classes]."""
        return (self.logits(features) / self.temperature).softmax(-1)

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        directory = Path(directory)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        with AtomicWriter(directory / WEIGHTS, "wb") as out:
            out.file.write(save_tensors({k: v.contiguous() for k, v in tensors.items()}))
        meta = {"labels": self.labels, "layer": self.layer, "temperature": self.temperature, "model": self.model, **(extra or {})}
        with AtomicWriter(directory / META) as out:
            out.file.write(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> IntentHead:
        directory = Path(directory)
        if not (directory / WEIGHTS).is_file() or not (directory / META).is_file():
            raise CheckpointError(f"{directory} holds no intent head ({WEIGHTS} + {META}); train one with "
                                  "`r1kit apps intent train --model M --out DIR`, or use intent_method=zero_shot")  # fmt: skip
        try:
            meta = json.loads((directory / META).read_text(encoding="utf-8"))
            tensors = load_tensors((directory / WEIGHTS).read_bytes())
            head = cls(list(meta["labels"]), int(meta["layer"]), tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"],
                       float(meta["temperature"]), str(meta.get("model", "")))  # fmt: skip
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{directory}: the intent head is damaged ({exc!r}); train it again") from None
        if head.weight.shape != (len(head.labels), head.mean.numel()):
            raise CheckpointError(f"{directory}: weight {tuple(head.weight.shape)} does not match {len(head.labels)} labels; train it again")
        return head


def calibration_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows): ``fraction`` of each class held out (at least one where a class has two)."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in targets.unique():
        rows = (targets == c).nonzero().flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        k = min(rows.numel() - 1, max(1, round(fraction * rows.numel()))) if rows.numel() > 1 else 0
        held.append(rows[:k])
        fit.append(rows[k:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (cross-entropy + L2 on the weights), a convex problem, by L-BFGS."""
    linear = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear.weight.detach().clone(), linear.bias.detach().clone()


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of ``softmax(logits / T)`` on held-out rows."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


def train_head(features: torch.Tensor, intents: list[str], layer: int, model: str = "", weight_decay: float = 1e-2,
               steps: int = 300, calibration_fraction: float = 0.15, seed: int = 0) -> IntentHead:  # fmt: skip
    """Train a head on ``features`` [N, hidden] labelled ``intents``; a held-out share of each class fits the temperature."""
    if features.shape[0] != len(intents):
        raise ConfigError(f"{features.shape[0]} feature rows for {len(intents)} labels")
    labels = sorted(set(intents))
    if len(labels) < 2:
        raise ConfigError(f"training needs at least two intents, the data has {labels}", param="--data")
    y = torch.tensor([labels.index(i) for i in intents])
    fit, held = calibration_split(y, calibration_fraction, seed)
    mean, std = features[fit].mean(0), features[fit].std(0)
    std = std.clamp_min(1e-2 * float(std.median()))  # a nearly constant feature must not blow up once standardised
    x = (features - mean) / std
    weight, bias = fit_linear(x[fit], y[fit], len(labels), weight_decay, steps)
    head = IntentHead(labels, layer, weight, bias, mean, std, 1.0, model)
    if held.numel():
        head.temperature = fit_temperature(head.logits(features[held]), y[held])
    return head
