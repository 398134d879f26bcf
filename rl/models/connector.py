"""Connector: encoder hidden states -> decoder conditioning (UAE sec. 2.1, fig. 4; GRAN-TED sec. 3.5).

Layer selection, then an MLP projector (Linear, GELU, Linear) to the decoder's joint-attention width:

- `last`:     h_L, the last hidden state (UAE).
- `norm_avg`: (1/L) sum_i LayerNorm(h_i) over the transformer layers i = 1..L (GRAN-TED sec. 2.1
              eq. 1, Norm-Avg of Wang et al.); the embedding output h_0 is not a layer and is left out.
- `learned`:  sum_i alpha_i LayerNorm(h_i), alpha = softmax(w) (GRAN-TED sec. 3.5 eqs. 3-4), w
              trainable for `freeze_after_steps` optimiser steps, then frozen (the two-step strategy).

LayerNorm is parameter-free (no affine): the paper's weights alpha_i are the only thing that scales
a layer, and a per-layer affine would let the uniform `norm_avg` learn a weighting behind its back.
With HF models h_L is taken as returned, i.e. after the model's final RMSNorm.

SD3 also takes a pooled vector (its CLIP pooled text embedding), which has no counterpart in our
encoder. `pooled` chooses what fills it:
- `learned` (default): one trainable vector, broadcast over the batch (it starts at zero);
- `zeros`:             a fixed zero vector (a buffer, nothing trained);
- `mean`:              masked mean over caption tokens of the selected hidden state, through a
                       trainable Linear to the pooled width (so the pooled vector sees the caption).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

LayerMode = Literal["last", "norm_avg", "learned"]
PooledMode = Literal["learned", "zeros", "mean"]


class Connector(nn.Module):
    """Maps (B, T, H) hidden states of the caption tokens to (B, T, D) decoder conditions."""

    def __init__(self, hidden_size: int, cond_dim: int, pooled_dim: int, num_layers: int,
                 layers: LayerMode = "last", mlp_ratio: float = 2.0, freeze_after_steps: int | None = None,
                 pooled: PooledMode = "learned"):
        super().__init__()
        self.layers = layers
        self.num_layers = num_layers
        self.freeze_after_steps = freeze_after_steps
        self.pooled_mode = pooled
        width = int(cond_dim * mlp_ratio)
        self.proj = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, cond_dim))
        if pooled == "learned":
            self.pooled = nn.Parameter(torch.zeros(pooled_dim))
        elif pooled == "zeros":
            self.register_buffer("pooled", torch.zeros(pooled_dim))
        elif pooled == "mean":
            self.pooled_proj = nn.Linear(hidden_size, pooled_dim)
        else:
            raise ValueError(f"pooled must be learned, zeros or mean, got {pooled!r}")
        if layers != "last":
            # One parameter-free LayerNorm: GRAN-TED normalises each layer before averaging.
            self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        if layers == "learned":
            self.layer_logits = nn.Parameter(torch.zeros(num_layers))  # uniform at start == norm_avg
        # Counts optimiser steps so that `learned` weights freeze on schedule (saved in checkpoints).
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def layer_weights(self) -> torch.Tensor:
        """(L,) weights alpha over transformer layers 1..L that `select` applies (eq. 3)."""
        if self.layers == "learned":
            return torch.softmax(self.layer_logits.float(), dim=0)
        if self.layers == "norm_avg":
            return torch.full((self.num_layers,), 1.0 / self.num_layers)
        w = torch.zeros(self.num_layers)
        w[-1] = 1.0
        return w

    def select(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden_states: the model's L + 1 outputs (embeddings first), each (B, T, H) -> (B, T, H)."""
        if len(hidden_states) != self.num_layers + 1:
            raise ValueError(f"expected {self.num_layers + 1} hidden states (embeddings + {self.num_layers} layers), "
                             f"got {len(hidden_states)}: call the encoder with output_hidden_states=True")
        if self.layers == "last":
            return hidden_states[-1]
        stack = torch.stack([self.norm(h.float()) for h in hidden_states[1:]], dim=0)  # (L, B, T, H)
        w = self.layer_weights().to(stack.device)  # (L,)
        return torch.einsum("l,lbth->bth", w, stack)  # sum_i alpha_i LayerNorm(h_i)

    def forward(self, hidden_states: Sequence[torch.Tensor], mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states as in `select`; mask (B, T), 1 on caption tokens (only `pooled: mean` reads
        it; None: all tokens) -> (cond (B, T, D), pooled (B, P))."""
        h = self.select(hidden_states)
        dtype = self.proj[0].weight.dtype
        cond = self.proj(h.to(dtype))
        if self.pooled_mode == "mean":
            m = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device).float()
            mean = (h.float() * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)  # (B, H)
            pooled = self.pooled_proj(mean.to(dtype))
        else:
            pooled = self.pooled.unsqueeze(0).expand(h.shape[0], -1)
        return cond, pooled

    def after_optimizer_step(self) -> None:
        """Advance the step counter; freeze the learned layer weights once it reaches the limit."""
        self.steps_done += 1
        self.apply_freeze()

    def frozen(self) -> bool:
        """True once the learned layer weights have had their `freeze_after_steps` optimiser steps."""
        return self.freeze_after_steps is not None and int(self.steps_done) >= self.freeze_after_steps

    def apply_freeze(self) -> None:
        """Freeze `layer_logits` if `freeze_after_steps` is reached. Idempotent: the learner calls it
        again after switching a stage on, which sets requires_grad on the whole connector group."""
        if self.layers == "learned" and self.freeze_after_steps is not None:
            if int(self.steps_done) >= self.freeze_after_steps:
                self.layer_logits.requires_grad_(False)
                self.layer_logits.grad = None  # AdamW skips a parameter without grad: no momentum drift
