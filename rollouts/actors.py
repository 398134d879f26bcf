"""Rollout workers: thin owners of the models that turn images into rollout batches.

`RolloutWorker` is a plain class (testable without Ray); `RolloutActor` is the same class as a Ray
actor. A worker builds the models from the recipe with the same seed as the learner, then takes
the learner's adapters and connector through `set_weights(state, version)` after every update.
Every batch it returns carries the weight version it was made with.

Renders for rewards leave the worker as PIL images, rollout tensors as `CaptionGroup` /
`Trajectory` tuples: plain data, never live models.

With `rollout.micro_batch_size` set, nothing in a rollout runs on all rows at once: caption
generation and its log-probs, the captions' re-reading into decoder conditions, the SDE
trajectories, the ODE renders and the VAE decodes all take that many rows per model call.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from rl.config import Recipe
from rl.models.unified import Models, build_models, resolve_device
from rl.objectives import make_decoder_objective
from rollouts.captions import CaptionGroup, generate_captions
from rollouts.trajectories import Trajectory, Uncond, micro_batches, render, sample_trajectories


def image_seed(image_id: str) -> int:
    """A stable per-image seed: the frozen decoder renders every caption of one image from the
    same noise, so within a group the reward varies only with the caption (UAE stage 2)."""
    return zlib.crc32(image_id.encode()) & 0x7FFFFFFF


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> N RGB PIL images."""
    arr = (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def rollouts_may_be_stale(recipe: Recipe) -> bool:
    """Whether an encoder rollout may reach the learner after its weights have moved on, so that the
    learner needs the rollout's own log-probs as pi_old (and the rollout must score its captions).

    With `resources.async_rollouts` 0 every rollout is launched after the previous update's weight
    sync (a restarted rollout actor is re-synced before it is used) and trained on before the next,
    so its version is the learner's: the learner's first pass of the update (all micro-batches of
    iteration 0, before any optimizer step, for any `grpo.num_iterations`) is pi_old, exactly the
    rollout's weights. TRL's GRPOTrainer skips old_per_token_logps in the same case; it computes them
    with num_iterations > 1 or steps_per_generation > gradient_accumulation_steps because its later
    micro-batches run after optimizer steps, which ours never do. With async rollouts 1 a rollout is
    made with the weights of step t and trained at t + 1: it scores. The vLLM backend always returns
    its engine's log-probs (no extra forward), which the learner needs for the IS correction."""
    return recipe.resources.async_rollouts > 0


def _oom_names(stage: str):
    """Turn an out-of-memory error of a rollout method into one that names the stage and the field
    to lower (rollout.micro_batch_size)."""
    import functools

    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except torch.OutOfMemoryError as err:
                from rl.learner import out_of_memory

                raise out_of_memory(stage, self.recipe, "rollout") from err
        return call
    return wrap


class RolloutWorker:
    """Generates caption groups, renders and SDE trajectories with the current weights."""

    def __init__(self, recipe: Recipe, models: Models | None = None):
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.recipe = recipe
        self.models = models or build_models(recipe, resolve_device(recipe.device))
        self.version = 0
        # score encoder rollouts' captions (pi_old) only when the learner may need them
        self.score_captions = rollouts_may_be_stale(recipe)
        self.vllm = None
        if recipe.rollout.caption.backend == "vllm":  # recipe validation made sure vLLM and a GPU exist
            self._start_vllm()
        elif recipe.rollout.caption.backend == "vllm_server":  # a separate server (TRL vllm_mode "server")
            from rollouts.vllm_server import VLLMServerCaptioner

            self.vllm = VLLMServerCaptioner(recipe.rollout.caption, device=self.models.device)
            self.vllm.push_weights(self.models.encoder.model, self.version)  # the server may hold another run's LoRA

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Load the learner's adapters + connector (LoRA weights only, never the base model)."""
        self.models.load_trainable_state(state)
        self.version = version
        if self.vllm is not None and self.recipe.rollout.caption.backend == "vllm_server":
            self.vllm.push_weights(self.models.encoder.model, version)  # merged LoRA modules over NCCL
        elif self.vllm is not None:  # the engine takes the encoder LoRA as a LoRA request
            path = os.path.join(self._vllm_dir, f"lora-v{version}")
            self.models.encoder.model.save_pretrained(path)
            self.vllm.load_lora(path, version)
        return version

    def _start_vllm(self) -> None:
        """A vLLM engine over the encoder's base weights (saved to a folder when built from code)."""
        import tempfile

        from rollouts.captions import VLLMCaptioner

        self._vllm_dir = tempfile.mkdtemp(prefix="unified-grpo-vllm-")
        enc = self.recipe.models.encoder
        base = enc.path or enc.name
        if enc.name == "tiny":
            base = os.path.join(self._vllm_dir, "base")
            import copy

            # the tiny base without its LoRA layers (unload removes them, merging nothing)
            copy.deepcopy(self.models.encoder.model).unload().save_pretrained(base)
            self.models.encoder.processor.save_pretrained(base)
        self.vllm = VLLMCaptioner(base, max_lora_rank=max(8, enc.adapter.r))

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.models.trainable_state()

    # ------------------------------------------------------------------------------------------
    def captions(self, images: Sequence[Image.Image], group_size: int, seed: int, greedy: bool = False,
                 score: bool = True) -> CaptionGroup:
        """G captions per image; `score` false leaves out the hf backend's scoring forward (logprobs
        None), for callers that never read the log-probs or whose learner recomputes pi_old."""
        c = self.recipe.rollout.caption
        if self.vllm is not None and not greedy:
            return self.vllm.caption_group(self.models.encoder, images, group_size, max_new_tokens=c.max_new_tokens,
                                           temperature=c.temperature, top_p=c.top_p, seed=seed, version=self.version)
        return generate_captions(self.models.encoder, images, group_size, max_new_tokens=c.max_new_tokens,
                                 temperature=c.temperature, top_p=c.top_p, seed=seed, version=self.version,
                                 greedy=greedy, micro_batch_size=self.recipe.rollout.micro_batch_size,
                                 logits_chunk=self.recipe.learner.logits_chunk, top_k=c.top_k, min_p=c.min_p,
                                 repetition_penalty=c.repetition_penalty, score=score, loop=c.generate_loop)

    @torch.no_grad()
    def _condition(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`Models.condition` (cond (N, L, D), mask (N, L), pooled (N, P)) on the device, computed
        `rollout.micro_batch_size` captions at a time (L is the fixed conditioning length, so the pieces
        concatenate)."""
        dev = self.models.device
        parts = [self.models.condition(caption_ids[rows].to(dev), caption_mask[rows].to(dev))
                 for rows in micro_batches(caption_ids.shape[0], self.recipe.rollout.micro_batch_size)]
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    @torch.no_grad()
    def render_captions(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor, seeds: list[int],
                        num_steps: int | None = None) -> list[Image.Image]:
        """Deterministic ODE renders of captions by the (frozen) decoder, one seed per row.
        Condition, render and decode run one micro-batch of rows at a time, to PIL before the next."""
        t, mb, dev = self.recipe.rollout.trajectory, self.recipe.rollout.micro_batch_size, self.models.device
        steps = num_steps or t.render_steps
        uncond = self.uncond()
        images: list[Image.Image] = []
        for rows in micro_batches(caption_ids.shape[0], mb):
            cond, mask, pooled = self.models.condition(caption_ids[rows].to(dev), caption_mask[rows].to(dev))
            images += to_pil(render(self.models.decoder, cond, mask, pooled, steps, seeds[rows], uncond=uncond,
                                    cfg_scale=t.cfg_scale, micro_batch_size=mb))
        return images

    @torch.no_grad()
    def uncond(self) -> Uncond | None:
        """The CFG unconditional condition: the connector's output for an empty caption, under the
        current encoder and connector weights (cheap: one token). None when guidance is off."""
        if self.recipe.rollout.trajectory.cfg_scale == 1.0:
            return None
        empty = torch.zeros((1, 0), dtype=torch.long, device=self.models.device)
        return Uncond(*self.models.condition(empty, empty))

    @torch.no_grad()
    def eval_render(self, images: Sequence[Image.Image], image_ids: Sequence[str], seed: int,
                    weights: dict[str, torch.Tensor] | None = None) -> tuple[list[str], list[Image.Image]]:
        """Evaluation: one greedy caption per image, rendered by the ODE with `eval_steps` (more steps
        than training) from the image's fixed noise. `weights` (e.g. `Learner.ema_state()`) are
        swapped in for the call only; None evaluates the live weights."""
        from rl.ema import weights_swapped

        with weights_swapped(self.models, weights):
            group = self.captions(images, 1, seed, greedy=True, score=False)
            renders = self.render_captions(group.completion_ids, group.completion_mask,
                                           [image_seed(i) for i in image_ids],
                                           num_steps=self.recipe.rollout.trajectory.eval_steps)
        return group.captions, renders

    def eval_render_texts(self, texts: Sequence[str], image_ids: Sequence[str],
                          weights: dict[str, torch.Tensor] | None = None) -> list[Image.Image]:
        """Evaluation renders of given captions (e.g. a data set's true ones), as eval_render renders
        the encoder's: ODE at eval_steps from each image's fixed noise, read by the connector as a
        sampled caption is (rl.warmup.caption_batch)."""
        from rl.ema import weights_swapped
        from rl.warmup import caption_batch

        with weights_swapped(self.models, weights):
            ids, mask = caption_batch(self.models.encoder, texts)
            return self.render_captions(ids, mask, [image_seed(i) for i in image_ids],
                                        num_steps=self.recipe.rollout.trajectory.eval_steps)

    @_oom_names("encoder")
    def encoder_rollout(self, images: Sequence[Image.Image], image_ids: Sequence[str], seed: int,
                        render: bool = True) -> tuple[CaptionGroup, list[Image.Image] | None]:
        """Stage 2: G captions per image, each rendered from its image's fixed noise (unless no
        reward needs renders)."""
        g = self.recipe.rollout.group_size
        group = self.captions(images, g, seed, score=self.score_captions)
        if not render:
            return group, None
        seeds = [image_seed(i) for i in image_ids for _ in range(g)]
        return group, self.render_captions(group.completion_ids, group.completion_mask, seeds)

    @_oom_names("decoder")
    @torch.no_grad()
    def decoder_rollout(self, images: Sequence[Image.Image], seed: int
                        ) -> tuple[Trajectory, list[str], list[Image.Image]]:
        """Stage 3: one greedy caption per image from the frozen encoder, G SDE trajectories each (G
        ODE samples from independent noise for DiffusionNFT, `grpo.decoder.nft.rollout: ode`)."""
        t = self.recipe.rollout.trajectory
        group = self.captions(images, 1, seed, greedy=True, score=False)
        cond, mask, pooled = self._condition(group.completion_ids, group.completion_mask)  # B rows
        traj = sample_trajectories(
            self.models.decoder, cond, mask, pooled, self.recipe.rollout.group_size, num_steps=t.num_steps,
            noise_level=t.noise_level, seed=seed, sde_window=t.sde_window, window_range=t.window_range,
            timestep_fraction=t.timestep_fraction, step_selection=t.step_selection, version=self.version, uncond=self.uncond(),
            cfg_scale=t.cfg_scale, cfg_in_training=t.cfg_in_training,
            micro_batch_size=self.recipe.rollout.micro_batch_size,
            **make_decoder_objective(self.recipe).rollout_options(),  # e.g. DiffusionNFT's ODE samples
        )
        # The renders go out as PIL images; the tensor copy would only travel along unread.
        return traj._replace(images=None), group.captions, to_pil(traj.images)

    @_oom_names("warmup")
    @torch.no_grad()
    def warmup_captions(self, images: Sequence[Image.Image], seed: int) -> list[str]:
        """The warm-up stage's long captions (UAE sec. 2.2, rl/warmup.py): one greedy caption per image
        from the frozen encoder (adapter off) under UAE's prompt, at most warmup.max_new_tokens tokens,
        `rollout.micro_batch_size` rows per generate call (always transformers' generate)."""
        from rl import adapters
        from rl.warmup import warmup_tokens

        with adapters.disabled(self.models.encoder.model):
            group = generate_captions(self.models.encoder, images, 1, max_new_tokens=warmup_tokens(self.recipe),
                                      seed=seed, version=self.version, greedy=True,
                                      micro_batch_size=self.recipe.rollout.micro_batch_size,
                                      logits_chunk=self.recipe.learner.logits_chunk,
                                      loop=self.recipe.rollout.caption.generate_loop)
        return list(group.captions)

    @_oom_names("cold_start")
    def cold_start_rollout(self, images: Sequence[Image.Image], seed: int) -> CaptionGroup:
        """Stage 1: one sampled caption per image (no gradient; the learner re-reads it)."""
        return self.captions(images, 1, seed, score=False)


def remote_rollout_actor(recipe: Recipe, num_cpus: float = 1.0, num_gpus: float = 0.0,
                         max_restarts: int = 0, **options: Any):
    """A `RolloutWorker` as a Ray actor."""
    import ray

    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts)(RolloutWorker)
    return cls.options(**options).remote(recipe) if options else cls.remote(recipe)
