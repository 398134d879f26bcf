"""Adapters (issue 10): trainable parameters, step time and reward for lora / lokr / kadapter.

    python bench/adapters.py                         # 4 encoder + 4 decoder GRPO steps per kind
    python bench/adapters.py --steps 6 --kinds kadapter lora --n 4 --r 8

Each kind gets the same run on recipes/tiny.yaml (same seed, same base weights, same images), in
this process: the learner (`rl.learner.Learner`) with a colocated `RolloutWorker` over the same
modules (as tests/rl/test_stages.py), the recipe's CLIP reconstruction reward (`make_clip_reward`),
group-relative advantages (UAE eq. 1) and clipped GRPO updates. Stage 2 (encoder) steps, then
stage 3 (decoder) steps; no cold start, so rewards are those of random tiny models moving under
GRPO: a smoke-level comparison of cost, not of quality.

Reported per kind and policy: trainable parameters, mean seconds per step (rollout + reward +
update; the first step is dropped as warm-up) and the mean CLIP reward of the last half of steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rl import grpo  # noqa: E402
from rl.config import load_recipe  # noqa: E402
from rl.learner import Learner, make_clip_reward  # noqa: E402
from rl.shapes import generate_shapes  # noqa: E402
from rollouts.actors import RolloutWorker  # noqa: E402


def run_kind(kind: str, args) -> dict[str, dict[str, float]]:
    overrides = [f"models.{p}.adapter.{k}={v}" for p in ("encoder", "decoder")
                 for k, v in (("kind", kind), ("r", args.r), ("alpha", 2 * args.r), ("n", args.n))]
    recipe = load_recipe(args.recipe, overrides)
    torch.manual_seed(recipe.seed)
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)  # colocated: same modules, sync is free
    clip = make_clip_reward(recipe)
    g = recipe.rollout.group_size
    records = generate_shapes(recipe.rollout.batch_size * args.steps, seed=1)
    out = {}
    for policy in ("encoder", "decoder"):
        times, rewards = [], []
        for step in range(args.steps):
            batch = records[step * recipe.rollout.batch_size:(step + 1) * recipe.rollout.batch_size]
            images, ids = [r.image for r in batch], [r.image_id for r in batch]
            sources = [im for im in images for _ in range(g)]  # (B*G,) aligned with the renders
            t0 = time.perf_counter()
            worker.version = learner.version
            # step 1. rollout; step 2. CLIP reward; step 3. advantages; step 4. GRPO update
            if policy == "encoder":
                group, renders = worker.encoder_rollout(images, ids, seed=step)
            else:
                traj, _, renders = worker.decoder_rollout(images, seed=step)
            reward = clip.similarity(sources, renders)  # (B*G,)
            adv = grpo.group_advantages(reward, g)
            if policy == "encoder":
                learner.train_encoder(group, adv.advantages, adv.valid)
            else:
                learner.train_decoder(traj, adv.advantages, adv.valid)
            times.append(time.perf_counter() - t0)
            rewards.append(float(reward.mean()))
            print(f"  {kind:8s} {policy} step {step}: {times[-1]:.2f}s reward {rewards[-1]:.4f}", flush=True)
        out[policy] = {
            "params": sum(p.numel() for p in learner.models.parameters(policy)),
            "step_s": statistics.mean(times[1:] or times),
            "reward": statistics.mean(rewards[len(rewards) // 2:]),
            "reward_first": rewards[0],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/tiny.yaml")
    ap.add_argument("--kinds", nargs="+", default=["lora", "lokr", "kadapter"])
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps per policy and kind")
    ap.add_argument("--r", type=int, default=8, help="rank for every kind (tiny.yaml: 8)")
    ap.add_argument("--n", type=int, default=4, help="Kronecker factor size (lokr, kadapter)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = {kind: run_kind(kind, args) for kind in args.kinds}
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; {args.steps} steps per policy, r={args.r}, n={args.n}")
    print("| kind | policy | trainable params | step time (s) | reward, first step | reward, last half |")
    print("|---|---|---|---|---|---|")
    for kind, res in results.items():
        for policy, s in res.items():
            print(f"| {kind} | {policy} | {s['params']:,} | {s['step_s']:.2f} | {s['reward_first']:.4f} | {s['reward']:.4f} |")


if __name__ == "__main__":
    main()
