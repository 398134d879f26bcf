"""Memory bounded by micro-batches (issue 14): peak memory of one learner update of each stage
against rows and against trained decoder steps.

    python bench/memory.py                          # tiny models, ~1 min on 2 CPU cores
    python bench/memory.py --models dryrun --zero 0 # published architectures at depth 1, ~8 min, 6.5 GB
    python bench/memory.py --models dryrun          # the same at the dry-run recipe's ZeRO 2
    python bench/memory.py --quick                  # rows 4 and 8 at micro-batch 2, ~20 s (the test's run)
    python bench/memory.py --isolate                # one process per configuration (~3.5 min for tiny)
    python bench/memory.py --method timeline        # decoder_rollout.py's timeline analysis (~5 min)
    python bench/memory.py --models tiny dryrun --zero 2 --json /tmp/memory.json

What is measured, per stage (cold start `Learner.train_cold_start`, encoder GRPO `train_encoder`,
decoder GRPO `train_decoder`) and per configuration: the rollout is made by a `RolloutWorker`
colocated with a one-rank `Learner` (not measured), one update runs as a warm-up (first-call
allocations: the cold start's CLIP, DeepSpeed's buffers), then the peak of the bytes allocated
during ONE more update on the same rollout, marked as made by the current weights (the first pass
over a fresh rollout). Rollout tensors, weights and optimizer state exist before the call and are
not counted; everything the call allocates (activations, logit chunks, gradients, the reference
pass, per-row statistics) is, minus what it frees again.

Rows: images in the cold start, batch_size x group_size captions / trajectories in GRPO, with
group_size 2 (rl/config.py wants the micro-batch to divide the cold-start images, batch_size, too).
  rows: tiny 8, 16, 32 at `learner.micro_batch_size` 4; dryrun 2, 4, 8 at micro-batch 1; and the
        same rows with micro_batch_size None (the whole batch at once: the growth micro-batches remove);
  trained steps: sde_window 1, 2, 5, 10 of 10 denoising steps, at tiny 16 / dryrun 4 rows.
Targets: per stage, peak at 4x the rows <= 1.1x the peak at 1x (fixed micro-batch); decoder, peak
over the trained steps within 1.1x.

How the peak is computed (CPU has no max_memory_allocated): the method of bench/decoder_rollout.py
part (c). torch.profiler with profile_memory records every allocation and free of the call; the
peak is the maximum of the running sum of bytes allocated during the call and not yet freed (frees
of what existed before the call are not credited). `peak_allocated` reads the profiler's raw
allocation events; `--method timeline` runs decoder_rollout's `_peak_new_bytes` (the profiler's
memory-timeline analysis) unchanged. Both give the same bytes on every tiny configuration (the test
checks one), the timeline 10-40x slower on micro-batched updates.

Processes: each stage runs in its own process, on one learner whose recipe is swapped per
configuration (each gets its own validated recipe, rollout and warm-up; building the dry-run
models is most of their time, and a process returns its memory when it ends). `--isolate` runs
every configuration in a fresh process with a fresh learner: same bytes on the tiny sweep, as
expected, since only allocations inside the call count.

Models: `tiny` is recipes/tiny.yaml with pretrain off (random tiny Qwen2.5-VL, SD3, CLIP); `dryrun`
is recipes/unified_grpo_dryrun.yaml (Qwen2.5-VL-3B, SD3.5-large, CLIP ViT-L/14 at depth 1, random
weights, 64 px renders, activation checkpointing on). Both with grpo.num_iterations 1 and
rollout.trajectory.num_steps 10; the ZeRO stage is the recipe's unless --zero.
Figures and their reading: bench/RESULTS.md, "Memory bounded by micro-batches (issue 14)".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not

import torch  # noqa: E402

STAGES = ("cold_start", "encoder", "decoder")
GROUP = 2  # rollouts per image: the micro-batch must divide batch_size (cold-start images) as well
NUM_STEPS = 10  # denoising steps of a decoder rollout; `window` of them are trained
TARGET = 1.1

# Per model set: recipe, rows (smallest, ..., 4x), fixed micro-batch, decoder windows, rows of the
# window sweep.
MODEL_SETS = {
    "tiny": {"recipe": ROOT / "recipes" / "tiny.yaml", "rows": (8, 16, 32), "micro": 4,
             "windows": (1, 2, 5, 10), "window_rows": 16},
    "dryrun": {"recipe": ROOT / "recipes" / "unified_grpo_dryrun.yaml", "rows": (2, 4, 8), "micro": 1,
               "windows": (1, 2, 5, 10), "window_rows": 4},
}
QUICK = {"rows": (4, 8), "micro": 2, "windows": (1, 2), "window_rows": 4}


@dataclass(frozen=True)
class Config:
    """One measured update. `window`: trained decoder steps (sde_window) of NUM_STEPS."""

    models: str
    stage: str
    rows: int
    micro: int | None
    window: int = 2
    series: str = "rows"  # "rows" (sweep over rows) or "steps" (decoder: sweep over trained steps)


# ----------------------------------------------------------------------------------------------
# the peak of bytes allocated during a call
# ----------------------------------------------------------------------------------------------
def peak_allocated(fn) -> tuple[int, int]:
    """(peak, missed): max over the call of the live bytes of CPU allocations made during it, and
    how many of their frees the profiler did not record.

    1) profile the call with profile_memory (every allocation: +size, every free: -size, with its
       address); 2) in time order, add an allocation's size, subtract a free only if its address
    was allocated during the call (pre-existing tensors freed by the call are not credited);
    3) the maximum of that running sum. decoder_rollout._peak_new_bytes computes the same sum from
    the profiler's memory timeline (tensor keys instead of addresses).
    The profiler now and then drops a free event (seen at ZeRO 2, where DeepSpeed allocates and
    frees a 2 GB gradient bucket per backward: a dropped free made the same update read 2x or 3x
    the peak, at random). A new allocation at an address still live here means that block was freed
    before it: it is subtracted there (at the latest possible time, so the peak can only be
    over-stated, never hidden), and counted in `missed`.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, _utils, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []  # (time ns, bytes (< 0: a free), address)
    for e in _utils.traverse_dfs(prof.profiler.kineto_results.experimental_event_tree()):
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].alloc_size, e.typed[1].ptr))
    events.sort(key=lambda e: e[0])
    live = peak = missed = 0
    mine: dict[int, int] = {}  # address -> bytes, of the live allocations made during the call
    for _, size, ptr in events:
        if size > 0:
            if ptr in mine:  # its free was not recorded
                live -= mine.pop(ptr)
                missed += 1
            mine[ptr] = size
            live += size
        elif ptr in mine:
            live -= mine.pop(ptr)
        peak = max(peak, live)
    return peak, missed


