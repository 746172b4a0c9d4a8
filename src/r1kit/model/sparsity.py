"""The adaptive sparsity controller: per-layer state that moves each Top-K layer's sparsity.

The seed's sketch read an undefined ``current_sparsity`` and called a gradient norm "second-order".
This controller keeps real state per layer and steers from two measured signals:

* **retained mass** ``r`` — the share of a layer's |activation| mass that its kept neurons carry
  (the Top-K layer measures it on every training forward; an EMA smooths it). A layer whose kept
  neurons already carry almost everything can afford more sparsity; one that is losing mass cannot.
* **loss trend** — the relative change of an EMA of the training loss. A rising loss pauses every
  move toward more sparsity and backs layers off toward the lower bound.

Each step, for a layer at sparsity ``s`` with target ``t`` (default 0.6) and rate ``η``:

    health = clip((r − floor) / (1 − floor), 0, 1)
    s ← s + η · (t − s) · health     when moving up (t > s) and the loss is not rising
    s ← s + η · (t − s)              when moving down (t < s): always allowed
    s ← s − η · (s − lo)             when the loss rises by more than ``loss_tolerance``
    s ← clip(s, lo, hi)              with [lo, hi] = [0.3, 0.8] by default

so each layer converges to the target at its own pace, and stops short of it when its activations
are not sparse enough to give neurons up. The controller only sets ``TopKFFN.sparsity``; it never
touches weights or gradients.
"""

from __future__ import annotations

import dataclasses
import math

from r1kit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SparsityControl:
    target: float = 0.6
    lower: float = 0.3
    upper: float = 0.8
    rate: float = 0.05
    retained_floor: float = 0.5
    loss_tolerance: float = 0.02
    ema: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower <= self.target <= self.upper < 1.0:
            raise ConfigError(f"sparsity control needs 0 <= lower <= target <= upper < 1, got {self.lower}, {self.target}, {self.upper}")
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(f"sparsity control rate={self.rate} must be in (0, 1]")
        if not 0.0 <= self.retained_floor < 1.0:
            raise ConfigError(f"retained_floor={self.retained_floor} must be in [0, 1)")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema={self.ema} must be in [0, 1)")


@dataclasses.dataclass
class LayerState:
    sparsity: float
    retained: float | None = None


class SparsityController:
    """Owns the sparsity of every Top-K layer of a model; call :meth:`step` once per optimizer step."""

    def __init__(self, model, control: SparsityControl | None = None) -> None:
        self.control = control or SparsityControl()
        self.layers = dict(model.topk_layers())
        lo, hi = self.control.lower, self.control.upper
        self.state = {i: LayerState(sparsity=min(hi, max(lo, ffn.sparsity))) for i, ffn in self.layers.items()}
        self.loss_ema: float | None = None
        self._apply()

    def step(self, loss: float) -> dict[int, float]:
        """Read each layer's last retained mass and the loss, move sparsities; returns them by layer."""
        c = self.control
        rising = False
        if math.isfinite(loss):
            if self.loss_ema is not None:
                new_ema = c.ema * self.loss_ema + (1 - c.ema) * loss
                rising = (new_ema - self.loss_ema) / max(abs(self.loss_ema), 1e-12) > c.loss_tolerance
                self.loss_ema = new_ema
            else:
                self.loss_ema = loss
        for i, ffn in self.layers.items():
            st = self.state[i]
            if ffn.last_retained is not None:
                r = float(ffn.last_retained)
                st.retained = r if st.retained is None else c.ema * st.retained + (1 - c.ema) * r
            if rising:
                st.sparsity -= c.rate * (st.sparsity - c.lower)
            else:
                pull = c.target - st.sparsity
                health = 1.0 if st.retained is None else min(1.0, max(0.0, (st.retained - c.retained_floor) / (1 - c.retained_floor)))
                st.sparsity += c.rate * pull * (health if pull > 0 else 1.0)
            st.sparsity = min(c.upper, max(c.lower, st.sparsity))
        self._apply()
        return self.sparsities()

    def sparsities(self) -> dict[int, float]:
        return {i: st.sparsity for i, st in self.state.items()}

    def _apply(self) -> None:
        for i, ffn in self.layers.items():
            ffn.sparsity = self.state[i].sparsity

    def state_dict(self) -> dict:
        return {"loss_ema": self.loss_ema, "layers": {str(i): dataclasses.asdict(st) for i, st in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.loss_ema = state["loss_ema"]
        self.state = {int(i): LayerState(**st) for i, st in state["layers"].items()}
        self._apply()
