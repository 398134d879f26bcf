"""Exponential moving average of LoRA weights, for evaluation and export (Flow-GRPO's EMA).

After optimiser step t (t = 0, 1, ...), every tracked tensor moves towards the live weights:

    decay_t = min(decay, (1 + t) / (10 + t))          warm-up: early averages forget the init fast
    ema    <- ema + (1 - decay_t) * (param - ema)     = decay_t * ema + (1 - decay_t) * param

(Flow-GRPO's `EMAModuleWrapper`, decay 0.9, with the warm-up of diffusers' `EMAModel`.) The EMA is
kept in float32 on the parameters' device, never fed back into training: rollouts and the learner
always use the raw weights; `state()` is what evaluation renders and exported adapters read.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import Tensor


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at update number `step` (0-based): min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """EMA of a named set of tensors (the decoder LoRA weights, keyed like `trainable_state()`)."""

    def __init__(self, tensors: Mapping[str, Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: t.detach().float().clone() for k, t in tensors.items()}

    @torch.no_grad()
    def update(self, tensors: Mapping[str, Tensor]) -> float:
        """One EMA step towards `tensors` (same keys as at construction); returns the decay used."""
        if tensors.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - tensors.keys(), tensors.keys() - self.shadow.keys()
            raise KeyError(f"EMA keys changed: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        d = ema_decay_at(self.decay, self.num_updates)
        for k, t in tensors.items():
            ema = self.shadow[k]
            ema.add_((t.detach().to(ema.device, torch.float32) - ema), alpha=1 - d)
        self.num_updates += 1
        return d

    def state(self) -> dict[str, Tensor]:
        """A CPU copy of the averaged tensors (what export and evaluation load)."""
        return {k: t.detach().cpu().clone() for k, t in self.shadow.items()}

    def state_dict(self) -> dict:
        """Everything needed to resume: the averages and the update count."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.state()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for k, t in state["shadow"].items():
            self.shadow[k].copy_(t)


@contextlib.contextmanager
def weights_swapped(models, state: Mapping[str, Tensor] | None) -> Iterator[None]:
    """Temporarily load `state` (keys as in `Models.trainable_state()`, e.g. an EMA) into the
    models, restoring the live weights on exit. None: no-op (evaluate the live weights)."""
    if not state:
        yield
        return
    live = {k: v for k, v in models.trainable_state().items() if k in state}
    models.load_trainable_state(dict(state))
    try:
        yield
    finally:
        models.load_trainable_state(live)
