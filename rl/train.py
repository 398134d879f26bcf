"""Unified-GRPO training driver (single controller).

    python -m rl.train recipes/tiny.yaml                       # embedded default: tiny models, local Ray, CPU
    python -m rl.train recipes/tiny.yaml --max-steps 3 --set rollout.group_size=2
    ray job submit --working-dir . -- python -m rl.train recipes/unified_grpo.yaml

The driver owns the schedule, the step counter, logging and checkpoints; Ray actors own the
models (rollout workers, reward workers, the DeepSpeed learner). One step of each stage:

    cold_start  captions (no grad) -> learner: 1 - cos(f_I(x), f_I(D(E(x))))          UAE eq. 3
    encoder     G captions/image -> frozen-decoder renders -> CLIP reward -> GRPO     UAE eq. 2
    decoder     1 caption/image -> G SDE trajectories -> CLIP reward -> GRPO per step UAE eq. 4

after which the learner's LoRA weights (and connector) go to the rollout workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rl import grpo
from rl.config import Recipe, RecipeError, load_recipe

log = logging.getLogger("unified_grpo")


class Trainer:
    """setup() -> train() -> save_checkpoint() -> cleanup(), torchtune's recipe shape."""

    def __init__(self, recipe: Recipe, recipe_dir: str | None = None):
        self.recipe = recipe
        self.recipe_dir = recipe_dir
        self.out_dir = recipe.output.dir
        self.step = 0
        self.stages = recipe.stages()
        self.version = 0

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self._setup_data()
        self._setup_ray()
        self._setup_actors()
        self._setup_logging()

    def _setup_data(self) -> None:
        from rl.data import load_dataset_from_config

        d = self.recipe.data
        self.dataset = load_dataset_from_config(
            d.source, image_column=d.image_column, split=d.split, limit=d.limit,
            image_size=self.recipe.models.decoder.image_size, generate=d.generate.model_dump(),
        )
        log.info("data: %d images from %s", len(self.dataset), d.source or "the generated shapes world")

    def _setup_ray(self) -> None:
        import ray

        r = self.recipe.ray
        address = r.address
        if address == "local" and os.environ.get("RAY_ADDRESS"):
            address = "auto"  # launched by `ray job submit`: join that cluster
        if ray.is_initialized():
            return
        env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
        if address == "local":
            ray.init(num_cpus=r.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     runtime_env=env, logging_level=logging.WARNING, log_to_driver=True)
        else:
            ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)

    def _setup_actors(self) -> None:
        import ray

        from rewards.actors import RewardWorker
        from rl.learner import LearnerWorker
        from rollouts.actors import RolloutWorker

        r = self.recipe.ray
        opts = {"num_cpus": r.cpus_per_actor, "num_gpus": r.gpus_per_actor}
        self.learner = ray.remote(**opts)(LearnerWorker).remote(self.recipe, r.colocate)
        self.rollouts = [] if r.colocate else [
            ray.remote(**opts)(RolloutWorker).remote(self.recipe) for _ in range(r.rollout_workers)
        ]
        self.rewards = [
            ray.remote(num_cpus=r.cpus_per_actor)(RewardWorker).remote(self.recipe, self.recipe_dir)
            for _ in range(r.reward_workers)
        ]
        ray.get([a.ready.remote() for a in [self.learner, *self.rollouts, *self.rewards]])
        self._sync_weights()  # identical adapters everywhere before the first rollout

    def _setup_logging(self) -> None:
        from rl.metrics import MetricsLogger

        self.metrics = MetricsLogger(self.out_dir, tensorboard=self.recipe.output.tensorboard)

    # ------------------------------------------------------------------------------------------
    # plumbing
    # ------------------------------------------------------------------------------------------
    def _rollout(self, method: str, *args: Any):
        """An ObjectRef of a rollout worker's method (round-robin), or the learner's when colocated."""
        if not self.rollouts:
            return self.learner.rollout_call.remote(method, *args)
        actor = self.rollouts[self.step % len(self.rollouts)]
        return getattr(actor, method).remote(*args)

    def _score(self, prompts, completions, **kwargs):
        actor = self.rewards[self.step % len(self.rewards)]
        return actor.score.remote(prompts, completions, step=self.step, **kwargs)

    def _sync_weights(self) -> None:
        """LoRA weights (and connector) from the learner to every rollout worker, once via the store."""
        import ray

        self.version = ray.get(self.learner.version.remote())
        if self.rollouts:
            state = self.learner.trainable_state.remote()
            ray.get([a.set_weights.remote(state, self.version) for a in self.rollouts])

    def _advantages(self, batch) -> grpo.Advantages:
        g = self.recipe.grpo
        return grpo.combine_rewards(batch.matrix, batch.weights, self.recipe.rollout.group_size,
                                    mode=g.reward_combine, scale=g.scale, clip=g.adv_clip)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=len(self.stages), initial=self.step, disable=not self.recipe.output.progress,
                   dynamic_ncols=True, file=sys.stderr)
        batches = self.dataset.batches(self.recipe.rollout.batch_size, self.recipe.seed, start=self.step * self.recipe.rollout.batch_size)
        while self.step < len(self.stages):
            stage = self.stages[self.step]
            records = next(batches)
            t0 = time.time()
            row = {"cold_start": self._cold_start_step, "encoder": self._encoder_step,
                   "decoder": self._decoder_step}[stage](records)
            self._sync_weights()
            row = {"step": self.step, "stage": stage, **row, "seconds": round(time.time() - t0, 4)}
            self.metrics.log(row)
            self.step += 1
            bar.set_description(f"{stage:10s}")
            bar.set_postfix(reward=f"{row['reward_mean']:.4f}", loss=f"{row['loss']:.4f}", s=f"{row['seconds']:.1f}")
            bar.update(1)
            if self.recipe.output.save_every and self.step % self.recipe.output.save_every == 0:
                self.save_checkpoint()
        bar.close()

    def _seed(self) -> int:
        return self.recipe.seed * 1_000_003 + self.step

    def _cold_start_step(self, records) -> dict[str, Any]:
        """Stage 1 (UAE eq. 3): joint reconstruction loss, no RL."""
        import ray

        from rollouts.actors import image_seed

        images, ids = [r.image for r in records], [r.image_id for r in records]
        # step 1. one caption per image from the current encoder (no gradient)
        group = ray.get(self._rollout("cold_start_rollout", images, self._seed()))
        # step 2. learner re-reads the caption with gradient, renders, and descends 1 - cos
        stats = ray.get(self.learner.train.remote("cold_start", images, ids, group.completion_ids,
                                                  group.completion_mask, [image_seed(i) for i in ids]))
        rewards = torch.tensor(stats["rewards"])
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                "loss": stats["loss"], "kl": 0.0, **_caption_stats(group.captions), "grad_norm": stats["grad_norm"],
                "version": stats["version"], "layer_weights": stats["layer_weights"], "captions": group.captions[:2]}

    def _encoder_step(self, records) -> dict[str, Any]:
        """Stage 2 (UAE sec. 2.3): the encoder is the policy; the decoder and CLIP are the environment."""
        import ray

        images, ids = [r.image for r in records], [r.image_id for r in records]
        g = self.recipe.rollout.group_size
        # step 1. G captions per image, each rendered by the frozen decoder from its image's noise
        group, renders = ray.get(self._rollout("encoder_rollout", images, ids, self._seed()))
        # step 2. rewards on every (source, render) pair
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731 - align per-image data to N rows
        batch = ray.get(self._score(
            rep(ids), group.captions, images=rep(images), renders=renders, image_ids=rep(ids),
            elements=rep([r.elements for r in records]), group_ids=rep(range(len(records)))))
        # step 3. group-relative advantages (UAE eq. 1)
        adv = self._advantages(batch)
        # step 4. clipped GRPO update of the encoder LoRA (UAE eq. 2)
        stats = ray.get(self.learner.train.remote("encoder", group, adv.advantages, adv.valid))
        return _row(batch, adv, stats, group.captions)

    def _decoder_step(self, records) -> dict[str, Any]:
        """Stage 3 (UAE eq. 4): the decoder is the policy; captions come from the frozen encoder."""
        import ray

        images, ids = [r.image for r in records], [r.image_id for r in records]
        g = self.recipe.rollout.group_size
        # step 1. one caption per image, G SDE trajectories from shared noise
        traj, captions, renders = ray.get(self._rollout("decoder_rollout", images, self._seed()))
        rep = lambda xs: [x for x in xs for _ in range(g)]  # noqa: E731
        # step 2. rewards
        batch = ray.get(self._score(
            rep(ids), rep(captions), images=rep(images), renders=renders, image_ids=rep(ids),
            elements=rep([r.elements for r in records]), group_ids=rep(range(len(records)))))
        # step 3. advantages; step 4. per-step clipped GRPO update of the decoder LoRA
        adv = self._advantages(batch)
        stats = ray.get(self.learner.train.remote("decoder", traj, adv.advantages, adv.valid))
        return _row(batch, adv, stats, captions)

    # ------------------------------------------------------------------------------------------
    # save / cleanup
    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        import ray

        from rl.checkpoint import save_checkpoint

        state = ray.get(self.learner.trainable_state.remote())
        meta = {"step": self.step, "stage": self.stages[self.step - 1] if self.step else None,
                "version": self.version, "total_steps": len(self.stages)}
        path = save_checkpoint(os.path.join(self.out_dir, "checkpoints"), self.step, state, meta,
                               self.recipe.model_dump(mode="json"), keep_last=self.recipe.output.keep_last)
        log.info("checkpoint: %s", path)
        return path

    def cleanup(self) -> None:
        import ray

        self.metrics.close()
        if self.recipe.output.plot:
            from rl.metrics import plot_metrics, read_metrics

            plot_metrics(read_metrics(self.metrics.path), os.path.join(self.out_dir, "reward.png"))
        if ray.is_initialized():
            ray.shutdown()


