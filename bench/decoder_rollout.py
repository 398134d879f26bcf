"""Decoder rollouts and updates (issue 3): what the SDE rollout, the window and the KL cost.

    python bench/decoder_rollout.py                  # all three figures, ~1.5 min on 2 CPU cores
    python bench/decoder_rollout.py --repeats 5 --only a

Everything is measured side by side in ONE process on the tiny decoder of recipes/tiny.yaml
(SD3Transformer2DModel, 2 layers, 8x8 latents + a 3-level AutoencoderKL, decoder LoRA r=8):

(a) rollout: `sample_trajectories` (10 SDE steps, per-step log-probs, decode) against diffusers'
    own `StableDiffusion3Pipeline` on the same transformer, VAE and conditioning (prompt_embeds /
    pooled_prompt_embeds, no text encoders), FlowMatchEulerDiscreteScheduler(shift=3), the same 10
    steps, the same batch, guidance_scale=1. The two are timed alternately; medians. Target <= 1.10.
(b) update: one `Learner.train_decoder` call (reference pass for the KL, policy forward and
    backward, optimiser step) on a rollout whose SDE window is 2 steps against one where all 10
    steps are trained. Rollouts are made beforehand; only the update is timed, alternately.
    Target >= 3x faster.
(c) memory: peak of the bytes the learner allocates during one update with beta > 0 (KL to the
    adapter-disabled reference) against beta = 0. CPU has no `max_memory_allocated`, so the peak
    is computed from torch.profiler's memory timeline (every tensor allocation and free of the
    update, the timeline behind `export_memory_timeline`): the running sum of live bytes created
    during the update, its maximum. Cross-check: bytes autograd saves for backward
    (`torch.autograd.graph.saved_tensors_hooks`). Target <= 1.05x (no second model copy).

Timings record wall time and the process's CPU time; torch runs on 1 thread by default (--threads),
because on a shared 2-core machine idle-spinning OpenMP threads make 2-thread wall times swing 10x.
Figures and their reading: bench/RESULTS.md, "Decoder rollouts (issue 3)".
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rl.config import Recipe  # noqa: E402

B, G, STEPS, A = 4, 4, 10, 0.7  # 4 images x 4 trajectories, 10 steps: recipes/tiny.yaml's batch


def bench_recipe() -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 8, "alpha": 16}}, "decoder": {"adapter": {"r": 8, "alpha": 16}}},
        "rollout": {"batch_size": B, "group_size": G, "trajectory": {"num_steps": STEPS, "noise_level": A}},
        "grpo": {"decoder": {"lr": 1e-3, "beta": 0.04, "epsilon": 0.2}},
    })


def conditions(models):
    """(cond (B, L, D) with padding zeroed, mask (B, L), pooled (B, P)) from B random captions."""
    ids = torch.randint(10, 60, (B, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, mask, pooled = models.condition(ids, torch.ones_like(ids))
    return cond * mask.unsqueeze(-1), mask, pooled


def alternate(fns: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Time each function `repeats` times, interleaved (a, b, a, b, ...) after one warm-up each.

    Records wall time and the process's CPU time: on a shared machine other jobs stretch the wall
    time of whichever run they overlap, while the CPU time of a single-threaded run is the work
    itself. Ratios are given for both.
    """
    for fn in fns.values():
        fn()
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name]["cpu"].append(time.process_time() - c0)
            times[name]["wall"].append(time.perf_counter() - w0)
    return times


def report(title: str, times: dict, num: str, den: str, target: str) -> dict[str, float]:
    print(f"\n{title}")
    for name, t in times.items():
        print(f"  {name:36s} CPU median {statistics.median(t['cpu']) * 1e3:8.1f} ms (min {min(t['cpu']) * 1e3:7.1f})"
              f"   wall median {statistics.median(t['wall']) * 1e3:8.1f} ms (min {min(t['wall']) * 1e3:7.1f})"
              f"   n={len(t['cpu'])}")
    ratios = {kind: statistics.median(times[num][kind]) / statistics.median(times[den][kind]) for kind in ("cpu", "wall")}
    print(f"  ratio [{num}] / [{den}]: CPU {ratios['cpu']:.2f}, wall {ratios['wall']:.2f}   (target {target})")
    return ratios


