"""Unified-GRPO training driver (single controller).

    python -m rl.train recipes/tiny.yaml                       # embedded default: tiny models, local Ray, CPU
    python -m rl.train recipes/tiny.yaml --max-steps 3 --set rollout.group_size=2
    python -m rl.train recipes/tiny.yaml --resume               # continue from runs/tiny/checkpoints/
    python -m rl.export runs/tiny/checkpoints/step-000019 exported/   # peft + diffusers folders
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
from rl.checkpoint import CheckpointError
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
        self.data_position = 0  # records consumed so far (rl.data.BatchIterator.position)
        self.last_metrics: dict[str, dict[str, Any]] = {}  # newest numeric row per stage, for model cards
        self.checkpoint_root = os.path.join(self.out_dir, "checkpoints")
        self.checkpoint_path: str | None = None  # the newest checkpoint this run wrote or resumed
        self._saved_step: int | None = None
        self._resume_from = None

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from rl.checkpoint import seed_rng

        seed_rng(self.recipe.seed)  # a resume restores the driver's RNG over this
        os.makedirs(self.out_dir, exist_ok=True)
        self._resume_from = self._find_checkpoint()  # before Ray: a refused resume fails at once
        self._setup_data()
        self._setup_ray()
        self._setup_actors()
        if self._resume_from is not None:
            self._load_checkpoint(self._resume_from)
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
            # Under `ray job submit` the job's runtime_env (working_dir, env_vars) already applies;
            # passing another one here would conflict with it.
            ray.init(address=address, logging_level=logging.WARNING)

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
        if self._resume_from is not None and self.metrics.writer is not None:
            # What SummaryWriter(purge_step=step) writes: TensorBoard drops the killed run's events
            # at steps >= this one, so the curves match metrics.jsonl.
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self.metrics.writer._get_file_writer().add_event(
                Event(step=self.step, session_log=SessionLog(status=SessionLog.START)))

    def _find_checkpoint(self):
        """The checkpoint to resume from (`output.resume: auto`), read and checked, or None."""
        from rl import checkpoint as ckpt

        if self.recipe.output.resume != "auto":
            if ckpt.list_checkpoints(self.checkpoint_root):
                log.warning("%s holds checkpoints of an earlier run; starting at step 0 (resume: never). "
                            "Pass --resume to continue from the newest.", self.checkpoint_root)
            return None
        path, skipped = ckpt.find_latest(self.checkpoint_root)
        for bad, reason in skipped:
            log.warning("resume: ignoring incomplete checkpoint %s: %s", bad, reason)
        if path is None:
            log.info("resume: no complete checkpoint in %s; starting at step 0", self.checkpoint_root)
            return None
        c = ckpt.load_checkpoint(path, verify=False)  # find_latest just verified it
        current = self.recipe.model_dump(mode="json")
        try:  # through today's schema, so that fields added since (with defaults) compare equal
            saved = Recipe.model_validate(c.recipe).model_dump(mode="json")
        except ValueError:
            saved = c.recipe
        ckpt.check_models_match(saved, current, path)
        other = [d for d in ckpt.recipe_differences(saved, current)
                 if not d.startswith(("models", "output", "max_steps"))]
        if other:
            log.warning("resume: the recipe differs from the checkpoint's in %s", ", ".join(other))
        now = ckpt.schedule_position(self._full_schedule(), c.step)
        if now != c.trainer.get("schedule"):
            log.warning("resume: the schedule changed: step %d was %s in the checkpoint's run, is %s now",
                        c.step, c.trainer.get("schedule"), now)
        return c

    def _full_schedule(self) -> list[str]:
        """Every step's stage, max_steps aside: a run stopped by --max-steps and resumed with a
        larger one is at the same place in it."""
        return self.recipe.model_copy(update={"max_steps": None}).stages()

    def _load_checkpoint(self, c) -> None:
        """Learner state, then weights to the rollout workers, then the driver's own state."""
        import ray

        from rl.checkpoint import restore_rng

        t0 = time.time()
        ray.get(self.learner.load_state_dict.remote({"weights": c.weights, **c.state["learner"]}))
        self._sync_weights()  # rollout workers must act with the restored adapters
        self.step = c.step
        self.data_position = int(c.trainer["data_position"])
        self.last_metrics = c.trainer.get("metrics", {})
        self.checkpoint_path, self._saved_step = c.path, c.step
        dropped = _truncate_metrics(os.path.join(self.out_dir, "metrics.jsonl"), c.step)
        restore_rng(c.state["driver"]["rng"])
        log.info("resumed from %s at step %d (%s); dropped %d metrics rows of later steps; %.1f s",
                 c.path, c.step, c.trainer["schedule"], dropped, time.time() - t0)

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
        batches = self.dataset.batches(self.recipe.rollout.batch_size, self.recipe.seed, start=self.data_position)
        while self.step < len(self.stages):
            stage = self.stages[self.step]
            records = next(batches)
            self.data_position = batches.position
            t0 = time.time()
            row = {"cold_start": self._cold_start_step, "encoder": self._encoder_step,
                   "decoder": self._decoder_step}[stage](records)
            self._sync_weights()
            row = {"step": self.step, "stage": stage, **row, "seconds": round(time.time() - t0, 4)}
            self.metrics.log(row)
            self.last_metrics[stage] = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "seconds"}
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
        group, renders = ray.get(self._rollout("encoder_rollout", images, ids, self._seed(),
                                               self.recipe.rewards.renders_needed()))
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
        """Everything a resume needs (rl/checkpoint.py), once per step."""
        import ray

        from rl.checkpoint import capture_rng, save_checkpoint, schedule_position

        if self._saved_step == self.step and self.checkpoint_path:
            return self.checkpoint_path  # nothing trained since
        learner = ray.get(self.learner.state_dict.remote())
        weights = learner.pop("weights")
        trainer = {
            "step": self.step, "stage": self.stages[self.step - 1] if self.step else None,
            "schedule": schedule_position(self._full_schedule(), self.step), "data_position": self.data_position,
            "version": self.version, "total_steps": len(self.stages), "metrics": self.last_metrics,
        }
        path = save_checkpoint(self.checkpoint_root, self.step, weights,
                               {"learner": learner, "driver": {"rng": capture_rng()}}, trainer,
                               self.recipe.model_dump(mode="json"), keep_last=self.recipe.output.keep_last)
        self.checkpoint_path, self._saved_step = path, self.step
        log.info("checkpoint: %s", path)
        return path

    def cleanup(self) -> None:
        import ray

        self.metrics.close()
        if self.recipe.output.plot:
            from rl.metrics import plot_metrics, read_metrics

            plot_metrics(read_metrics(self.metrics.path), os.path.join(self.out_dir, "reward.png"))
            if self.recipe.models.connector.layers == "learned":
                from rl.metrics import plot_layer_weights

                plot_layer_weights(read_metrics(self.metrics.path), os.path.join(self.out_dir, "layer_weights.png"))
        if ray.is_initialized():
            ray.shutdown()


def _truncate_metrics(path: str, step: int) -> int:
    """Drop rows of steps >= `step` (a killed run's steps after its checkpoint, about to be run
    again) and a line cut short by the kill, so that every step appears once; returns how many
    lines were dropped."""
    if not os.path.exists(path):
        return 0
    import json

    def before(line: str) -> bool:
        try:
            return json.loads(line)["step"] < step
        except (ValueError, KeyError, TypeError):
            return False

    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line if line.endswith("\n") else line + "\n" for line in lines if before(line)]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


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
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in the output directory "
                             "(same as output.resume: auto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    overrides = args.set + (["output.resume=auto"] if args.resume else [])
    try:
        recipe = load_recipe(args.recipe, overrides, output_dir=args.output_dir, max_steps=args.max_steps)
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
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if hasattr(trainer, "metrics"):
            trainer.cleanup()
    print(f"done: {trainer.step} steps in {time.time() - t0:.0f} s; metrics {trainer.metrics.path}; checkpoint {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