def _caption_stats(captions: list[str]) -> dict[str, float]:
    lengths = [len(c.split()) for c in captions] or [0]
    return {"caption_len_mean": sum(lengths) / len(lengths), "caption_len_min": min(lengths),
            "caption_len_max": max(lengths)}


def _row(batch, adv: grpo.Advantages, stats: dict[str, Any], captions: list[str]) -> dict[str, Any]:
    """One metrics row from a reward batch, its advantages and the learner's statistics."""
    weights = torch.tensor(batch.weights).unsqueeze(1)
    present = ~torch.isnan(batch.matrix)
    total = (torch.nan_to_num(batch.matrix) * weights).sum(0)[present.any(0)]  # weighted reward per row
    row = {
        "reward_mean": float(total.mean()) if len(total) else float("nan"),
        "reward_std": float(total.std()) if len(total) > 1 else 0.0,
        "loss": stats["loss"], "kl": stats.get("kl", 0.0), "clip_frac": stats.get("clip_frac", 0.0),
        "ratio_mean": stats.get("ratio_mean", 1.0), "entropy": stats.get("entropy", 0.0),
        "zero_var_frac": adv.zero_var_frac, "grad_norm": stats.get("grad_norm", 0.0),
        "version": stats.get("version"), **_caption_stats(captions), "captions": captions[:2],
    }
    for name, mean in batch.means.items():
        row[f"reward/{name}"] = mean
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    parser.add_argument("--output-dir", help="override output.dir")
    parser.add_argument("--max-steps", type=int, help="stop after N steps in all")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe field, e.g. --set rollout.group_size=4 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        recipe = load_recipe(args.recipe, args.set, output_dir=args.output_dir, max_steps=args.max_steps)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(recipe, recipe_dir=str(Path(args.recipe).resolve().parent))
    t0 = time.time()
    try:
        trainer.setup()
        trainer.train()
        path = trainer.save_checkpoint()
    finally:
        if hasattr(trainer, "metrics"):
            trainer.cleanup()
    print(f"done: {trainer.step} steps in {time.time() - t0:.0f} s; metrics {trainer.metrics.path}; checkpoint {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
