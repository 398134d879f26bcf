"""The learner: one DeepSpeed engine over both policies and the connector.

Each stage trains one parameter group and leaves the others untouched (their learning rate is 0
and their gradients are never formed):

- `train_cold_start` (stage 1, UAE eq. 3): 1 - cos(f_I(x), f_I(x_rec)) through encoder LoRA,
  connector and decoder LoRA, with gradient through the last K denoising steps only.
- `train_encoder` (stage 2, UAE eq. 2): clipped GRPO on caption tokens, KL by estimator k1/k2/k3.
- `train_decoder` (stage 3, UAE eq. 4): clipped GRPO on SDE steps, closed-form Gaussian KL.

The math is in `rl.grpo` and `rollouts.sde`; this file moves tensors and calls it. The reference
policy is the adapter disabled. On CPU DeepSpeed runs over gloo; the same code runs on CUDA/NCCL.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from rl import grpo
from rl.config import Recipe
from rl.models.unified import Models, build_models, resolve_device
from rollouts.captions import CaptionGroup, completion_logprobs
from rollouts.sde import gaussian_kl_same_std
from rollouts.trajectories import Trajectory, denoise, initial_noise, step_logprobs

GROUPS = ("encoder", "decoder", "connector")


def init_distributed(rank: int = 0, world_size: int = 1, port: int | None = None) -> None:
    """Start torch.distributed for DeepSpeed: gloo on CPU, nccl on CUDA."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port or _free_port()))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if not torch.cuda.is_available():
        # DeepSpeed would compile its shared-memory all-reduce op (~35-80 s) at first use; gloo
        # does the same job on CPU, so skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Policies(torch.nn.Module):
    """Container so one DeepSpeed engine sees every trainable parameter."""

    def __init__(self, models: Models):
        super().__init__()
        self.encoder = models.encoder.model
        self.connector = models.connector
        self.decoder = models.decoder.transformer


