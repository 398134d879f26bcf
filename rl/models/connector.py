"""Connector: encoder hidden states -> decoder conditioning (UAE sec. 2.1, fig. 4; GRAN-TED sec. 3.5).

Layer selection, then an MLP projector (Linear, GELU, Linear) to the decoder's joint-attention width:

- `last`:     h_L, the last hidden state (UAE).
- `norm_avg`: mean_i LayerNorm(h_i) over the transformer layers i = 1..L (GRAN-TED eq. 3).
- `learned`:  sum_i softmax(w)_i LayerNorm(h_i) with trainable w, frozen after
              `freeze_after_steps` optimiser steps (GRAN-TED eq. 4).

The decoder's pooled conditioning is a learned vector (SD3's CLIP pooled embedding has no
counterpart here), broadcast over the batch.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

LayerMode = Literal["last", "norm_avg", "learned"]


class Connector(nn.Module):
    """Maps (B, T, H) hidden states of the caption tokens to (B, T, D) decoder conditions."""

    def __init__(self, hidden_size: int, cond_dim: int, pooled_dim: int, num_layers: int,
                 layers: LayerMode = "last", mlp_ratio: float = 2.0, freeze_after_steps: int | None = None):
        super().__init__()
        self.layers = layers
        self.num_layers = num_layers
        self.freeze_after_steps = freeze_after_steps
        width = int(cond_dim * mlp_ratio)
        self.proj = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, cond_dim))
        self.pooled = nn.Parameter(torch.zeros(pooled_dim))
        if layers != "last":
            # One parameter-free LayerNorm: GRAN-TED normalises each layer before averaging.
            self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        if layers == "learned":
            self.layer_logits = nn.Parameter(torch.zeros(num_layers))  # uniform at start == norm_avg
        # Counts optimiser steps so that `learned` weights freeze on schedule (saved in checkpoints).
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def layer_weights(self) -> torch.Tensor:
        """(L,) weights over transformer layers that `select` applies."""
        if self.layers == "learned":
            return torch.softmax(self.layer_logits.float(), dim=0)
        if self.layers == "norm_avg":
            return torch.full((self.num_layers,), 1.0 / self.num_layers)
        w = torch.zeros(self.num_layers)
        w[-1] = 1.0
        return w

    def select(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden_states: the model's L + 1 outputs (embeddings first), each (B, T, H) -> (B, T, H)."""
        if self.layers == "last":
            return hidden_states[-1]
        stack = torch.stack([self.norm(h.float()) for h in hidden_states[1:]], dim=0)  # (L, B, T, H)
        w = self.layer_weights().to(stack.device)
        return torch.einsum("l,lbth->bth", w, stack)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cond (B, T, D), pooled (B, P))."""
        h = self.select(hidden_states)
        dtype = self.proj[0].weight.dtype
        cond = self.proj(h.to(dtype))
        pooled = self.pooled.unsqueeze(0).expand(h.shape[0], -1)
        return cond, pooled

    def after_optimizer_step(self) -> None:
        """Advance the step counter; freeze the learned layer weights once it reaches the limit."""
        self.steps_done += 1
        if self.layers == "learned" and self.freeze_after_steps is not None:
            if int(self.steps_done) >= self.freeze_after_steps:
                self.layer_logits.requires_grad_(False)