# ----------------------------------------------------------------------------------------------
# (a) rollout vs diffusers' pipeline
# ----------------------------------------------------------------------------------------------
def bench_rollout(models, repeats: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from rollouts.trajectories import sample_trajectories

    dec = models.decoder
    cond, mask, pooled = conditions(models)
    pipe = StableDiffusion3Pipeline(
        transformer=dec.transformer, vae=dec.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=dec.shift),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    cond_n, pooled_n = cond.repeat_interleave(G, 0), pooled.repeat_interleave(G, 0)
    seed = iter(range(10**6))

    @torch.no_grad()
    def diffusers_pipeline():
        # Rows already repeated G times: with given embeds the pipeline does not repeat the pooled ones.
        pipe(prompt_embeds=cond_n, pooled_prompt_embeds=pooled_n, num_images_per_prompt=1, num_inference_steps=STEPS,
             guidance_scale=1.0, height=dec.image_size, width=dec.image_size, output_type="pt",
             generator=torch.Generator().manual_seed(next(seed)))

    def ours(window):
        return lambda: sample_trajectories(dec, cond, mask, pooled, G, num_steps=STEPS, noise_level=A,
                                           seed=next(seed), sde_window=window)

    times = alternate({"ours: 10 SDE steps + log-probs": ours(None), "diffusers StableDiffusion3Pipeline": diffusers_pipeline,
                       "ours: window of 2 SDE steps": ours(2)}, repeats)
    report(f"(a) rollout of {B}x{G} images, {STEPS} steps, {dec.image_size}px", times,
           "ours: 10 SDE steps + log-probs", "diffusers StableDiffusion3Pipeline", "<= 1.10")
    w = times["ours: window of 2 SDE steps"]["cpu"]
    print(f"  ratio [ours: window of 2 SDE steps] / [diffusers]: CPU "
          f"{statistics.median(w) / statistics.median(times['diffusers StableDiffusion3Pipeline']['cpu']):.2f}")


# ----------------------------------------------------------------------------------------------
# (b) one update: window of 2 vs all 10 steps; (c) peak memory with KL on vs off
# ----------------------------------------------------------------------------------------------
def prepared(learner):
    from rollouts.trajectories import sample_trajectories

    models = learner.models
    cond, mask, pooled = conditions(models)
    make = lambda window: sample_trajectories(models.decoder, cond, mask, pooled, G, num_steps=STEPS,  # noqa: E731
                                              noise_level=A, seed=1, sde_window=window)
    adv = torch.randn(B * G, generator=torch.Generator().manual_seed(0)).clamp(-5, 5)
    return make(2), make(None), adv, torch.ones(B * G, dtype=torch.bool)


def update(learner, traj, adv, valid):
    # Mark the rollout as made by the current weights: the ratio-is-1 fast path of a fresh rollout.
    return learner.train_decoder(traj._replace(version=learner.version), adv, valid)


def bench_update(learner, repeats: int) -> None:
    window, full, adv, valid = prepared(learner)
    times = alternate({"update, window of 2 steps": lambda: update(learner, window, adv, valid),
                       "update, all 10 steps": lambda: update(learner, full, adv, valid)}, repeats)
    ratios = report(f"(b) one decoder GRPO update ({B * G} trajectories, beta={learner.recipe.grpo.decoder.beta})",
                    times, "update, all 10 steps", "update, window of 2 steps", ">= 3x")
    print(f"  speed-up of the window: {ratios['cpu']:.2f}x (CPU), {ratios['wall']:.2f}x (wall)")


def _peak_new_bytes(fn) -> int:
    """Max over the profiled call of the live bytes of tensors created during it (CPU)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    created = set()
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            created.add(key)
            live += size
        elif action == Action.DESTROY and key in created:
            live -= size
        peak = max(peak, live)
    return peak


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward during the call (sum of packs)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def bench_memory(learner, rounds: int) -> None:
    _, full, adv, valid = prepared(learner)
    cfg = learner.recipe.grpo.decoder

    def with_beta(beta):
        def run():
            cfg.beta = beta
            update(learner, full, adv, valid)
        return run

    on, off = with_beta(0.04), with_beta(0.0)
    on(), off()  # warm-up: optimiser state exists before anything is measured
    peaks = {"beta=0.04 (KL on)": [], "beta=0 (KL off)": []}
    for _ in range(rounds):
        peaks["beta=0.04 (KL on)"].append(_peak_new_bytes(on))
        peaks["beta=0 (KL off)"].append(_peak_new_bytes(off))
    saved = {"beta=0.04 (KL on)": _saved_bytes(on), "beta=0 (KL off)": _saved_bytes(off)}
    cfg.beta = 0.04
    print(f"\n(c) peak memory of one decoder update, all {STEPS} steps, {B * G} trajectories")
    for name in peaks:
        print(f"  {name:20s} peak allocated {max(peaks[name]) / 2**20:8.2f} MiB "
              f"(rounds: {', '.join(f'{p / 2**20:.2f}' for p in peaks[name])})   "
              f"autograd-saved {saved[name] / 2**20:.2f} MiB")
    params = sum(p.numel() * p.element_size() for p in learner.models.decoder.transformer.parameters())
    print(f"  (a second copy of the decoder transformer would add {params / 2**20:.2f} MiB)")
    r = max(peaks["beta=0.04 (KL on)"]) / max(peaks["beta=0 (KL off)"])
    print(f"  ratio KL on / off = {r:.3f}   (target <= 1.05);  autograd-saved ratio "
          f"{saved['beta=0.04 (KL on)'] / saved['beta=0 (KL off)']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--only", choices=["a", "b", "c"], action="append", help="run only these parts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: CPU time is a clean measure of work on a shared machine)")
    args = parser.parse_args()
    parts = args.only or ["a", "b", "c"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cuda available: {torch.cuda.is_available()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    from rl.learner import Learner

    learner = Learner(bench_recipe())
    torch.set_num_threads(args.threads)  # in case DeepSpeed's start changed it
    if "a" in parts:
        bench_rollout(learner.models, args.repeats)
    if "b" in parts:
        bench_update(learner, args.repeats)
    if "c" in parts:
        bench_memory(learner, rounds=2)


if __name__ == "__main__":
    main()
