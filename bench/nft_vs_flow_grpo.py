"""DiffusionNFT vs Flow-GRPO as the decoder objective, on recipes/decoder_only.yaml's shapes world.

    python bench/nft_vs_flow_grpo.py --steps 40 --seeds 0 1 2 [--pretrained --cache DIR] [--eval] [--out DIR]

Each (algorithm, seed) is one `python -m rl.train recipes/decoder_only.yaml` run in a subprocess,
one after the other, with the same rollout budget (steps x batch_size x group_size samples) and
everything else as the recipe says; they differ only in `grpo.decoder.algorithm`:

- flow_grpo: the recipe as written (SDE window of 2 trained steps in [0, 6), beta 0.004, ...);
- nft: `grpo.decoder.algorithm=nft` with DiffusionNFT's defaults (`grpo.decoder.nft`: ODE rollouts
  from independent noise, beta 1, kl_beta 1e-4, 9 of 10 levels, batch-population advantages) and the
  recipe's lr; sde_window / window_range set to null (trajectory-only options).

Reported per algorithm (mean +- std over seeds): the training reward per step (`reward_mean` of
metrics.jsonl: the rollouts' CLIP reward; NFT's rollouts are ODE samples, Flow-GRPO's SDE ones, so
with `--eval` both final decoders are also scored the same way, ODE renders of the held-out
captions by `rl.eval unified-bench`, `sim/clip`), the final reward (mean of the last
`--final-window` steps), seconds per step (median), and the wall-clock at which NFT's seed-mean
reward first reaches Flow-GRPO's final one. Writes `<out>/summary.json` and, with matplotlib,
`bench/nft_vs_flow_grpo.png` (reward against step and against cumulative seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "decoder_only.yaml"
ALGOS = {
    "flow_grpo": [],
    "nft": ["grpo.decoder.algorithm=nft", "rollout.trajectory.sde_window=null", "rollout.trajectory.window_range=null"],
}


def run_one(algo: str, seed: int, steps: int, out: Path, extra: list[str], do_eval: bool, eval_n: int | None) -> dict:
    run_dir = out / f"{algo}-seed{seed}"
    sets = [f"seed={seed}", "eval.grid_images=0", *ALGOS[algo], *extra]
    cmd = [sys.executable, "-m", "rl.train", str(RECIPE), "--output-dir", str(run_dir), "--max-steps", str(steps),
           "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{algo} seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"algo": algo, "seed": seed, "wall_s": wall, "reward": [r["reward_mean"] for r in rows],
              "seconds": [r["seconds"] for r in rows], "loss": [r["loss"] for r in rows]}
    if do_eval:
        ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
        bench_json = run_dir / "unified_bench.json"
        cmd = [sys.executable, "-m", "rl.eval", "unified-bench", "--checkpoint", str(ckpt), "--split", "heldout",
               "--out", str(bench_json)] + (["--n", str(eval_n)] if eval_n else [])
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"eval of {algo} seed {seed} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(bench_json.read_text())
        result["eval_sim_clip"] = summary.get("summary", summary).get("sim/clip")
    print(f"{algo:9s} seed {seed}: final reward {result['reward'][-1]:.4f}, median s/step "
          f"{statistics.median(result['seconds']):.2f}, wall {wall:.0f} s", flush=True)
    return result


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(results: list[dict], final_window: int) -> dict:
    out: dict = {}
    for algo in ALGOS:
        runs = [r for r in results if r["algo"] == algo]
        if not runs:
            continue
        steps = min(len(r["reward"]) for r in runs)
        curve = [statistics.fmean(r["reward"][i] for r in runs) for i in range(steps)]
        clock = [statistics.fmean(sum(r["seconds"][: i + 1]) for r in runs) for i in range(steps)]
        finals = [statistics.fmean(r["reward"][-final_window:]) for r in runs]
        out[algo] = {
            "curve": curve, "cum_seconds": clock,
            "first_reward": mean_std([r["reward"][0] for r in runs]),
            "final_reward": mean_std(finals),
            "s_per_step": mean_std([statistics.median(r["seconds"]) for r in runs]),
            "wall_s": mean_std([r["wall_s"] for r in runs]),
        }
        if all("eval_sim_clip" in r for r in runs):
            out[algo]["eval_sim_clip"] = mean_std([r["eval_sim_clip"] for r in runs])
    if "flow_grpo" in out and "nft" in out:
        # paired by seed: a seed fixes the data order, so both algorithms see the same images per step
        # and the per-step reward's image-to-image spread cancels in the difference
        by_seed = {(r["algo"], r["seed"]): r for r in results}
        seeds = sorted({r["seed"] for r in results if ("nft", r["seed"]) in by_seed and ("flow_grpo", r["seed"]) in by_seed})
        final = lambda r: statistics.fmean(r["reward"][-final_window:])  # noqa: E731
        out["paired_final_diff_nft_minus_flow_grpo"] = mean_std(
            [final(by_seed[("nft", s)]) - final(by_seed[("flow_grpo", s)]) for s in seeds])
        if all("eval_sim_clip" in by_seed[(a, s)] for a in ALGOS for s in seeds):
            out["paired_eval_diff_nft_minus_flow_grpo"] = mean_std(
                [by_seed[("nft", s)]["eval_sim_clip"] - by_seed[("flow_grpo", s)]["eval_sim_clip"] for s in seeds])
        target = out["flow_grpo"]["final_reward"][0]
        # smoothed over the same window as the final reward, so one lucky step does not count
        nft = out["nft"]
        smooth = [statistics.fmean(nft["curve"][max(0, i - final_window + 1): i + 1]) for i in range(len(nft["curve"]))]
        hit = next((i for i, v in enumerate(smooth) if v >= target), None)
        out["nft_reaches_flow_grpo_final"] = None if hit is None else {
            "step": hit, "nft_seconds": nft["cum_seconds"][hit],
            "flow_grpo_seconds": out["flow_grpo"]["cum_seconds"][-1],
            "ratio": nft["cum_seconds"][hit] / out["flow_grpo"]["cum_seconds"][-1]}
    return out


def plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for algo in ALGOS:
        if algo in summary:
            s = summary[algo]
            a.plot(range(len(s["curve"])), s["curve"], label=algo)
            b.plot(s["cum_seconds"], s["curve"], label=algo)
    a.set_xlabel("step (same samples per step)"), a.set_ylabel("rollout reward (mean of seeds)")
    b.set_xlabel("seconds (learner + rollout)"), b.set_ylabel("rollout reward (mean of seeds)")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    p.add_argument("--out", default="runs/bench_nft")
    p.add_argument("--pretrained", action="store_true",
                   help="the pretrained shapes-world models of the recipe's seed (rl.shapes.pretrain; built if missing)")
    p.add_argument("--cache", help="pretraining cache root (with --pretrained; default: rl.shapes.pretrain's)")
    p.add_argument("--eval", action="store_true", help="score each final decoder with rl.eval unified-bench")
    p.add_argument("--eval-n", type=int, help="held-out images scored by --eval (default: the recipe's eval.n)")
    p.add_argument("--final-window", type=int, default=5, help="steps averaged into the final reward")
    p.add_argument("--set", action="append", default=[], help="extra recipe overrides for every run")
    p.add_argument("--from-runs", help="a runs.jsonl written by an earlier bench: summarise it, run nothing")
    p.add_argument("--plot", default=str(ROOT / "bench" / "nft_vs_flow_grpo.png"))
    args = p.parse_args(argv)
    extra = list(args.set)
    if args.pretrained:
        # The pretrained parts of the recipe's own seed (their cache key holds the seed), built once
        # if missing, then given as explicit paths: the bench's seeds vary the RL run only.
        from rl.config import load_recipe
        from rl.shapes.pretrain import pretrain

        paths, _ = pretrain(load_recipe(RECIPE), args.cache)
        extra += [f"models.encoder.path={paths.encoder}", f"models.decoder.path={paths.decoder}",
                  f"models.connector.path={paths.connector}", f"models.clip.checkpoint={paths.clip}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if args.from_runs:  # summarise runs written earlier, run nothing
        results = [json.loads(line) for line in Path(args.from_runs).read_text().splitlines()]
    for seed in [] if args.from_runs else args.seeds:
        for algo in args.algos:
            results.append(run_one(algo, seed, args.steps, out, extra, args.eval, args.eval_n))
            with open(out / "runs.jsonl", "a") as f:  # as they finish, so a cut-short bench keeps them
                f.write(json.dumps(results[-1]) + "\n")
    summary = summarize(results, args.final_window)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=1))
    for algo in [a for a in ALGOS if a in summary]:
        s = summary[algo]
        line = (f"{algo:9s} first {s['first_reward'][0]:.4f}  final {s['final_reward'][0]:.4f} +- "
                f"{s['final_reward'][1]:.4f}  s/step {s['s_per_step'][0]:.2f} +- {s['s_per_step'][1]:.2f}  "
                f"run wall {s['wall_s'][0]:.0f} s")
        if "eval_sim_clip" in s:
            line += f"  eval sim/clip {s['eval_sim_clip'][0]:.4f} +- {s['eval_sim_clip'][1]:.4f}"
        print(line)
    for key in ("paired_final_diff_nft_minus_flow_grpo", "paired_eval_diff_nft_minus_flow_grpo"):
        if key in summary:
            print(f"{key}: {summary[key][0]:+.4f} +- {summary[key][1]:.4f}")
    print("nft reaches flow_grpo's final reward:", json.dumps(summary.get("nft_reaches_flow_grpo_final")))
    plot(summary, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
