"""Decoder objectives: what the learner optimises in the decoder stage (UAE stage 3).

One interface, one file per algorithm (recipe `grpo.decoder.algorithm`), so that a third one
(GRPO-Guard, AWM, ...) is one more file and one line in `OBJECTIVES`. The shape follows
Flow-Factory's trainers (X-GenGroup/Flow-Factory, src/flow_factory/trainers/abc.py `BaseTrainer`:
`optimize(samples)` per algorithm in grpo.py, nft.py, awm.py), cut down to the part that differs
between algorithms: the rollout options of the decoder stage and the update on one batch.
Everything shared (ZeRO engine, micro-batch forward/backward, optimizer step, non-finite checks,
EMA for export, sharding over ranks) stays in `rl.learner.Learner`, which the objective drives
through `_forward_backward`, `_optimizer_step`, `micro_batches` and `_training`.

    flow_grpo  rl/objectives/flow_grpo.py  clipped GRPO on SDE log-probs (Flow-GRPO; UAE eq. 4)
    nft        rl/objectives/nft.py        DiffusionNFT: flow matching on forward-noised clean samples
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rl.config import Recipe
    from rl.learner import Learner
    from rollouts.trajectories import Trajectory


class DecoderObjective:
    """The decoder-stage algorithm. Subclasses set `name` and implement `train`; the defaults of
    the rest are those of an objective with no state and the recipe's own rollouts."""

    name: str = ""

    def __init__(self, recipe: "Recipe"):
        self.recipe = recipe

    def rollout_options(self) -> dict[str, Any]:
        """Extra keyword arguments of `rollouts.trajectories.sample_trajectories` for this
        objective's rollouts (the recipe's `rollout.trajectory` fields are passed besides)."""
        return {}

    def train(self, learner: "Learner", traj: "Trajectory", advantages: torch.Tensor,
              valid: torch.Tensor) -> dict[str, Any]:
        """One update on this rank's rows: forward/backward per micro-batch through
        `learner._forward_backward`, then `learner._optimizer_step()` (once per pass). Returns the
        statistics of the first pass (`loss`, `grad_norm`, and whatever else the metrics row reads:
        `policy_loss`, `kl`, `clip_frac`, `ratio_mean`)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any] | None:
        """What a resumed run needs (tensors and JSON values only); None: stateless."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Inverse of `state_dict`."""


def objectives() -> dict[str, type[DecoderObjective]]:
    """The registry: algorithm name (recipe `grpo.decoder.algorithm`) -> class."""
    from rl.objectives.flow_grpo import FlowGRPO
    from rl.objectives.nft import DiffusionNFT

    return {cls.name: cls for cls in (FlowGRPO, DiffusionNFT)}


def make_decoder_objective(recipe: "Recipe") -> DecoderObjective:
    """The objective named by `recipe.grpo.decoder.algorithm`."""
    name = recipe.grpo.decoder.algorithm
    table = objectives()
    if name not in table:
        raise ValueError(f"grpo.decoder.algorithm {name!r}: use one of {sorted(table)}")
    return table[name](recipe)
