"""The learner: one DeepSpeed engine over both policies and the connector.

Each stage trains one parameter group and leaves the others untouched (their learning rate is 0
and their gradients are never formed):

- `train_cold_start` (stage 1, UAE eq. 3): 1 - cos(f_I(x), f_I(x_rec)) through encoder LoRA,
  connector and decoder LoRA, with gradient through the last K denoising steps only.
- `train_encoder` (stage 2, UAE eq. 2): clipped GRPO on caption tokens, KL by estimator k1/k2/k3.
- `train_decoder` (stage 3, UAE eq. 4): the recipe's decoder objective (rl/objectives/: Flow-GRPO's
  clipped GRPO on SDE steps with a closed-form Gaussian KL, or DiffusionNFT).

The math is in `rl.grpo` and `rollouts.sde`; this file moves tensors and calls it. The reference
policy is the adapter disabled. On CPU DeepSpeed runs over gloo; the same code runs on CUDA/NCCL.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F

from rl import grpo
from rl.config import Recipe
from rl.ema import EMA
from rl.objectives import make_decoder_objective
from rl.models.unified import Models, build_models, resolve_device
from rollouts.captions import CaptionGroup, ImageFeatures, completion_logprobs, shard_group, vision_trainable
from rollouts.trajectories import Trajectory, denoise, initial_noise, shard_trajectory

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
    """Container so one DeepSpeed engine sees every trainable parameter (and, under ZeRO-3,
    partitions the frozen base weights of both policies too)."""

    def __init__(self, models: Models):
        super().__init__()
        self.encoder = models.encoder.model
        self.connector = models.connector
        self.decoder = models.decoder.transformer

    def forward(self, fn):
        """Run `fn()` (one micro-batch's loss) as the engine's forward, so that DeepSpeed's forward
        hooks run around it (ZeRO-3 counts micro-steps there to accumulate, not overwrite, the
        gradients of several backward passes)."""
        return fn()


def stage_groups(stage: str, models: Models) -> tuple[str, ...]:
    """The parameter groups a stage trains (every other group takes no optimizer step):
    cold start: encoder adapter (only when the decoder reads captions through it, reader `policy`),
    connector, decoder adapter, and the connector's learned layer weights until they freeze
    (GRAN-TED sec. 3.5); encoder GRPO: the encoder adapter; decoder GRPO: the decoder adapter; warm-up
    (UAE sec. 2.2, rl/warmup.py): the connector (and its learned layer weights until they freeze), plus
    the decoder adapter with `warmup.train_decoder_lora`."""
    if stage == "warmup":
        groups = ["connector"] + (["decoder"] if models_train_decoder(models) else [])
        if models.connector.layers == "learned" and not models.connector.frozen():
            groups.append("layer_weights")
        return tuple(groups)
    if stage == "encoder":
        return ("encoder",)
    if stage == "decoder":
        return ("decoder",)
    if stage != "cold_start":
        raise ValueError(f"unknown stage {stage!r}")
    groups = ["connector", "decoder"] + (["encoder"] if models.reader == "policy" else [])
    if models.connector.layers == "learned" and not models.connector.frozen():
        groups.append("layer_weights")
    return tuple(groups)


def models_train_decoder(models: Models) -> bool:
    return bool(getattr(models, "warmup_decoder_lora", False))


class Learner:
    """Owns the models' trainable state and the optimiser. Used inside `LearnerActor`.

    One DeepSpeed engine over both policies and the connector, at any ZeRO stage, with
    `managed_gradient_accumulation: false`: each stage runs forward/backward per micro-batch
    (`learner.micro_batch_size` rows; decoder GRPO per trained timestep too, Flow-GRPO's loop) and
    calls `engine.step()` once per batch. The optimizer (`rl.optim.GroupAdamW`) steps only the
    stage's groups.
    """

    def __init__(self, recipe: Recipe, models: Models | None = None, rank: int = 0, world_size: int = 1,
                 port: int | None = None, master_addr: str = "127.0.0.1"):
        import deepspeed

        from rl.adapters import named_adapter_parameters
        from rl.optim import GroupAdamW

        self.recipe = recipe
        self.device = resolve_device(recipe.device)
        self.rank, self.world_size = rank, world_size
        init_distributed(rank, world_size, port, master_addr)
        self.models = models or build_models(recipe, self.device)
        self.models.warmup_decoder_lora = recipe.warmup.train_decoder_lora  # read by stage_groups("warmup")
        self.version = 0  # bumped by every optimiser step; rollouts carry the version they used
        g = recipe.grpo
        # Every trainable tensor by its key in `trainable_state()`, with its group.
        named: dict[str, tuple[str, torch.nn.Parameter]] = {}
        for n, p in named_adapter_parameters(self.models.encoder.model):
            named[f"encoder.{n}"] = ("encoder", p)
        for n, p in named_adapter_parameters(self.models.decoder.transformer):
            named[f"decoder.{n}"] = ("decoder", p)
        connector_params = {id(p) for p in self.models.parameters("connector")}
        for n, p in self.models.connector.named_parameters():
            if id(p) in connector_params:
                named[f"connector.{n}"] = ("layer_weights" if n == "layer_logits" else "connector", p)
        self.named_params = named
        self.groups = [name for name in GROUPS + ("layer_weights",) if any(g_ == name for g_, _ in named.values())]
        self.base_lr = {"encoder": g.encoder.lr, "decoder": g.decoder.lr,
                        "connector": recipe.cold_start.connector_lr, "layer_weights": recipe.cold_start.connector_lr}
        decay = {"encoder": g.encoder.weight_decay, "decoder": g.decoder.weight_decay, "connector": g.decoder.weight_decay,
                 "layer_weights": g.decoder.weight_decay}
        param_groups = [
            {"params": [p for grp, p in named.values() if grp == name], "lr": self.base_lr[name], "name": name,
             # inactive until a stage switches it on: an optimizer wrapper's initial step (FP16_Optimizer
             # at ZeRO-0 in bf16 makes one with zero gradients) must not count or decay anything
             "weight_decay": decay[name], "active": False}
            for name in self.groups
        ]
        optimizer = GroupAdamW(param_groups, lr=g.encoder.lr)
        bucket = int(min(5e8, max(1e6, sum(p.numel() for _, p in named.values()))))
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # The learner owns the boundary: backward() per micro-batch accumulates, step() reduces
            # and updates once per batch, whatever the number of micro-batches of the stage.
            "managed_gradient_accumulation": False,
            "gradient_clipping": g.max_grad_norm,
            # Buckets no larger than the trainable parameters: DeepSpeed's default 5e8 elements would
            # allocate a 2 GB (fp32) gradient bucket per backward for a few tens of millions of LoRA
            # parameters (bench/memory.py, ZeRO-2).
            "zero_optimization": {"stage": recipe.learner.zero_stage, "reduce_bucket_size": bucket,
                                  "allgather_bucket_size": bucket},
            "zero_allow_untested_optimizer": True,  # GroupAdamW is torch's AdamW with a group switch
            "bf16": {"enabled": recipe.learner.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_Policies(self.models), optimizer=optimizer, config=ds_config)
        self.adamw: GroupAdamW = optimizer  # the torch optimizer inside DeepSpeed's wrapper (if any)
        if world_size == 1 and recipe.learner.zero_stage == 0:
            # One rank at ZeRO-0: DeepSpeed's data-parallel all-reduce (a walk over every parameter of
            # both policies, a gloo call, a division by 1) returns the gradients as they are. ZeRO 1-3
            # keep it: their reduction is also what moves the gradients into the optimizer's partitions.
            self.engine.enable_backward_allreduce = False
        zero3 = self.engine.optimizer
        if hasattr(zero3, "fp32_partitioned_groups_flat"):
            names = [group["name"] for group in optimizer.param_groups]
            optimizer.zero3_flat = lambda: [(names[zero3.sub_group_to_group_id[i]], flat)
                                            for i, flat in enumerate(zero3.fp32_partitioned_groups_flat)]
        self.adamw.init_state()
        # ZeRO-0 in bf16: DeepSpeed's FP16_UnfusedOptimizer keeps an fp32 master copy per parameter
        # (what AdamW steps), with no per-parameter accessors: map each parameter to its copy.
        self._fp32_copy: dict[int, torch.Tensor] = {}
        wrapper = self.engine.optimizer
        if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
            for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                self._fp32_copy.update({id(lo): hi for lo, hi in zip(lows, highs)})
        lazy = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if lazy is not None:  # ZeRO 1/2 and bf16: link the optimizer-state fragments now (see rl.optim)
            lazy()
        self.zero_stage = recipe.learner.zero_stage
        self._clip = None
        self._stage: str | None = None
        self._decoder_params: dict[str, torch.Tensor] | None = None  # _decoder_lora()
        # EMA of the decoder LoRA for evaluation and export only (rl/ema.py); training never reads it.
        decay_ema = g.decoder.ema_decay
        self._ema = EMA(self._gathered(self._decoder_lora()), decay_ema) if decay_ema is not None else None
        # The decoder stage's algorithm (grpo.decoder.algorithm): rl/objectives/.
        self.decoder_objective = make_decoder_objective(recipe)

    # ------------------------------------------------------------------------------------------
    # plumbing
    # ------------------------------------------------------------------------------------------
    def _set_stage(self, stage: str) -> None:
        """Switch the optimizer's groups and the parameters' requires_grad to `stage`'s groups
        (`stage_groups`); learning rates per group. Applied before every step: the learned layer
        weights may have frozen since the last one."""
        active = stage_groups(stage, self.models)
        for group in self.adamw.param_groups:
            name = group["name"]
            on = name in active
            group["active"] = on
            group["lr"] = self.recipe.cold_start.lr if stage == "cold_start" and name in ("encoder", "decoder") \
                else self.base_lr[name]
            if stage == "warmup":
                w = self.recipe.warmup
                group["lr"] = w.decoder_lr if name == "decoder" else w.connector_lr
        for grp, p in self.named_params.values():
            p.requires_grad_(grp in active)  # the model's parameters, not DeepSpeed's flat copies
        on = self.recipe.learner.activation_checkpointing or (
            stage == "cold_start" and self.recipe.cold_start.activation_checkpointing)
        self._set_checkpointing(on)
        self._stage = stage

    def _set_checkpointing(self, on: bool) -> None:
        """Activation checkpointing (learner.activation_checkpointing, or cold_start's) of the
        decoder's transformer blocks (diffusers checkpoints a block only while grad is enabled)
        and of the encoder's LM layers (HF, through peft; non-reentrant, so frozen inputs are fine)."""
        transformer, encoder = self.models.decoder.transformer, self.models.encoder.model
        if on == bool(getattr(transformer, "gradient_checkpointing", False)):
            return
        if on:
            transformer.enable_gradient_checkpointing()
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            transformer.disable_gradient_checkpointing()
            encoder.gradient_checkpointing_disable()

    @contextlib.contextmanager
    def _training(self):
        """HF layers checkpoint only in training mode; dropout is 0 here (AdapterConfig), so train()
        changes nothing numerically. Back to eval afterwards, so that a colocated rollout's
        generate() keeps its KV cache."""
        encoder = self.models.encoder.model
        if getattr(self.models.decoder.transformer, "gradient_checkpointing", False):
            encoder.train()
        try:
            yield
        finally:
            encoder.eval()

    def _forward_backward(self, loss_fn):
        """One micro-batch: `loss_fn()` -> (LossOutput, extra) runs as the engine's forward, then the
        backward of its loss (its share of the batch loss) accumulates into the batch's gradient."""
        box = {}

        def forward():
            box["out"], box["extra"] = loss_fn()
            return box["out"].loss

        loss = self.engine(forward)
        self.engine.backward(loss)
        return box["out"], box["extra"]

    def _optimizer_step(self) -> float:
        """One optimizer step over the accumulated gradient; returns the global gradient norm
        before clipping (DeepSpeed's own; at ZeRO-0 in fp32, where DeepSpeed keeps none, the norm of
        the real gradients, which are then the model's .grad).

        A non-finite loss, gradient or result raises FloatingPointError naming the stage, the
        weight version and the group. At ZeRO-0 in fp32 the gradient is checked before the step, so
        the weights and optimizer state stay as they were. Elsewhere DeepSpeed's norm is known only
        after its step (ZeRO 1-3 in fp32 skip a non-finite step themselves); the parameters are then
        checked after it, and the checkpoint writer refuses non-finite tensors besides."""
        norm = None
        if self.zero_stage == 0 and not self.recipe.learner.bf16:
            grads = [(grp, p.grad.detach().float().norm()) for grp, p in self.named_params.values() if p.grad is not None]
            if grads:
                self._refuse_nonfinite("gradient norm", grads, "before the optimizer step (nothing was applied)")
            norm = float(torch.linalg.vector_norm(torch.stack([g for _, g in grads]))) if grads else 0.0
        self.engine.step()
        if norm is None:
            ds = self.engine.get_global_grad_norm()
            norm = float(ds) if ds is not None else float("nan")
            # ZeRO-3: the local partition (ds_tensor); a NaN or inf element makes its sum non-finite
            sums = [(grp, getattr(p, "ds_tensor", p).detach().float().abs().sum()) for grp, p in self.named_params.values()]
            self._refuse_nonfinite("parameter", sums, "after the optimizer step")
            if ds is not None:
                self._refuse_nonfinite("global gradient norm", [("all groups", torch.tensor(norm))],
                                       "known only after DeepSpeed's step (which skips such a step at ZeRO 1-3 in fp32)")
        if self._stage in ("cold_start", "warmup"):
            self.models.connector.after_optimizer_step()
        self.version += 1
        moves_decoder = self._stage in ("decoder", "cold_start") or (
            self._stage == "warmup" and models_train_decoder(self.models))
        if self._ema is not None and moves_decoder:  # stages that move the decoder LoRA
            self._ema.update(self._gathered(self._decoder_lora()))
        return norm

    def _refuse_nonfinite(self, what: str, values: list[tuple[str, torch.Tensor]], when: str) -> None:
        """FloatingPointError naming the group of the first non-finite value in [(group, scalar)]
        (one device-to-host copy for all of them)."""
        finite = torch.isfinite(torch.stack([v.to(values[0][1].device) for _, v in values])).tolist()
        for (group, value), ok in zip(values, finite):
            if not ok:
                lr = {"cold_start": "cold_start.lr", "warmup": "warmup.connector_lr / warmup.decoder_lr"}.get(
                    self._stage, f"grpo.{self._stage}.lr")
                raise FloatingPointError(
                    f"non-finite {what} ({float(value)}) in parameter group {group!r} at the {self._stage} stage, "
                    f"weight version {self.version} -> {self.version + 1}, {when}. The loss or the weights "
                    f"diverged: lower {lr} or grpo.max_grad_norm, or check the rewards")

    def micro_batches(self, n: int) -> list[slice]:
        """Row slices of `learner.micro_batch_size` (all n rows at once when None)."""
        size = self.recipe.learner.micro_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # ------------------------------------------------------------------------------------------
    # state: parameters gathered from every ZeRO partition
    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _all_trainable(self):
        """DeepSpeed's full-state accessors (safe_get_full_*) skip parameters with requires_grad
        False at ZeRO-3: switch them all on for the call, then restore."""
        flags = {id(p): p.requires_grad for _, p in self.named_params.values()}
        for _, p in self.named_params.values():
            p.requires_grad_(True)
        try:
            yield
        finally:
            for _, p in self.named_params.values():
                p.requires_grad_(flags[id(p)])

    @contextlib.contextmanager
    def _full(self, params, modify: bool = False):
        """Inside: the full values of `params` even under ZeRO-3 (partitioned ones are gathered, and
        with `modify` written back from rank 0 on exit); a no-op at ZeRO 0-2."""
        params = [p for p in params if hasattr(p, "ds_id")]
        if not params:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def _gathered(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full values of (possibly ZeRO-3 partitioned) parameters, as CPU copies."""
        with self._full(tensors.values()):
            return {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Adapters and connector as one flat CPU state dict (full tensors at every ZeRO stage)."""
        with self._full(p for _, p in self.named_params.values()):
            return self.models.trainable_state()

    def _decoder_lora(self) -> dict[str, torch.Tensor]:
        """The live decoder LoRA tensors, keyed as in `trainable_state()` (`decoder.<name>`)."""
        if self._decoder_params is None:
            self._decoder_params = {k: p for k, (grp, p) in self.named_params.items() if grp == "decoder"}
        return self._decoder_params

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """EMA of the decoder LoRA weights (CPU, float32, keys as in `trainable_state()`), for
        evaluation renders and export; None when `grpo.decoder.ema_decay` is None."""
        return self._ema.state() if self._ema is not None else None

    def _master(self, p: torch.nn.Parameter, key: str | None = None) -> torch.Tensor:
        """The full fp32 master value of `p` (key None) or of its AdamW state `key`, whatever the
        ZeRO stage (DeepSpeed's universal accessors; at ZeRO-0 in fp32 the parameter is its own master)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            out = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
            return out.detach().float().reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape).cpu()
        return self._local_master(p, key).detach().float().cpu().clone()

    def _local_master(self, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
        """ZeRO-0: the view of p's fp32 master (or its AdamW state) in the optimizer's own tensors."""
        master = self._fp32_copy.get(id(p), p)
        return master if key is None else self.adamw.state[master][key]

    def _set_master(self, p: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            value = value.to(self.device, torch.float32)
            safe_set_full_fp32_param(p, value) if key is None else safe_set_full_optimizer_state(p, value, key)
        else:
            with torch.no_grad():
                self._local_master(p, key).copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs from the learner, as tensors and JSON values only
        (`rl.checkpoint` writes it without pickle): adapters + connector (with its `steps_done`);
        the optimizer as full, unpartitioned tensors per parameter (fp32 master weights, AdamW's
        exp_avg and exp_avg_sq) with each group's step count and lr, so that it loads at any ZeRO
        stage and any number of ranks; the weight version, DeepSpeed's counters, the active stage,
        the EMA and this process's RNG. A collective at ZeRO >= 1 with several ranks: every rank
        calls it."""
        from rl.checkpoint import capture_rng

        with self._all_trainable():
            optimizer = {
                "master": {k: self._master(p) for k, (_, p) in self.named_params.items()},
                "exp_avg": {k: self._master(p, "exp_avg") for k, (_, p) in self.named_params.items()},
                "exp_avg_sq": {k: self._master(p, "exp_avg_sq") for k, (_, p) in self.named_params.items()},
                "step": {name: self.adamw.get_step(name) for name in self.groups},
                "lr": {group["name"]: group["lr"] for group in self.adamw.param_groups},
            }
        ema = self._ema
        scheduler = self.engine.lr_scheduler
        return {
            "weights": self.trainable_state(),
            "optimizer": optimizer,
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "decoder_objective": self.decoder_objective.state_dict(),
            "version": self.version,
            "stage": self._stage,
            "engine": {"global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                       "skipped_steps": self.engine.skipped_steps},
            "rng": capture_rng(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`: afterwards the next step is bitwise the uninterrupted run's (one
        rank; within float tolerance across a change of ranks or ZeRO stage)."""
        from rl.checkpoint import CheckpointError, restore_rng

        opt = state["optimizer"]
        if not isinstance(opt, dict) or "master" not in opt:
            raise CheckpointError("this checkpoint's optimizer state is in the format of an older unified-grpo "
                                  "(torch state dict); resume it with that version, or start a new run")
        missing = sorted(set(self.named_params) - set(opt["master"]))
        if missing:
            raise CheckpointError(f"the checkpoint has no optimizer state for {missing[:3]} ({len(missing)} tensors)")
        self._load_weights(state["weights"])
        with self._all_trainable():
            for k, (_, p) in self.named_params.items():
                self._set_master(p, opt["master"][k])
                self._set_master(p, opt["exp_avg"][k], "exp_avg")
                self._set_master(p, opt["exp_avg_sq"][k], "exp_avg_sq")
        for name, value in opt["step"].items():
            self.adamw.set_step(name, value)
        if state["stage"] is not None:
            self._set_stage(state["stage"])  # requires_grad, active groups, checkpointing
        for group in self.adamw.param_groups:  # the saved lr values win
            group["lr"] = opt["lr"].get(group["name"], group["lr"])
        if state.get("lr_scheduler") is not None and self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        ema = self._ema
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        self.decoder_objective.load_state_dict(state.get("decoder_objective"))
        self.version = int(state["version"])
        for key, value in state["engine"].items():
            setattr(self.engine, key, value)
        restore_rng(state["rng"])

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """The model's (low-precision) copies of adapters and connector, gathered under ZeRO-3."""
        with self._full((p for _, p in self.named_params.values()), modify=True):
            self.models.load_trainable_state(weights)

    def grad_norms(self) -> dict[str, float]:
        """Per-group norms of the model parameters' .grad (tests use it to see where gradient went;
        meaningful at ZeRO-0, where .grad holds the gradient until the step)."""
        out = {name: 0.0 for name in self.groups}
        for grp, p in self.named_params.values():
            if p.grad is not None:
                out[grp] += float(p.grad.float().pow(2).sum())
        return {k: v ** 0.5 for k, v in out.items()}

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
        chunk = self.recipe.learner.logits_chunk
        model = self.models.encoder.model
        suppressed = self.models.encoder.suppressed_ids
        # TRL: every row stays in the loss mask (a zero-variance group's rows with advantage 0: their KL
        # applies, their tokens count in the denominators); drop_zero_variance drops them (DAPO).
        truncated = grpo.truncated_rows(group.completion_ids, group.completion_mask, self.models.encoder.eos_token_id)
        mask = grpo.caption_loss_mask(group.completion_mask, valid, truncated, drop_zero_variance=cfg.drop_zero_variance,
                                      mask_truncated=cfg.mask_truncated_completions)  # (N, T)
        # Per-token weights of the whole batch: the micro-batches' losses add up to its loss.
        w = grpo.aggregation_weights(mask, g.loss_agg, self.recipe.rollout.caption.max_new_tokens).to(self.device)
        w_tok = grpo.aggregation_weights(mask, "token_mean").to(self.device)
        adv = advantages.to(self.device)
        batches = self.micro_batches(adv.shape[0])
        stale = group.version != self.version
        # Another engine (vLLM) sampled the captions: its log-probs are not the learner's numerics, so
        # pi_old is the learner's own first pass even for a stale rollout, and each token's policy
        # loss is weighted by the truncated importance weight learner / engine (TRL's
        # vllm_importance_sampling_correction; decoupled PPO when stale). hf rollouts: no weights.
        correct = group.sampler != "hf" and cfg.vllm_importance_sampling_correction
        from_first_pass = correct or not stale
        if not from_first_pass and group.logprobs is None:
            raise RuntimeError(
                f"encoder rollout of weight version {group.version} reached the learner at version {self.version} "
                "without its log-probs: it skipped scoring its captions as on-policy (rollouts.actors."
                "rollouts_may_be_stale, resources.async_rollouts 0), so pi_old is lost; a stale rollout must be "
                "scored (RolloutWorker.score_captions)")
        # pi_old: the rollout's log-probs when the policy has moved since; otherwise the policy's own
        # log-probs of the first pass (ratio exactly 1 there, no extra forward; TRL's
        # per_token_logps.detach() when old_per_token_logps is None, so the rollout need not score).
        old_logp = torch.zeros_like(w) if from_first_pass else group.logprobs.to(self.device)
        rollout_logp = group.logprobs.to(self.device) if correct else None
        cmask = group.completion_mask.to(self.device)
        is_w: list[torch.Tensor | None] = [None] * len(batches)  # per micro-batch, (b, T) or (b, 1)
        ref_logp = torch.zeros_like(w) if cfg.beta > 0 else None
        # A frozen vision tower runs once per image for the whole update (reference pass, micro-batches,
        # iterations); a trainable one once per image per forward, with gradient (completion_logprobs).
        feats = None if vision_trainable(model) else ImageFeatures(model, group)
        top_q = cfg.top_entropy_quantile
        gather = grpo.gather_ragged if self.world_size > 1 else None  # the k-th micro-batch of every rank
        stats: dict[str, Any] = {}
        entropy_sum = 0.0
        with self._training():
            for it in range(g.num_iterations):
                acc = grpo.LossStats()
                for k, rows in enumerate(batches):
                    if ref_logp is not None and it == 0:
                        with torch.no_grad(), self.models.reference("encoder"):
                            ref_logp[rows] = completion_logprobs(model, group, temperature, suppressed, rows=rows,
                                                                 chunk=chunk, features=feats)[0]
                    def loss_fn(rows=rows, it=it, k=k):
                        logp, entropy = completion_logprobs(model, group, temperature, suppressed,
                                                            with_entropy=(it == 0 or top_q < 1.0), rows=rows,
                                                            chunk=chunk, features=feats)
                        # TRL: the quantile of this pass's entropies over the micro-batch's mask, every iteration
                        keep = grpo.high_entropy_mask(entropy, mask[rows].to(self.device), top_q, gather) \
                            if top_q < 1.0 else None
                        if it == 0 and from_first_pass:
                            old_logp[rows] = logp.detach()
                        if it == 0 and correct:  # fixed for the batch's iterations, as TRL's (once per rollout)
                            is_w[k] = grpo.rollout_is_weights(
                                old_logp[rows], rollout_logp[rows], cmask[rows], cfg.vllm_importance_sampling_mode,
                                cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max)
                        kl = grpo.kl_estimator(logp, ref_logp[rows], g.kl_estimator) if ref_logp is not None else None
                        out = grpo.micro_batch_loss(logp, old_logp[rows], adv[rows], w[rows], w_tok[rows], kl=kl,
                                                    beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                                    level=cfg.importance_sampling_level,
                                                    bias_correction_kl=cfg.bias_correction_kl(), is_weights=is_w[k],
                                                    entropy_mask=keep)
                        return out, entropy if it == 0 else None

                    out, entropy = self._forward_backward(loss_fn)
                    acc.add(out)
                    if entropy is not None:
                        entropy_sum += float((entropy * w_tok[rows]).sum())
                grad_norm = self._optimizer_step()
                if it == 0:
                    stats = dict(acc.summary(), grad_norm=grad_norm, entropy=entropy_sum)
        stats["version"] = self.version
        stats["stale_rollout"] = float(stale)
        stats["rows"] = int(adv.shape[0])  # rollouts this rank trained on
        stats["truncated_frac"] = float(truncated.float().mean()) if truncated.numel() else 0.0
        if correct:  # TRL's sampling/importance_sampling_ratio/{min,mean,max}: over captions or completion tokens
            rho = torch.cat(is_w)
            rho = rho.flatten() if rho.shape[1] == 1 else rho[cmask.bool()]
            stats.update(is_ratio_mean=float(rho.mean()) if rho.numel() else 1.0,
                         is_ratio_min=float(rho.min()) if rho.numel() else 1.0,
                         is_ratio_max=float(rho.max()) if rho.numel() else 1.0)
        return stats

    # ------------------------------------------------------------------------------------------
    # stage 3: decoder GRPO (UAE eq. 4 over SDE steps)
    # ------------------------------------------------------------------------------------------
    def train_decoder(self, traj: Trajectory, advantages: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        """One decoder update with the recipe's objective (`grpo.decoder.algorithm`, rl/objectives/):
        this rank's whole groups, then the objective's micro-batched forward/backward and optimizer
        step(s). Memory is bounded by `learner.micro_batch_size` rows, whatever the objective."""
        if self.world_size > 1:
            rows = grpo.shard_rows(traj.cond.shape[0], traj.group_size, self.rank, self.world_size)
            traj, advantages, valid = shard_trajectory(traj, self.rank, self.world_size), advantages[rows], valid[rows]
        self._set_stage("decoder")
        stale = traj.version != self.version
        stats = self.decoder_objective.train(self, traj, advantages, valid)
        stats["version"] = self.version
        stats["stale_rollout"] = float(stale)
        stats["rows"] = int(advantages.shape[0])  # rollouts this rank trained on
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
        """One joint step of 1 - cos(f_I(x), f_I(D(E(x)))) on B images with one caption each, in
        micro-batches of images (each backward carries its share (sum of 1 - cos) / B)."""
        if self.world_size > 1:  # images rank, rank + world_size, ...
            idx = grpo.shard_rows(len(images), 1, self.rank, self.world_size).tolist()
            images, image_ids, seeds = [images[i] for i in idx], [image_ids[i] for i in idx], [seeds[i] for i in idx]
            caption_ids, caption_mask = caption_ids[idx], caption_mask[idx]
        self._set_stage("cold_start")
        clip = self.clip()
        steps = self.recipe.rollout.trajectory.render_steps
        k = min(self.recipe.cold_start.grad_steps, steps)
        b = len(images)
        cos_all: list[float] = []
        total = 0.0
        with self._training():
            for rows in self.micro_batches(b):
                def loss_fn(rows=rows):
                    ids, m = caption_ids[rows].to(self.device), caption_mask[rows].to(self.device)
                    cond, mask, pooled = self.models.condition(ids, m)
                    noise = initial_noise(self.models.decoder, seeds[rows], self.device)
                    x0, _ = denoise(self.models.decoder, noise, cond, mask, pooled, steps, grad_last=k)
                    recon = self.models.decoder.decode(x0)  # (b, 3, H, W) in [0, 1], differentiable
                    rec_emb = F.normalize(clip.model.encode_image(clip_pixels(recon, clip.preprocess)).float(), dim=-1)
                    with torch.no_grad():
                        src_emb = clip.embed(images[rows])
                    cos = (rec_emb * src_emb.to(rec_emb.device)).sum(-1)  # (b,)
                    return grpo.LossOutput((1 - cos).sum() / b, {}), cos.detach()

                out, cos = self._forward_backward(loss_fn)
                total += float(out.loss.detach())
                cos_all += cos.cpu().tolist()
        grad_norm = self._optimizer_step()
        return {"loss": total, "grad_norm": grad_norm, "rewards": cos_all,
                "version": self.version, "layer_weights": self.models.connector.layer_weights().tolist()}


    # ------------------------------------------------------------------------------------------
    # warm-up: the connector (and decoder LoRA) learn long captions (UAE sec. 2.2, rl/warmup.py)
    # ------------------------------------------------------------------------------------------
    def train_warmup(self, images: list, captions: list[str], seeds: list[int]) -> dict[str, Any]:
        """One step of the flow-matching loss (rl.warmup.flow_matching_loss) on B images with their
        cached long captions, in micro-batches of images (each backward carries sum_i loss_i / B).
        The encoder reads the captions frozen; the VAE encodes the images without gradient."""
        from rl.warmup import caption_batch, flow_matching_loss, to_tensor, warmup_noise

        if self.world_size > 1:  # images rank, rank + world_size, ...
            idx = grpo.shard_rows(len(images), 1, self.rank, self.world_size).tolist()
            images, captions, seeds = [images[i] for i in idx], [captions[i] for i in idx], [seeds[i] for i in idx]
        self._set_stage("warmup")
        decoder, b = self.models.decoder, len(images)
        shift = self.recipe.models.decoder.shift
        caption_ids, caption_mask = caption_batch(self.models.encoder, captions, eos=False)  # (B, T)
        losses: list[float] = []
        total = 0.0
        with self._training():
            for rows in self.micro_batches(b):
                def loss_fn(rows=rows):
                    with torch.no_grad():
                        x = to_tensor(images[rows]).to(self.device, decoder.vae.dtype)
                        z0 = decoder.encode(x)  # (b, C, h, w)
                    u, eps = warmup_noise(seeds[rows], tuple(z0.shape[1:]))
                    ids, m = caption_ids[rows].to(self.device), caption_mask[rows].to(self.device)
                    cond, cmask, pooled = self.models.condition(ids, m)
                    per_row = flow_matching_loss(decoder, z0, cond, pooled, cmask, u.to(self.device),
                                                 eps.to(self.device, z0.dtype), shift)  # (b,)
                    return grpo.LossOutput(per_row.sum() / b, {}), per_row.detach()

                out, per_row = self._forward_backward(loss_fn)
                total += float(out.loss.detach())
                losses += per_row.float().cpu().tolist()
        grad_norm = self._optimizer_step()
        return {"loss": total, "grad_norm": grad_norm, "losses": losses, "version": self.version,
                "layer_weights": self.models.connector.layer_weights().tolist()}


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


def out_of_memory(stage: str, recipe: Recipe, where: str) -> RuntimeError:
    """The error for an out-of-memory in `stage`: which micro-batch field to lower."""
    if where == "learner":
        field, value = "learner.micro_batch_size", recipe.learner.micro_batch_size
        extra = "" if recipe.learner.activation_checkpointing else ", or set learner.activation_checkpointing: true"
        if stage == "encoder":
            extra += f", or learner.logits_chunk (now {recipe.learner.logits_chunk})"
    else:
        field, value = "rollout.micro_batch_size", recipe.rollout.micro_batch_size
        extra = ""
    return RuntimeError(f"out of memory in the {stage} stage ({where}) with {field} = {value} "
                        f"(None: the whole batch at once): lower {field}{extra}")


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

    def state_dict(self) -> dict[str, Any] | None:
        """The learner state (rank 0); other ranks take part in the gathers and return None."""
        state = self.learner.state_dict()
        return state if self.learner.rank == 0 else None

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.learner.load_state_dict(state)
        if self.rollout is not None:
            self.rollout.version = self.learner.version
        return self.learner.version

    def train(self, stage: str, *args: Any) -> dict[str, Any]:
        fn = {"warmup": self.learner.train_warmup, "cold_start": self.learner.train_cold_start,
              "encoder": self.learner.train_encoder,
              "decoder": self.learner.train_decoder}[stage]
        try:
            stats = fn(*args)
        except torch.OutOfMemoryError as err:
            raise out_of_memory(stage, self.learner.recipe, "learner") from err
        if self.rollout is not None:
            self.rollout.version = self.learner.version
        return stats

    def rollout_call(self, method: str, *args: Any) -> Any:
        return getattr(self.rollout, method)(*args)
