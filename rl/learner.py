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
from rl.ema import EMA
from rl.models.unified import Models, build_models, resolve_device
from rollouts.captions import CaptionGroup, completion_logprobs, shard_group
from rollouts.sde import gaussian_kl_same_std
from rollouts.trajectories import Trajectory, denoise, initial_noise, shard_trajectory, step_logprobs

GROUPS = ("encoder", "decoder", "connector")


def init_distributed(rank: int = 0, world_size: int = 1, port: int | None = None,
                     master_addr: str = "127.0.0.1") -> None:
    """Start torch.distributed for DeepSpeed: gloo on CPU, nccl on CUDA. Ranks of one learner
    group share `master_addr:port` (rank 0's address and a port it chose)."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if world_size == 1 or port is not None:
        # A single rank never shares its rendezvous: take a fresh loopback port rather than one
        # inherited from a parent process that may still hold it.
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(port or _free_port())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if not torch.cuda.is_available():
        # DeepSpeed would compile its shared-memory all-reduce op (~35-80 s) at first use; gloo
        # does the same job on CPU, so skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now ("" for every interface)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
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

    def __init__(self, recipe: Recipe, models: Models | None = None, rank: int = 0, world_size: int = 1,
                 port: int | None = None, master_addr: str = "127.0.0.1"):
        import deepspeed

        self.recipe = recipe
        self.device = resolve_device(recipe.device)
        self.rank, self.world_size = rank, world_size
        init_distributed(rank, world_size, port, master_addr)
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
        self._decoder_params: dict[str, torch.Tensor] | None = None  # _decoder_lora()
        # EMA of the decoder LoRA for evaluation and export only (rl/ema.py); training never reads it.
        decay = g.decoder.ema_decay
        self._ema = EMA(self._decoder_lora(), decay) if decay is not None else None

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
        self.models.connector.apply_freeze()  # frozen learned layer weights stay frozen
        self._set_checkpointing(stage == "cold_start" and self.recipe.cold_start.activation_checkpointing)
        self._stage = stage

    def _set_checkpointing(self, on: bool) -> None:
        """Activation checkpointing (cold_start.activation_checkpointing) of the decoder's transformer
        blocks (diffusers checkpoints a block only while grad is enabled: the last K steps) and of
        the encoder's LM layers (HF, through peft; non-reentrant, so frozen inputs are fine)."""
        transformer, encoder = self.models.decoder.transformer, self.models.encoder.model
        if on == bool(getattr(transformer, "gradient_checkpointing", False)):
            return
        if on:
            transformer.enable_gradient_checkpointing()
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # HF layers checkpoint only in training mode; dropout is 0 here (AdapterConfig), so
            # train() changes nothing numerically.
            encoder.train()
        else:
            transformer.disable_gradient_checkpointing()
            encoder.gradient_checkpointing_disable()

    def _step(self, loss: torch.Tensor) -> float:
        self.engine.backward(loss)
        grad_norm = self._grad_norm()
        self.engine.step()
        self.models.connector.after_optimizer_step() if self._stage == "cold_start" else None
        self.version += 1
        if self._ema is not None and self._stage in ("decoder", "cold_start"):  # stages that move the decoder LoRA
            self._ema.update(self._decoder_lora())
        return grad_norm

    def _grad_norm(self) -> float:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.norm(torch.stack([g.detach().float().norm() for g in grads])))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.models.trainable_state()

    def _decoder_lora(self) -> dict[str, torch.Tensor]:
        """The live decoder LoRA tensors, keyed as in `trainable_state()` (`decoder.<name>`); found
        once (weights are loaded in place, so the parameters never change)."""
        if self._decoder_params is None:
            from rl.adapters import named_adapter_parameters

            self._decoder_params = {f"decoder.{n}": p for n, p in named_adapter_parameters(self.models.decoder.transformer)}
        return self._decoder_params

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """EMA of the decoder LoRA weights (CPU, float32, keys as in `trainable_state()`), for
        evaluation renders and export; None when `grpo.decoder.ema_decay` is None."""
        return self._ema.state() if self._ema is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs from the learner, as tensors and JSON values only
        (`rl.checkpoint` writes it without pickle): adapters + connector (with its `steps_done`),
        the optimizer (AdamW moments, step counts, per-group lr), the LR scheduler if any, the
        weight version, DeepSpeed's counters, the active stage, the EMA and this process's RNG."""
        from rl.checkpoint import capture_rng, flatten_state, unflatten_state

        ema = self._ema
        scheduler = self.engine.lr_scheduler
        return {
            "weights": self.trainable_state(),
            # CPU copies here: CUDA tensors sent through Ray would be rebuilt on a GPU by the driver
            "optimizer": unflatten_state(*reversed(flatten_state(self.optimizer.state_dict()))),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "version": self.version,
            "stage": self._stage,
            "engine": {"global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                       "skipped_steps": self.engine.skipped_steps},
            "rng": capture_rng(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`: afterwards the next step is bitwise the uninterrupted run's."""
        from rl.checkpoint import restore_rng

        self.models.load_trainable_state(state["weights"])  # in place: the optimizer keeps its params
        if state["stage"] is not None:
            self._set_stage(state["stage"])  # requires_grad (and connector freeze) as the saved run had them
        self.optimizer.load_state_dict(state["optimizer"])  # after _set_stage: the saved lr values win
        if state.get("lr_scheduler") is not None and self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        ema = self._ema
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        self.version = int(state["version"])
        for key, value in state["engine"].items():
            setattr(self.engine, key, value)
        restore_rng(state["rng"])

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
        if self.world_size > 1:  # this rank's whole groups; DeepSpeed averages the gradients
            rows = grpo.shard_rows(len(group.captions), group.group_size, self.rank, self.world_size)
            group, advantages, valid = shard_group(group, self.rank, self.world_size), advantages[rows], valid[rows]
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
                stats = dict(out.stats, loss=float(out.loss.detach()), grad_norm=grad_norm)
                stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1)) if entropy is not None else 0.0
        stats["version"] = self.version
        stats["stale_rollout"] = float(stale)
        stats["rows"] = int(adv.shape[0])  # rollouts this rank trained on
        return stats

    # ------------------------------------------------------------------------------------------
    # stage 3: decoder GRPO (UAE eq. 4 over SDE steps)
    # ------------------------------------------------------------------------------------------
    def train_decoder(self, traj: Trajectory, advantages: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        if self.world_size > 1:
            rows = grpo.shard_rows(traj.log_probs.shape[0], traj.group_size, self.rank, self.world_size)
            traj, advantages, valid = shard_trajectory(traj, self.rank, self.world_size), advantages[rows], valid[rows]
        self._set_stage("decoder")
        cfg, g = self.recipe.grpo.decoder, self.recipe.grpo
        t = self.recipe.rollout.trajectory
        a = t.noise_level
        # Guided velocity in training only when asked: otherwise the conditional policy is trained
        # (the rollout stored its log-probs under that policy too).
        cfg_scale = t.cfg_scale if t.cfg_in_training else 1.0
        decoder = self.models.decoder
        n, s = traj.log_probs.shape
        mask = valid.to(self.device).float().unsqueeze(1).expand(n, s)
        adv = advantages.to(self.device)
        mean_ref = None
        if cfg.beta > 0:
            with torch.no_grad(), self.models.reference("decoder"):
                _, mean_ref, _ = step_logprobs(decoder, traj, a, cfg_scale=cfg_scale)
        stale = traj.version != self.version
        old_logp = traj.log_probs.to(self.device) if stale else None
        stats: dict[str, Any] = {}
        for it in range(g.num_iterations):
            logp, mean, std = step_logprobs(decoder, traj, a, cfg_scale=cfg_scale)
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
                stats = dict(out.stats, loss=float(out.loss.detach()), grad_norm=grad_norm)
        stats["version"] = self.version
        stats["stale_rollout"] = float(stale)
        stats["rows"] = int(adv.shape[0])  # rollouts this rank trained on
        return stats

    # ------------------------------------------------------------------------------------------
    # stage 1: cold start (UAE eq. 3)
    # ------------------------------------------------------------------------------------------
    def clip(self):
        if self._clip is None:
            self._clip = make_clip_reward(self.recipe, self.device)
        return self._clip

    def train_cold_start(self, images: list, image_ids: list[str], caption_ids: torch.Tensor,
                         caption_mask: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
        """One joint step of 1 - cos(f_I(x), f_I(D(E(x)))) on B images with one caption each."""
        if self.world_size > 1:  # images rank, rank + world_size, ...
            idx = grpo.shard_rows(len(images), 1, self.rank, self.world_size).tolist()
            images, image_ids, seeds = [images[i] for i in idx], [image_ids[i] for i in idx], [seeds[i] for i in idx]
            caption_ids, caption_mask = caption_ids[idx], caption_mask[idx]
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
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "rewards": cos.detach().cpu().tolist(),
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


def make_clip_reward(recipe: Recipe, device: torch.device | str = "cpu", extra_backbones: dict | None = None):
    """The CLIP reward model named by the recipe (a tiny custom config on CPU; with
    `models.clip.random_init`, the named architecture from its config in code, random, at that depth)
    on `device`; `extra_backbones` as `ClipReward`'s (evaluation only: the reward is the first
    backbone's)."""
    from rewards.clip import RANDOM_INIT_CLIPS, ClipReward, tiny_clip_config

    c = recipe.models.clip
    if c.random_init is not None:
        model = RANDOM_INIT_CLIPS[c.model](**c.random_init)
    elif c.model == "tiny":
        model = tiny_clip_config(image_size=recipe.models.decoder.image_size)
    else:
        model = c.model
    reward = ClipReward(model, pretrained=c.pretrained, seed=recipe.seed + 4, device=device, checkpoint=c.checkpoint,
                        extra_backbones=extra_backbones)
    reward.model.requires_grad_(False)
    return reward


class LearnerWorker:
    """The learner as an actor. With `colocate`, it also hosts the rollout worker over the same
    modules, so a weight sync is only a version bump (no copy)."""

    def __init__(self, recipe: Recipe, colocate: bool = False, rank: int = 0, world_size: int = 1,
                 port: int | None = None, master_addr: str = "127.0.0.1"):
        from rl.checkpoint import seed_rng

        seed_rng(recipe.seed)  # python, numpy and torch: checkpointed RNG states then repeat across runs
        self.learner = Learner(recipe, rank=rank, world_size=world_size, port=port, master_addr=master_addr)
        self.rollout = None
        if colocate:
            from rollouts.actors import RolloutWorker

            self.rollout = RolloutWorker(recipe, models=self.learner.models)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def version(self) -> int:
        return self.learner.version

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.learner.trainable_state()

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.learner.load_state_dict(state)
        if self.rollout is not None:
            self.rollout.version = self.learner.version
        return self.learner.version

    def train(self, stage: str, *args: Any) -> dict[str, Any]:
        fn = {"cold_start": self.learner.train_cold_start, "encoder": self.learner.train_encoder,
              "decoder": self.learner.train_decoder}[stage]
        stats = fn(*args)
        if self.rollout is not None:
            self.rollout.version = self.learner.version
        return stats

    def rollout_call(self, method: str, *args: Any) -> Any:
        return getattr(self.rollout, method)(*args)