class Learner:
    """Owns the models' trainable state and the optimiser. Used inside `LearnerActor`."""

    def __init__(self, recipe: Recipe, models: Models | None = None, rank: int = 0, world_size: int = 1):
        import deepspeed

        self.recipe = recipe
        self.device = resolve_device(recipe.device)
        init_distributed(rank, world_size)
        self.models = models or build_models(recipe, self.device)
        self.version = 0  # bumped by every optimiser step; rollouts carry the version they used
        g = recipe.grpo
        self.base_lr = {
            "encoder": g.encoder.lr, "decoder": g.decoder.lr, "connector": recipe.cold_start.connector_lr,
        }
        param_groups = [
            {"params": self.models.parameters(name), "lr": self.base_lr[name], "name": name,
             "weight_decay": g.encoder.weight_decay if name == "encoder" else g.decoder.weight_decay}
            for name in GROUPS
        ]
        optimizer = torch.optim.AdamW(param_groups, lr=g.encoder.lr)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": g.max_grad_norm,
            "zero_optimization": {"stage": recipe.learner.zero_stage},
            "bf16": {"enabled": recipe.learner.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_Policies(self.models), optimizer=optimizer, config=ds_config)
        self._clip = None
        self._stage: str | None = None

    # ------------------------------------------------------------------------------------------
    # plumbing
    # ------------------------------------------------------------------------------------------
    def _set_stage(self, stage: str) -> None:
        """Trainable groups per stage: cold start all three; RL stages their policy only."""
        if stage == self._stage:
            return
        active = {"cold_start": GROUPS, "encoder": ("encoder",), "decoder": ("decoder",)}[stage]
        for group in self.optimizer.param_groups:
            name = group["name"]
            on = name in active
            lr = self.recipe.cold_start.lr if stage == "cold_start" and name != "connector" else self.base_lr[name]
            group["lr"] = lr if on else 0.0
            for p in group["params"]:
                p.requires_grad_(on)
        self._stage = stage

    def _step(self, loss: torch.Tensor) -> float:
        self.engine.backward(loss)
        grad_norm = self._grad_norm()
        self.engine.step()
        self.models.connector.after_optimizer_step() if self._stage == "cold_start" else None
        self.version += 1
        return grad_norm

    def _grad_norm(self) -> float:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.norm(torch.stack([g.detach().float().norm() for g in grads])))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.models.trainable_state()

    def grad_norms(self) -> dict[str, float]:
        """Per-group gradient norms of the last backward (tests use it to see where gradient went)."""
        out = {}
        for group in self.optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            out[group["name"]] = float(sum(g.float().pow(2).sum() for g in grads) ** 0.5) if grads else 0.0
        return out

    # ------------------------------------------------------------------------------------------
    # stage 2: encoder GRPO (UAE eq. 2 over caption tokens)
    # ------------------------------------------------------------------------------------------
    def train_encoder(self, group: CaptionGroup, advantages: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        self._set_stage("encoder")
        cfg, g = self.recipe.grpo.encoder, self.recipe.grpo
        temperature = self.recipe.rollout.caption.temperature
        model = self.models.encoder.model
        suppressed = self.models.encoder.suppressed_ids
        mask = group.completion_mask.to(self.device).float() * valid.to(self.device).float().unsqueeze(1)
        adv = advantages.to(self.device)
        ref_logp = None
        if cfg.beta > 0:
            with torch.no_grad(), self.models.reference("encoder"):
                ref_logp, _ = completion_logprobs(model, group, temperature, suppressed)
        stale = group.version != self.version
        old_logp = group.logprobs.to(self.device) if stale else None
        stats: dict[str, Any] = {}
        for it in range(g.num_iterations):
            logp, entropy = completion_logprobs(model, group, temperature, suppressed, with_entropy=(it == 0))
            if old_logp is None:
                # The policy has not moved since the rollout: its own log-probs are pi_old, and
                # the ratio is exactly 1 on this first pass (no extra forward).
                old_logp = logp.detach()
            kl = grpo.kl_estimator(logp, ref_logp, g.kl_estimator) if ref_logp is not None else None
            out = grpo.grpo_loss(logp, old_logp, adv, mask, kl=kl, beta=cfg.beta, epsilon=cfg.epsilon,
                                 epsilon_high=cfg.epsilon_high, agg=g.loss_agg,
                                 constant=self.recipe.rollout.caption.max_new_tokens)
            grad_norm = self._step(out.loss)
            if it == 0:
                stats = dict(out.stats, loss=float(out.loss), grad_norm=grad_norm)
                stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1)) if entropy is not None else 0.0
        stats["version"] = self.version
        stats["stale_rollout"] = float(stale)
        return stats

    # ------------------------------------------------------------------------------------------
    # stage 3: decoder GRPO (UAE eq. 4 over SDE steps)
    # ------------------------------------------------------------------------------------------
    def train_decoder(self, traj: Trajectory, advantages: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        self._set_stage("decoder")
        cfg, g = self.recipe.grpo.decoder, self.recipe.grpo
        a = self.recipe.rollout.trajectory.noise_level
        decoder = self.models.decoder
        n, s = traj.log_probs.shape
        mask = valid.to(self.device).float().unsqueeze(1).expand(n, s)
        adv = advantages.to(self.device)
        mean_ref = None
        if cfg.beta > 0:
            with torch.no_grad(), self.models.reference("decoder"):
                _, mean_ref, _ = step_logprobs(decoder, traj, a)
        stale = traj.version != self.version
        old_logp = traj.log_probs.to(self.device) if stale else None
        stats: dict[str, Any] = {}
        for it in range(g.num_iterations):
            logp, mean, std = step_logprobs(decoder, traj, a)
            if old_logp is None:
                old_logp = logp.detach()
            kl = None
            if mean_ref is not None:
                # ||mu_theta - mu_ref||^2 / (2 std^2), per step: equal-variance Gaussians.
                kl = gaussian_kl_same_std(mean.flatten(0, 1), mean_ref.flatten(0, 1), std.flatten(0, 1)).view(n, s)
            out = grpo.grpo_loss(logp, old_logp, adv, mask, kl=kl, beta=cfg.beta, epsilon=cfg.epsilon,
                                 epsilon_high=cfg.epsilon_high, agg="sequence_mean")
            grad_norm = self._step(out.loss)
            if it == 0:
                stats = dict(out.stats, loss=float(out.loss), grad_norm=grad_norm)
        stats["version"] = self.version
        stats["stale_rollout"] = float(stale)
        return stats

    # ------------------------------------------------------------------------------------------
    # stage 1: cold start (UAE eq. 3)
    # ------------------------------------------------------------------------------------------
    def clip(self):
        if self._clip is None:
            from rewards.clip import ClipReward

            self._clip = make_clip_reward(self.recipe, self.device)
        return self._clip

    def train_cold_start(self, images: list, image_ids: list[str], caption_ids: torch.Tensor,
                         caption_mask: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
        """One joint step of 1 - cos(f_I(x), f_I(D(E(x)))) on B images with one caption each."""
        self._set_stage("cold_start")
        clip = self.clip()
        cond, mask, pooled = self.models.condition(caption_ids.to(self.device), caption_mask.to(self.device))
        noise = initial_noise(self.models.decoder, seeds, self.device)
        steps = self.recipe.rollout.trajectory.render_steps
        k = min(self.recipe.cold_start.grad_steps, steps)
        x0, _ = denoise(self.models.decoder, noise, cond, mask, pooled, steps, grad_last=k)
        recon = self.models.decoder.decode(x0)  # (B, 3, H, W) in [0, 1], differentiable
        rec_emb = F.normalize(clip.model.encode_image(clip_pixels(recon, clip.preprocess)).float(), dim=-1)
        with torch.no_grad():
            src_emb = clip.embed(images)
        cos = (rec_emb * src_emb.to(rec_emb.device)).sum(-1)  # (B,)
        loss = (1 - cos).mean()
        grad_norm = self._step(loss)
        return {"loss": float(loss), "grad_norm": grad_norm, "rewards": cos.detach().cpu().tolist(),
                "version": self.version, "layer_weights": self.models.connector.layer_weights().tolist()}


def clip_pixels(images: torch.Tensor, preprocess) -> torch.Tensor:
    """Differentiable version of the CLIP reward's fixed preprocessing for square (B, 3, H, W)
    images in [0, 1]: bicubic resize to the model's size, then the model's mean/std."""
    h, w = preprocess.size
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False)
    mean = torch.tensor(preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def make_clip_reward(recipe: Recipe, device: torch.device | str = "cpu"):
    """The CLIP reward model named by the recipe (a tiny custom config on CPU)."""
    from rewards.clip import ClipReward, tiny_clip_config

    c = recipe.models.clip
    model = tiny_clip_config(image_size=recipe.models.decoder.image_size) if c.model == "tiny" else c.model
    reward = ClipReward(model, pretrained=c.pretrained, seed=recipe.seed + 4, device=device, checkpoint=c.checkpoint)
    reward.model.requires_grad_(False)
    return reward


class LearnerWorker:
    """The learner as an actor. With `colocate`, it also hosts the rollout worker over the same
    modules, so a weight sync is only a version bump (no copy)."""

    def __init__(self, recipe: Recipe, colocate: bool = False):
        torch.manual_seed(recipe.seed)
        self.learner = Learner(recipe)
        self.rollout = None
        if colocate:
            from rollouts.actors import RolloutWorker

            self.rollout = RolloutWorker(recipe, models=self.learner.models)

    def ready(self) -> bool:
        return True

    def version(self) -> int:
        return self.learner.version

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.learner.trainable_state()

    def train(self, stage: str, *args: Any) -> dict[str, Any]:
        fn = {"cold_start": self.learner.train_cold_start, "encoder": self.learner.train_encoder,
              "decoder": self.learner.train_decoder}[stage]
        stats = fn(*args)
        if self.rollout is not None:
            self.rollout.version = self.learner.version
        return stats

    def rollout_call(self, method: str, *args: Any) -> Any:
        return getattr(self.rollout, method)(*args)
