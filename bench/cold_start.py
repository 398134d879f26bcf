"""Stage-1 (cold start, UAE eq. 3) step time and peak memory against K, on the tiny models.

    python bench/cold_start.py                      # K = 1, 2, 4, checkpointing off and on
    python bench/cold_start.py --ks 1 2 4 --steps 3 --render-steps 8

Each (K, checkpointing) point runs in a fresh subprocess so that memory figures do not leak
between points. Two memory numbers per point:
- `saved MiB`: bytes of tensors autograd saves for backward during one step, summed through
  torch.autograd.graph.saved_tensors_hooks (the activation memory that K and checkpointing
  control; weights excluded, tensors saved twice counted twice). Exact and machine-independent.
- `peak RSS MiB`: resource.getrusage(RUSAGE_SELF).ru_maxrss of the subprocess after the steps,
  minus the RSS just before the first step: the process-level peak a CPU run actually paid
  (allocator and library noise included).
Step time is the median over `--steps` timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_point(k: int, ckpt: bool, steps: int, render_steps: int) -> dict:
    import torch

    from rl.config import Recipe
    from rl.learner import Learner
    from rl.shapes import generate_shapes
    from rollouts.actors import RolloutWorker, image_seed

    torch.set_num_threads(2)
    recipe = Recipe.model_validate({
        "device": "cpu", "seed": 0,
        "models": {"encoder": {"image_size": 32, "adapter": {"r": 8, "alpha": 16}},
                   "decoder": {"image_size": 32, "adapter": {"r": 8, "alpha": 16}}},
        "rollout": {"batch_size": 4, "group_size": 2, "caption": {"max_new_tokens": 16},
                    "trajectory": {"num_steps": render_steps, "render_steps": render_steps, "sde_window": 2}},
        "cold_start": {"lr": 1e-3, "grad_steps": k, "activation_checkpointing": ckpt},
    })
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)
    records = generate_shapes(4, seed=0)
    images, ids = [r.image for r in records], [r.image_id for r in records]
    group = worker.cold_start_rollout(images, seed=0)
    args = (images, ids, group.completion_ids, group.completion_mask, [image_seed(i) for i in ids])
    learner.clip()
    learner.train_cold_start(*args)  # warm-up (first-call allocations)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times = []
    for i in range(steps):
        saved[0] = 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            learner.train_cold_start(*args)
        times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"k": k, "ckpt": ckpt, "step_s": statistics.median(times), "saved_mib": saved[0] / 2**20,
            "peak_rss_mib": rss1 / 1024, "rss_growth_mib": (rss1 - rss0) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--render-steps", type=int, default=8)
    ap.add_argument("--no-ckpt", action="store_true", help="skip the activation-checkpointing rows")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # "k,ckpt": run one point, print JSON
    a = ap.parse_args()
    if a.point:
        k, ckpt = a.point.split(",")
        print("RESULT " + json.dumps(one_point(int(k), ckpt == "1", a.steps, a.render_steps)))
        return
    rows = []
    for ckpt in ([False] if a.no_ckpt else [False, True]):
        for k in a.ks:
            out = subprocess.run([sys.executable, __file__, "--point", f"{k},{int(ckpt)}", "--steps", str(a.steps),
                                  "--render-steps", str(a.render_steps)], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"K={k} ckpt={ckpt} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"render_steps={a.render_steps}, batch 4, 32x32, median of {a.steps} steps\n")
    print("| K | act. ckpt | step time (s) | autograd saved (MiB) | peak RSS (MiB) | RSS growth in steps (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {'on' if r['ckpt'] else 'off'} | {r['step_s']:.2f} | {r['saved_mib']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['rss_growth_mib']:.0f} |")


if __name__ == "__main__":
    main()
