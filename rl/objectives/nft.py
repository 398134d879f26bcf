"""DiffusionNFT's decoder objective (Zheng et al. 2025, "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process", arXiv 2509.16117; NVlabs/DiffusionNFT scripts/train_nft_sd3.py
at commit 24af555, read and re-derived here, not copied).

No log-probs and no reverse-process likelihood: the policy is trained on the forward process, with
a flow-matching loss on the rollouts' clean samples x_0 (any sampler; ODE samples by default),
noised afresh to a level t drawn from the rollout schedule. Around the old policy v_old (an EMA
of the trained weights), two implicit policies are contrasted (paper eq. 6-8; L934-L936):

    v+ = (1 - beta) v_old + beta v_theta        (positive: where high-reward samples lead)
    v- = (1 + beta) v_old - beta v_theta        (negative: its reflection through v_old)

With x_t = (1 - t) x_0 + t eps and the x_0 predictions x0(v) = x_t - t v (L870, L940, L948), each
sample's loss is (L939-L960):

    r       = clamp(clip(A, -c, c) / c / 2 + 0.5, 0, 1)        reward in [0, 1] from the advantage
    L+      = mean_d (x0(v+) - x_0)^2 / sg(max(mean_d |x0(v+) - x_0|, 1e-5))   adaptive weighting
    L-      = the same with v-
    L       = c (r L+ + (1 - r) L-) / beta  +  kl_beta mean_d (v_theta - v_ref)^2

with c = adv_clip_max, sg a stop-gradient, the weights in float64 (L943), v_ref the decoder with its
adapter disabled (L897). The batch loss is the mean over samples and over each sample's K trained
levels (L983: loss / (accumulation steps x K)). After every update the old policy moves towards the
trained weights, old <- d old + (1 - d) theta, d from `old_decay` (L1034-L1039).

`nft_loss`, `reward_weight`, `train_levels` and `old_decay` are pure functions (tests compare them
with a float64 re-derivation of the reference code); `DiffusionNFT` is the learner-side loop.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rl import grpo
from rl.objectives import DecoderObjective
from rollouts.sde import shifted_sigmas

if TYPE_CHECKING:
    from rl.learner import Learner
    from rollouts.trajectories import Trajectory


# ALGO LOGIC: advantage -> reward in [0, 1]


def reward_weight(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = clamp(clip(A, -c, c) / c / 2 + 0.5, 0, 1), (b,) -> (b,) (train_nft_sd3.py L910-L929,
    adv_mode "all"): A = -c gives r = 0 (all weight on the negative policy), A = 0 gives 1/2."""
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return ((a / adv_clip_max) / 2.0 + 0.5).clamp(0.0, 1.0)


# ALGO LOGIC: the loss on one level t


class NFTLoss(NamedTuple):
    loss: Tensor  # (b,) per-sample loss, c (r L+ + (1 - r) L-) / beta + kl_beta KL, with grad
    policy: Tensor  # (b,) its policy part, c (r L+ + (1 - r) L-) / beta
    kl: Tensor  # (b,) mean_d (v_theta - v_ref)^2, detached (0 without v_ref)
    old_deviate: Tensor  # (b,) mean_d (v_theta - v_old)^2, detached


