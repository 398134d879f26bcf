"""Overlapped rollouts (issue 8): step time with `resources.async_rollouts` 0 versus 1.

    python bench/overlap.py [--steps 16] [--batch 4] [--group 8]

Runs the tiny recipe twice in this process (a fresh local Ray each time), encoder and decoder
phases of `--steps` steps each, and prints per stage: mean seconds per step (the first two steps of
each phase dropped as warm-up), the fraction of each step the learner spent waiting for its batch,
and the speed-up of async 1 over async 0. With async 1 the rollouts and rewards of step t+1 run
while the learner trains step t, on the weights of step t (one version stale, corrected by the
importance ratio).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not


def run(async_rollouts: int, steps: int, batch: int, group: int) -> dict[str, dict[str, float]]:
    import ray

    from rl.config import load_recipe
    from rl.metrics import read_metrics
    from rl.train import Trainer

    out = tempfile.mkdtemp(prefix=f"overlap{async_rollouts}-")
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [
        f"resources.async_rollouts={async_rollouts}", "schedule.cold_start_steps=0", "schedule.cycles=1",
        f"schedule.phases=[{{stage: encoder, steps: {steps}}}, {{stage: decoder, steps: {steps}}}]",
        f"rollout.batch_size={batch}", f"rollout.group_size={group}", "output.progress=false",
        "output.tensorboard=false", "output.plot=false", "pretrain.enabled=false",
    ], output_dir=out)
    trainer = Trainer(recipe, recipe_dir=str(ROOT / "recipes"))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
        if ray.is_initialized():
            ray.shutdown()
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    result = {}
    for stage in ("encoder", "decoder"):
        r = [x for x in rows if x["stage"] == stage][2:]
        sec = statistics.mean(x["seconds"] for x in r)
        wait = statistics.mean(x["learner_wait"] for x in r)
        result[stage] = {"seconds": sec, "wait_frac": wait / sec, "stale": statistics.mean(x.get("stale", 0) for x in r)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    sync = run(0, args.steps, args.batch, args.group)
    overlap = run(1, args.steps, args.batch, args.group)
    print(f"{'stage':8s} {'async':>5s} {'s/step':>8s} {'learner waited':>15s} {'stale batches':>14s}")
    for stage in ("encoder", "decoder"):
        for name, res in (("0", sync), ("1", overlap)):
            r = res[stage]
            print(f"{stage:8s} {name:>5s} {r['seconds']:8.3f} {r['wait_frac']:14.1%} {r['stale']:14.2f}")
        print(f"{stage:8s} speed-up async 1 over 0: {sync[stage]['seconds'] / overlap[stage]['seconds']:.2f}x")
    total0 = sum(sync[s]["seconds"] for s in sync)
    total1 = sum(overlap[s]["seconds"] for s in overlap)
    print(f"overall speed-up per step: {total0 / total1:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    main()
