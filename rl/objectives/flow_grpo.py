"""Flow-GRPO's decoder objective (Liu et al. 2025; UAE eq. 4): clipped GRPO on the per-step
log-probs of SDE trajectories, KL to the adapter-disabled decoder in closed form.

The math is `rl.grpo.micro_batch_loss` and `rollouts.sde`; this file is Flow-GRPO's train_sd3.py
loop: for every trained timestep, for every micro-batch of rows, forward that step and backward its
share of the loss; one optimizer step per pass. Memory holds one step's graph for one micro-batch,
whatever the number of steps and rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rl import grpo
from rl.objectives import DecoderObjective
from rollouts.sde import gaussian_kl_same_std, kl_std
from rollouts.trajectories import Trajectory, step_logprobs

if TYPE_CHECKING:
    from rl.learner import Learner


class FlowGRPO(DecoderObjective):
    """`grpo.decoder.algorithm: flow_grpo` (the default)."""

    name = "flow_grpo"

    def train(self, learner: "Learner", traj: Trajectory, advantages: torch.Tensor,
              valid: torch.Tensor) -> dict[str, Any]:
        cfg, g = self.recipe.grpo.decoder, self.recipe.grpo
        t = self.recipe.rollout.trajectory
        a = t.noise_level
        # Guided velocity in training only when asked: otherwise the conditional policy is trained
        # (the rollout stored its log-probs under that policy too).
        cfg_scale = t.cfg_scale if t.cfg_in_training else 1.0
        decoder = learner.models.decoder
        n, s_count = traj.log_probs.shape
        # mean over steps, then rows; Flow-GRPO drops zero-advantage rows from that mean (recipe option)
        w, w_tok = (x.to(learner.device) for x in grpo.trajectory_weights(advantages, valid, s_count,
                                                                         cfg.drop_zero_advantage))
        adv = advantages.to(learner.device)
        batches = learner.micro_batches(n)
        stale = traj.version != learner.version
        old_logp = traj.log_probs.to(learner.device) if stale else torch.zeros_like(w)
        stats: dict[str, Any] = {}
        with learner._training():
            for it in range(g.num_iterations):
                acc = grpo.LossStats()
                for s in range(s_count):
                    for rows in batches:
                        def loss_fn(rows=rows, s=s, it=it):
                            kl = None
                            if cfg.beta > 0:
                                with torch.no_grad(), learner.models.reference("decoder"):
                                    _, mean_ref, _ = step_logprobs(decoder, traj, a, rows=rows, cfg_scale=cfg_scale,
                                                                   steps=[s], cps_logprob=t.cps_logprob)
                            # Flow-GRPO lets the gradient through v_u as well; cfg_detach_uncond stops it.
                            logp, mean, std = step_logprobs(decoder, traj, a, rows=rows, cfg_scale=cfg_scale, steps=[s],
                                                            cfg_detach_uncond=t.cfg_detach_uncond,
                                                            cps_logprob=t.cps_logprob)
                            if it == 0 and not stale:
                                old_logp[rows, s] = logp[:, 0].detach()
                            if cfg.beta > 0:
                                # ||mu_theta - mu_ref||^2 / (2 s^2), per step: equal-variance Gaussians, with s
                                # the transition std or Flow-GRPO's (no sqrt(-dt)), recipe `kl_scale`.
                                s_kl = kl_std("sde", std[:, 0], traj.sigmas[s].item(), traj.sigmas_next[s].item(),
                                              cfg.kl_scale)
                                kl = gaussian_kl_same_std(mean[:, 0], mean_ref[:, 0], s_kl).unsqueeze(1)
                            return grpo.micro_batch_loss(logp, old_logp[rows, s:s + 1], adv[rows], w[rows, s:s + 1],
                                                         w_tok[rows, s:s + 1], kl=kl, beta=cfg.beta,
                                                         epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high), None

                        out, _ = learner._forward_backward(loss_fn)
                        acc.add(out)
                grad_norm = learner._optimizer_step()
                if it == 0:
                    stats = dict(acc.summary(), grad_norm=grad_norm)
        stats["stale_rollout"] = float(stale)
        return stats