def timeline_peak(fn) -> tuple[int, None]:
    """bench/decoder_rollout.py's helper, unchanged: the same sum from the memory timeline (it
    cannot tell a dropped free event; None)."""
    sys.path.insert(0, str(HERE))
    from decoder_rollout import _peak_new_bytes

    return _peak_new_bytes(fn), None


# ----------------------------------------------------------------------------------------------
# one configuration: recipe, learner, rollout, warm-up, measured update
# ----------------------------------------------------------------------------------------------
def make_recipe(cfg: Config, zero: int | None):
    from rl.config import RecipeError, load_recipe

    path = MODEL_SETS[cfg.models]["recipe"]
    if not path.is_file():
        raise SystemExit(
            f"--models {cfg.models}: {path.relative_to(ROOT)} not found. It comes with the branch that adds "
            "`models.<encoder|decoder|clip>.random_init` (published architectures at reduced depth, random "
            "weights); merge it first, or run --models tiny.")
    batch = cfg.rows if cfg.stage == "cold_start" else cfg.rows // GROUP
    overrides = [
        "pretrain.enabled=false", "grpo.num_iterations=1",
        f"rollout.batch_size={batch}", f"rollout.group_size={GROUP}",
        f"rollout.trajectory.num_steps={NUM_STEPS}", f"rollout.trajectory.sde_window={cfg.window}",
        "rollout.trajectory.timestep_fraction=null", "rollout.trajectory.step_selection=window",
        f"learner.micro_batch_size={'null' if cfg.micro is None else cfg.micro}",
    ] + ([f"learner.zero_stage={zero}"] if zero is not None else [])
    try:
        return load_recipe(path, overrides, check_files=False)
    except RecipeError as e:
        raise SystemExit(f"{cfg}: {e}") from None


