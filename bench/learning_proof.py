"""Issue 18's learning proof: the embedded default before RL, after the full schedule, and after
encoder GRPO alone, on held-out scenes, over several RL seeds.

    python bench/learning_proof.py --seeds 0 1 2 [--recipe recipes/tiny.yaml] [--out /tmp/proof]

For each seed, two `python -m rl.train RECIPE --set seed=S` runs in subprocesses, one after the
other:

- full:         the recipe as written (cold start, then encoder and decoder GRPO alternating);
- encoder_only: the same with every decoder phase removed from `schedule.phases` (the same encoder
                steps, cycles and everything else): the ablation of "both policies learn".

Each final checkpoint, and the models before RL (`--checkpoint none`, once: the shipped models do
not depend on the RL seed), are scored by `python -m rl.eval unified-bench` on the same `--n`
held-out scenes (greedy caption, ODE render, CLIP similarity per backbone, coverage, precision,
repeats, colour accuracy, and renders of the true FULL captions: the decoder's own fidelity).
Prints one Markdown table, mean +- std over seeds per metric, and the seconds of each training run;
writes `<out>/summary.json` (every run's summary, its wall time and the `uptime` before it) and
copies seed 0's grid_start.png / grid_end.png of the full schedule to `--grids` (bench/ by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("unified", "sim/clip", "sim/clip_b", "coverage", "precision", "color_accuracy", "repeats",
           "caption_length", "truth_unified")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(cmd: list[str]) -> float:
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - t0


def bench(checkpoint: str, out_json: Path, recipe: Path, n: int) -> dict:
    run([sys.executable, "-m", "rl.eval", "unified-bench", "--checkpoint", checkpoint, "--recipe", str(recipe),
         "--split", "heldout", "--n", str(n), "--out", str(out_json)])
    return json.loads(out_json.read_text())["summary"]


def encoder_only_phases(recipe: Path) -> str:
    phases = yaml.safe_load(recipe.read_text())["schedule"]["phases"]
    kept = [p for p in phases if p["stage"] != "decoder"]
    return json.dumps(kept)


def fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=64, help="held-out scenes scored")
    p.add_argument("--out", type=Path, default=Path("/tmp/learning_proof"))
    p.add_argument("--grids", type=Path, default=ROOT / "bench", help="where seed 0's grids go ('' : nowhere)")
    p.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    p.add_argument("--max-steps", type=int, help="shorten every run (a smoke test, not a result)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"recipe": str(args.recipe), "seeds": args.seeds, "n": args.n, "sets": args.set, "runs": []}
    result["before"] = bench("none", args.out / "before.json", args.recipe, args.n)
    variants = {"full": [], "encoder_only": [f"schedule.phases={encoder_only_phases(args.recipe)}"]}
    for seed in args.seeds:
        for name, sets in variants.items():
            run_dir = args.out / f"{name}-seed{seed}"
            cmd = [sys.executable, "-m", "rl.train", str(args.recipe), "--output-dir", str(run_dir), "--overwrite"]
            if args.max_steps:
                cmd += ["--max-steps", str(args.max_steps)]
            for s in [f"seed={seed}", *sets, *args.set]:
                cmd += ["--set", s]
            load = uptime()
            wall = run(cmd)
            summary = bench(str(run_dir), run_dir / "unified_bench.json", args.recipe, args.n)
            result["runs"].append({"variant": name, "seed": seed, "train_wall_s": round(wall, 1), "uptime": load,
                                   "summary": summary})
            print(f"{name} seed {seed}: {wall:.0f} s, unified {summary['unified']:.3f}, "
                  f"coverage {summary['coverage']:.3f}, precision {summary['precision']:.3f}", file=sys.stderr)
            if name == "full" and seed == args.seeds[0] and str(args.grids):
                for tag in ("start", "end"):
                    src = run_dir / f"grid_{tag}.png"
                    if src.exists():
                        shutil.copy(src, args.grids / f"learning_proof_grid_{tag}.png")
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))
    lines = ["| metric | before RL | full schedule | encoder GRPO only |", "| --- | --- | --- | --- |"]
    for m in METRICS:
        cells = [fmt([result["before"].get(m, float("nan"))])]
        for name in variants:
            cells.append(fmt([r["summary"].get(m, float("nan")) for r in result["runs"] if r["variant"] == name]))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    walls = {name: [r["train_wall_s"] for r in result["runs"] if r["variant"] == name] for name in variants}
    lines.append("| training seconds | | " + " | ".join(fmt(w) for w in walls.values()) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
