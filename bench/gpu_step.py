"""One step of each stage of recipes/unified_grpo.yaml on the published architectures, in one process.

    python bench/gpu_step.py                                  # a GPU: full depth, bf16, 1024 px (~10 min)
    python bench/gpu_step.py --depth 1 --device cpu --image-size 64 --encoder-image-size 56 \
        --batch-size 2 --group-size 2 --max-new-tokens 8     # the CPU smoke run the tests make

Builds Qwen2.5-VL-3B-Instruct, SD3.5-large (transformer + VAE) and CLIP ViT-L/14 with random weights
from their configs in code (`models.*.random_init`, no Hub download), at full depth or `--depth N`,
then runs the learner and a rollout worker over the same modules in this process (no Ray: a GPU
machine may lack it), exactly as `resources.colocate: true` does: a decoder warm-up step, a
cold-start step, an encoder GRPO step (caption groups, renders, CLIP reward, update) and a decoder GRPO step (SDE trajectories,
CLIP reward, update), with the recipe's micro-batches, ZeRO stage (one rank), activation
checkpointing and bf16. Prints per stage the seconds of the rollout and of the update and the peak
of `torch.cuda.max_memory_allocated` (on CPU: the process's peak RSS, which only grows).
Needs torch, transformers, peft, diffusers, deepspeed, open_clip and pydantic. Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_for(args):
    """recipes/unified_grpo.yaml with random weights, this process's device and the sizes asked for."""
    from rl.config import load_recipe

    cuda = args.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    depth = args.depth  # None: the published depth
    sets = [
        f"device={args.device}",
        f"models.encoder.dtype={dtype}", f"models.decoder.dtype={dtype}",
        f"models.encoder.random_init={{num_layers: {depth or 'null'}, vision_depth: {depth or 'null'}}}",
        f"models.decoder.random_init={{num_layers: {depth or 'null'}}}",
        "models.clip.pretrained=null", f"models.clip.random_init={{layers: {depth or 'null'}}}",
        f"models.decoder.image_size={args.image_size}",
        f"models.encoder.image_size={args.encoder_image_size or 'null'}",
        f"rollout.batch_size={args.batch_size}", f"rollout.group_size={args.group_size}",
        f"rollout.caption.max_new_tokens={args.max_new_tokens}", f"warmup.max_new_tokens={args.max_new_tokens}",
        "data.source=null",  # the generated shapes world, upscaled (random_init models only; no download)
        "schedule.warmup_steps=1",
        f"learner.bf16={str(cuda).lower()}", f"learner.zero_stage={args.zero_stage}",
        "resources.learner_workers=1", "resources.colocate=true", "ray.address=local",
        "schedule.cold_start_steps=1", "schedule.phases=[{stage: encoder, steps: 1}, {stage: decoder, steps: 1}]",
        "schedule.cycles=1",
    ]
    if args.micro_batch_size is not None:
        sets += [f"learner.micro_batch_size={args.micro_batch_size}", f"rollout.micro_batch_size={args.micro_batch_size}"]
    return load_recipe(os.path.join(ROOT, "recipes", "unified_grpo.yaml"), sets)


class Meter:
    """Seconds and peak memory of a block (CUDA: max_memory_allocated since the block began)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        else:  # ru_maxrss is KiB on Linux: the process's peak so far
            self.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.seconds = time.perf_counter() - self.t0


def run(args) -> list[dict]:
    from rl import grpo
    from rl.learner import Learner
    from rl.shapes import generate_shapes
    from rollouts.actors import RolloutWorker, image_seed

    recipe = recipe_for(args)
    device = args.device
    with Meter(device) as build:
        learner = Learner(recipe)
        worker = RolloutWorker(recipe, models=learner.models)
        clip = learner.clip()  # the reward's CLIP is the one the cold start already needs: one copy
    size = args.image_size
    records = generate_shapes(args.batch_size, seed=1)
    images = [r.image.resize((size, size)) for r in records]
    ids = [r.image_id for r in records]
    g = recipe.rollout.group_size
    rows = [{"stage": "build", "rollout_s": 0.0, "update_s": build.seconds, "peak_gib": build.peak_gib}]

    def reward(renders) -> grpo.Advantages:
        sources = [im for im in images for _ in range(g)]
        scores = clip.similarity(sources, renders, [i for i in ids for _ in range(g)])
        return grpo.group_advantages(scores, g)

    # stage 0: decoder warm-up (UAE sec. 2.2): the frozen encoder's long captions, then the flow-matching loss
    with Meter(device) as ro:
        long_captions = worker.warmup_captions(images, seed=0)
    with Meter(device) as up:
        stats = learner.train_warmup(images, long_captions, [image_seed(i) for i in ids])
    rows.append({"stage": "warmup", "rollout_s": ro.seconds, "update_s": up.seconds,
                 "peak_gib": max(ro.peak_gib, up.peak_gib), "loss": stats["loss"]})
    # stage 1: cold start
    with Meter(device) as ro:
        group = worker.cold_start_rollout(images, seed=0)
    with Meter(device) as up:
        stats = learner.train_cold_start(images, ids, group.completion_ids, group.completion_mask,
                                         [image_seed(i) for i in ids])
    rows.append({"stage": "cold_start", "rollout_s": ro.seconds, "update_s": up.seconds,
                 "peak_gib": max(ro.peak_gib, up.peak_gib), "loss": stats["loss"]})
    # stage 2: encoder GRPO
    worker.version = learner.version
    with Meter(device) as ro:
        group, renders = worker.encoder_rollout(images, ids, seed=1)
        adv = reward(renders)
    with Meter(device) as up:
        stats = learner.train_encoder(group, adv.advantages, adv.valid)
    rows.append({"stage": "encoder", "rollout_s": ro.seconds, "update_s": up.seconds,
                 "peak_gib": max(ro.peak_gib, up.peak_gib), "loss": stats["loss"]})
    # stage 3: decoder GRPO
    worker.version = learner.version
    with Meter(device) as ro:
        traj, _, renders = worker.decoder_rollout(images, seed=2)
        adv = reward(renders)
    with Meter(device) as up:
        stats = learner.train_decoder(traj, adv.advantages, adv.valid)
    rows.append({"stage": "decoder", "rollout_s": ro.seconds, "update_s": up.seconds,
                 "peak_gib": max(ro.peak_gib, up.peak_gib), "loss": stats["loss"]})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--depth", type=int, default=None, help="layers per model (None: the published depth)")
    p.add_argument("--image-size", type=int, default=1024, help="render size (SD3.5: 1024)")
    p.add_argument("--encoder-image-size", type=int, default=None, help="source size for Qwen (None: its own resizing)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=None, help="learner and rollout micro-batch (None: the recipe's)")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu with --depth 1)")
    rows = run(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}; depth {args.depth or 'published'}; {args.image_size} px; "
          f"{args.batch_size} images x {args.group_size}; ZeRO-{args.zero_stage}")
    print(f"{'stage':<11} {'rollout s':>10} {'update s':>10} {'peak GiB':>10}")
    for r in rows:
        print(f"{r['stage']:<11} {r['rollout_s']:>10.2f} {r['update_s']:>10.2f} {r['peak_gib']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