def rollout_update(learner, worker, cfg: Config):
    """The rollout of `cfg` made with the worker (not measured), and `update()` running one update
    of the stage on it."""
    from rl.shapes import generate_shapes
    from rollouts.actors import image_seed

    recipe = learner.recipe
    records = generate_shapes(recipe.rollout.batch_size, seed=1, size=recipe.data.generate.size)
    images, ids = [r.image for r in records], [r.image_id for r in records]
    adv = torch.randn(cfg.rows, generator=torch.Generator().manual_seed(0)).clamp(-5, 5)
    valid = torch.ones(cfg.rows, dtype=torch.bool)
    if cfg.stage == "cold_start":
        group = worker.cold_start_rollout(images, seed=1)
        seeds = [image_seed(i) for i in ids]
        return lambda: learner.train_cold_start(images, ids, group.completion_ids, group.completion_mask, seeds)
    if cfg.stage == "encoder":
        group, _ = worker.encoder_rollout(images, ids, seed=1, render=False)
        assert len(group.captions) == cfg.rows
        # Marked as made by the current weights: a first pass over a fresh rollout.
        return lambda: learner.train_encoder(group._replace(version=learner.version), adv, valid)
    traj, _, _ = worker.decoder_rollout(images, seed=1)
    assert traj.log_probs.shape == (cfg.rows, min(cfg.window, NUM_STEPS)), traj.log_probs.shape
    return lambda: learner.train_decoder(traj._replace(version=learner.version), adv, valid)


def measure(cfgs: list[Config], zero: int | None = None, method: str = "events") -> list[tuple[int, int | None]]:
    """Per configuration (same model set and stage): (peak bytes allocated during one update after
    one warm-up update, frees the profiler missed (None: not known with `timeline`)).

    One learner for all of them (building the models is most of the time with the dry-run models):
    each configuration gets its own validated recipe, swapped into the learner and the worker (both
    read batch and micro-batch sizes and the SDE window from it at every call), its own rollout
    and its own warm-up update."""
    from rl.learner import Learner
    from rollouts.actors import RolloutWorker

    recipes = [make_recipe(c, zero) for c in cfgs]
    torch.manual_seed(recipes[0].seed)
    learner = Learner(recipes[0])
    worker = RolloutWorker(recipes[0], models=learner.models)
    out = []
    for cfg, recipe in zip(cfgs, recipes):
        learner.recipe = worker.recipe = recipe
        update = rollout_update(learner, worker, cfg)
        update()  # warm-up
        gc.collect()
        out.append((peak_allocated if method == "events" else timeline_peak)(update))
        del update
        gc.collect()
    return out