def _adaptive_x0_loss(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """mean_d (x0_pred - x0)^2 / sg(max(mean_d |x0_pred - x0|, 1e-5)), (b, ...) -> (b,); the
    weight in float64 as the reference (L942-L947), so the loss is float64 too."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)


def nft_loss(v: Tensor, v_old: Tensor, x0: Tensor, xt: Tensor, t: Tensor, advantages: Tensor, *,
             beta: float = 1.0, adv_clip_max: float = 5.0, v_ref: Tensor | None = None,
             kl_beta: float = 0.0) -> NFTLoss:
    """DiffusionNFT's per-sample loss at one noise level (module docstring).

    v: (b, C, h, w) v_theta(x_t, t, c) with grad; v_old, v_ref: the same under the old policy and the
    reference (no grad needed; v_ref None: no KL term); x0: (b, C, h, w) clean rollout latents;
    xt = (1 - t) x0 + t eps; t: (b,) levels in (0, 1]; advantages: (b,). beta > 0.
    """
    t_ = t.reshape(-1, *([1] * (x0.ndim - 1))).to(v.dtype)  # (b, 1, 1, 1)
    v_old = v_old.detach()
    v_plus = beta * v + (1.0 - beta) * v_old  # (b, C, h, w)
    v_minus = (1.0 + beta) * v_old - beta * v
    positive = _adaptive_x0_loss(xt - t_ * v_plus, x0)  # (b,) float64
    negative = _adaptive_x0_loss(xt - t_ * v_minus, x0)
    r = reward_weight(advantages, adv_clip_max).to(positive.dtype)  # (b,)
    policy = (r * positive / beta + (1.0 - r) * negative / beta) * adv_clip_max  # (b,)
    dims = tuple(range(1, x0.ndim))
    if v_ref is not None:
        kl = ((v - v_ref.detach()) ** 2).mean(dim=dims)  # (b,) with grad
        loss = policy + kl_beta * kl
    else:
        kl = torch.zeros_like(policy)
        loss = policy
    with torch.no_grad():
        old_deviate = ((v - v_old) ** 2).mean(dim=dims)
    return NFTLoss(loss, policy.detach(), kl.detach(), old_deviate)


# ALGO LOGIC: which levels each sample is trained at


def train_levels(n: int, num_steps: int, fraction: float, generator: torch.Generator) -> Tensor:
    """(n, K) long indices into the rollout schedule's num_steps levels, K = max(1, int(num_steps x
    fraction)): per sample a random permutation of the steps, its first K (train_nft_sd3.py L569,
    L810-L816: `randperm(num_timesteps)` per sample, then timesteps [:, j] for j < K)."""
    k = max(1, int(num_steps * fraction))
    return torch.stack([torch.randperm(num_steps, generator=generator)[:k] for _ in range(n)]) if n else \
        torch.zeros(0, k, dtype=torch.long)


# ALGO LOGIC: the old policy, an EMA of the trained weights


def old_decay(update: int, flat: int = 0, rate: float = 0.001, max_decay: float = 0.5) -> float:
    """d after optimizer update number `update` (1 after the first): 0 while update < flat, else
    min((update - flat) x rate, max_decay) (train_nft_sd3.py `return_decay`, L169-L189; decay_type 1
    is (0, 0.001, 0.5), 2 is (75, 0.0075, 0.999))."""
    if update < flat:
        return 0.0
    return min((update - flat) * rate, max_decay)


class OldPolicy:
    """The old policy's decoder LoRA (float32, on the parameters' device), keys as in
    `Learner.trainable_state()`: a copy of the trained weights at the first NFT update (L576-L579),
    then old <- d old + (1 - d) theta after each update (L1034-L1039)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.shadow = {k: t.detach().float().clone() for k, t in tensors.items()}
        self.steps = 0  # optimizer steps taken by the objective (the reference's global_step)

    def to(self, device: torch.device | str) -> None:
        self.shadow = {k: t.to(device) for k, t in self.shadow.items()}

    @torch.no_grad()
    def update(self, tensors: Mapping[str, Tensor], decay: float) -> None:
        for k, t in tensors.items():
            s = self.shadow[k]
            s.mul_(decay).add_(t.detach().to(s.device, torch.float32), alpha=1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "shadow": {k: t.cpu().clone() for k, t in self.shadow.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str) -> "OldPolicy":
        old = cls({k: t.to(device) for k, t in state["shadow"].items()})
        old.steps = int(state["steps"])
        return old


@contextlib.contextmanager
def swapped(params: Mapping[str, torch.nn.Parameter], values: Mapping[str, Tensor]) -> Iterator[None]:
    """Inside: the parameters hold `values` (same keys; cast to their dtype), restored bitwise on exit.
    The parameters must be whole on this rank (ZeRO 0-2; refused at ZeRO-3 by the recipe)."""
    live = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(live[k])


# the learner's side


class DiffusionNFT(DecoderObjective):
    """`grpo.decoder.algorithm: nft`. Memory: one micro-batch's forward graph at one level (the old
    and reference passes run without grad), as the Flow-GRPO objective; the clean latents of the
    rank's rows and one level's noise for them stay on the CPU."""

    name = "nft"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.old: OldPolicy | None = None

    def rollout_options(self) -> dict[str, Any]:
        return {"ode": self.recipe.grpo.decoder.nft.rollout == "ode"}

    def _generator(self, learner: "Learner") -> torch.Generator:
        """Levels and noise of this update: a stream of (seed, weight version, rank), so a resumed
        run draws what the uninterrupted one drew."""
        words = [self.recipe.seed & 0xFFFFFFFF, learner.version, learner.rank, 2]
        state = np.random.SeedSequence(words).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def train(self, learner: "Learner", traj: "Trajectory", advantages: torch.Tensor,
              valid: torch.Tensor) -> dict[str, Any]:
        c = self.recipe.grpo.decoder.nft
        t = self.recipe.rollout.trajectory
        if traj.clean_latents is None:
            raise ValueError("grpo.decoder.algorithm nft trains on the rollouts' clean latents, but this trajectory "
                             "has none (made by an older rollout worker?)")
        device = learner.device
        decoder = learner.models.decoder
        params = learner._decoder_lora()
        if self.old is None:  # the old policy starts as the trained weights (L576-L579)
            self.old = OldPolicy({k: p.detach().to(device) for k, p in learner._gathered(params).items()})
        self.old.to(device)
        x0_all = traj.clean_latents  # (n, C, h, w), CPU
        n = x0_all.shape[0]
        levels = shifted_sigmas(t.num_steps, decoder.shift)[:-1]  # (T,) the rollout schedule's sigmas
        gen = self._generator(learner)
        # Every row, zero-variance groups included (advantage 0: r = 1/2), as DiffusionNFT keeps them.
        adv = advantages.to(device, torch.float32)
        batches = learner.micro_batches(n)
        stats: dict[str, Any] = {}
        with learner._training():
            for it in range(self.recipe.grpo.num_iterations):
                picks = train_levels(n, t.num_steps, c.timestep_fraction, gen)  # (n, K)
                k_count = picks.shape[1]
                weight = 1.0 / (n * k_count)  # mean over rows and levels
                sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "old_deviate": 0.0}
                for k in range(k_count):
                    sigma_k = levels[picks[:, k]]  # (n,)
                    noise_k = torch.randn(x0_all.shape, generator=gen)  # (n, C, h, w), fresh per level (L868)
                    for rows in batches:
                        def loss_fn(rows=rows, sigma_k=sigma_k, noise_k=noise_k):
                            x0 = x0_all[rows].to(device, torch.float32)
                            s = sigma_k[rows].to(device)  # (b,)
                            s_ = s.view(-1, *([1] * (x0.ndim - 1)))
                            xt = (1 - s_) * x0 + s_ * noise_k[rows].to(device)  # forward process (L870)
                            cond, mask, pooled = (x[rows].to(device) for x in (traj.cond, traj.cond_mask, traj.pooled))
                            with torch.no_grad(), swapped(params, self.old.shadow):
                                v_old = decoder.velocity(xt, s, cond, pooled, mask).float()
                            v_ref = None
                            if c.kl_beta > 0:
                                with torch.no_grad(), learner.models.reference("decoder"):
                                    v_ref = decoder.velocity(xt, s, cond, pooled, mask).float()
                            v = decoder.velocity(xt, s, cond, pooled, mask).float()
                            out = nft_loss(v, v_old, x0, xt, s, adv[rows], beta=c.beta, adv_clip_max=c.adv_clip_max,
                                           v_ref=v_ref, kl_beta=c.kl_beta)
                            loss = (out.loss.sum() * weight).float()
                            return grpo.LossOutput(loss, {}), out

                        mb, out = learner._forward_backward(loss_fn)
                        sums["loss"] += float(mb.loss.detach())
                        sums["policy_loss"] += float(out.policy.sum()) * weight
                        sums["kl"] += float(out.kl.sum()) * weight
                        sums["old_deviate"] += float(out.old_deviate.sum()) * weight
                grad_norm = learner._optimizer_step()
                if it == 0:
                    stats = dict(sums, grad_norm=grad_norm, clip_frac=0.0, ratio_mean=1.0, levels=k_count)
        # the old policy follows the trained weights once per rollout batch (theirs: once per epoch),
        # with d of the number of optimizer steps so far (their global_step)
        self.old.steps += self.recipe.grpo.num_iterations
        d = old_decay(self.old.steps, c.old_decay_flat, c.old_decay_rate, c.old_decay_max)
        self.old.update(learner._gathered(params), d)
        stats["old_decay"] = d
        return stats

    def state_dict(self) -> dict[str, Any] | None:
        return self.old.state_dict() if self.old is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:  # on the CPU until the next update moves it to the learner's device
            self.old = OldPolicy.from_state_dict(state, "cpu")