def measure_in_process(cfgs: list[Config], zero: int | None, method: str) -> list[tuple[int, int | None]]:
    """`measure` in a fresh Python process (its memory is returned when it exits)."""
    zero_arg = ["--zero", str(zero)] if zero is not None else []
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps([asdict(c) for c in cfgs]),
                          "--method", method] + zero_arg, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cfgs[0].models} {cfgs[0].stage} failed in its process:\n{out.stderr[-3000:]}")
    return [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


# ----------------------------------------------------------------------------------------------
# sweeps, table, targets
# ----------------------------------------------------------------------------------------------
def configs(models: str, quick: bool) -> list[Config]:
    s = dict(MODEL_SETS[models], **(QUICK if quick else {}))
    out = []
    for stage in STAGES:
        out += [Config(models, stage, r, s["micro"]) for r in s["rows"]]
        if not quick:  # the same rows with no micro-batch: what the micro-batch removes
            out += [Config(models, stage, r, None) for r in s["rows"]]
    out += [Config(models, "decoder", s["window_rows"], s["micro"], window=w, series="steps") for w in s["windows"]]
    return out


def evaluate(results: list[dict]) -> list[dict]:
    """Targets: per stage, peak at the most rows / at the fewest <= 1.1 (fixed micro-batch);
    decoder, max / min peak over trained steps <= 1.1."""
    targets = []
    for stage in STAGES:
        rows = [r for r in results if r["stage"] == stage and r["series"] == "rows" and r["micro_batch_size"]]
        if len(rows) >= 2:
            lo, hi = min(rows, key=lambda r: r["rows"]), max(rows, key=lambda r: r["rows"])
            ratio = hi["peak_bytes"] / lo["peak_bytes"]
            targets.append({"target": f"{stage}: peak at {hi['rows'] // lo['rows']}x the rows "
                                      f"({lo['rows']} -> {hi['rows']}, micro-batch {lo['micro_batch_size']})",
                            "ratio": ratio, "limit": TARGET, "passed": ratio <= TARGET})
    steps = [r for r in results if r["series"] == "steps"]
    if len(steps) >= 2:
        peaks = [r["peak_bytes"] for r in steps]
        ratio = max(peaks) / min(peaks)
        targets.append({"target": f"decoder: peak over trained steps {', '.join(str(r['steps']) for r in steps)} "
                                  f"({steps[0]['rows']} rows, micro-batch {steps[0]['micro_batch_size']})",
                        "ratio": ratio, "limit": TARGET, "passed": ratio <= TARGET})
    return targets


def table(models: str, setting: str, results: list[dict], targets: list[dict]) -> str:
    lines = [f"\nmodels: {models} ({setting})",
             "| stage | sweep | rows | trained steps | micro-batch | peak MiB | x smallest |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['series']} | {r['rows']} | {r['steps'] if r['steps'] is not None else '-'} | "
                     f"{r['micro_batch_size'] or 'None (all)'} | {r['peak_mib']:.2f} | {r['ratio']:.3f} |")
    missed = [r["missed_frees"] for r in results if r["missed_frees"]]
    if missed:
        lines.append(f"\n{sum(missed)} free events missed by the profiler in {len(missed)} configurations "
                     "(each subtracted at the next allocation at its address; see peak_allocated)")
    lines.append("")
    for t in targets:
        lines.append(f"{'PASS' if t['passed'] else 'FAIL'}  {t['target']}: {t['ratio']:.3f} (target <= {t['limit']})")
    return "\n".join(lines)


def run_models(models: str, quick: bool, zero: int | None, method: str, isolate: bool) -> dict:
    """Every configuration of the model set: one process per stage (one per configuration with
    `isolate`), then the table and the targets."""
    cfgs = configs(models, quick)
    recipe = make_recipe(cfgs[0], zero)  # fails here, before any process starts, if the recipe is missing
    setting = (f"ZeRO {recipe.learner.zero_stage}, activation checkpointing "
               f"{'on' if recipe.learner.activation_checkpointing else 'off'}, group size {GROUP}, "
               f"logits_chunk {recipe.learner.logits_chunk}")
    print(f"\nmodels: {models} ({MODEL_SETS[models]['recipe'].relative_to(ROOT)}; {setting})", flush=True)
    batches = [[c] for c in cfgs] if isolate else [[c for c in cfgs if c.stage == s] for s in STAGES]
    results = []
    for batch in batches:
        t0 = time.perf_counter()
        peaks = measure_in_process(batch, zero, method)
        seconds = time.perf_counter() - t0
        for cfg, (peak, missed) in zip(batch, peaks):
            results.append({"stage": cfg.stage, "series": cfg.series, "rows": cfg.rows,
                            "steps": min(cfg.window, NUM_STEPS) if cfg.stage == "decoder" else None,
                            "micro_batch_size": cfg.micro, "peak_bytes": peak, "peak_mib": peak / 2**20,
                            "missed_frees": missed})
            print(f"  {cfg.stage:10s} {cfg.series:5s} rows {cfg.rows:3d} window {cfg.window:2d} micro {cfg.micro}: "
                  f"{peak / 2**20:9.2f} MiB{f'  ({missed} missed frees)' if missed else ''}", flush=True)
        print(f"  ({len(batch)} configurations in {seconds:.0f} s)", flush=True)
    smallest: dict[tuple, int] = {}
    for r in results:  # ratio to the first (smallest) configuration of its series
        key = (r["stage"], r["series"], r["micro_batch_size"])
        smallest.setdefault(key, r["peak_bytes"])
        r["ratio"] = r["peak_bytes"] / smallest[key]
    targets = evaluate(results)
    print(table(models, setting, results, targets), flush=True)
    return {"setting": setting, "results": results, "targets": targets}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODEL_SETS), default=["tiny"])
    parser.add_argument("--quick", action="store_true",
                        help="rows 4 and 8 at micro-batch 2, windows 1 and 2, no whole-batch rows")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3],
                        help="DeepSpeed ZeRO stage (one rank); default: the recipe's (tiny 0, dryrun 2)")
    parser.add_argument("--method", choices=["events", "timeline"], default="events",
                        help="events: the profiler's allocation events (fast); timeline: decoder_rollout._peak_new_bytes")
    parser.add_argument("--isolate", action="store_true",
                        help="each configuration in a fresh process with its own learner (default: one per stage)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # Configs as JSON: measure them, print the peaks
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(measure([Config(**c) for c in json.loads(args.one)], args.zero, args.method)))
        return {}
    header = (f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; ZeRO {args.zero if args.zero is not None else 'as the recipe'}, "
              f"method {args.method}"
              f"{', one process per configuration' if args.isolate else ''}")
    print(header, flush=True)
    report = {"header": header, "zero": args.zero, "method": args.method, "isolate": args.isolate, "models": {}}
    for models in args.models:
        report["models"][models] = run_models(models, args.quick, args.zero, args.method, args.isolate)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
