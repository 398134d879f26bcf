"""Caption GRPO (stage 2) of this stack against TRL's GRPOTrainer, one process, same everything.

    cd /work/main && . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python bench/caption_grpo_vs_trl.py                 # 1 warm-up + 10 timed steps of each
    python bench/caption_grpo_vs_trl.py --only ours     # one side only (profiling)
    python bench/caption_grpo_vs_trl.py --impl trl --threads 1 --steps 10   # one configuration

Each run ends with one JSON line per side (impl, threads, steps, wall/cpu s/step mean and median,
reward per step). For a fair ratio run ONE configuration per fresh process (`--impl ours|trl`),
alternating the sides (ours, trl, ours, trl ...) and taking medians: in one process the second side
inherits the first's allocator, thread pools and torch.distributed state, and a loaded machine
swings single runs by 10x.

Both sides get the same tiny Qwen2.5-VL (same seed, same base weights), the same LoRA (rank,
alpha, targets), the same images in the same order, the same group size G, caption length,
temperature, beta, learning rate, clip epsilon, loss aggregation (per-sequence mean, TRL's
`loss_type="grpo"`), advantage scaling (group std), suppressed tokens, and the same reward
function object. One step = B images x G captions: generate, reward, advantages, one optimiser
update. The warm-up step is excluded from the timing of both; setup is never timed.

"This stack" is `RolloutWorker.captions` + reward + `rl.grpo.group_advantages` +
`Learner.train_encoder`, in-process (no Ray), the worker colocated on the learner's modules.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from rewards.api import completion_text
from rl.shapes import COLORS, caption_words, generate_shapes

COLOUR_WORDS = frozenset(COLORS)


def colour_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    """Fraction of a caption's words that are colour words (deterministic; TRL's signature).

    `completions` are strings (ours) or TRL's conversational [{"role": "assistant", "content": ...}].
    """
    out = []
    for c in completions:
        text = completion_text(c)
        if not isinstance(text, str):  # structured content blocks
            text = " ".join(b.get("text", "") for b in text)
        words = [w for w in caption_words(text) if w[0].isalnum()]
        out.append(sum(w in COLOUR_WORDS for w in words) / len(words) if words else 0.0)
    return out


# Renders exactly `rl.models.encoder.CHAT_TEMPLATE`, so TRL's prompts equal ours token for token.
JINJA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_recipe(args):
    from rl.config import Recipe

    return Recipe.model_validate({
        "device": "cpu",
        "seed": args.seed,
        "models": {"encoder": {"adapter": {"r": args.lora_r, "alpha": 2 * args.lora_r}},
                   "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": args.images, "group_size": args.group_size,
                    "caption": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}},
        "grpo": {"encoder": {"lr": args.lr, "beta": args.beta, "epsilon": 0.2},
                 "loss_agg": "sequence_mean", "scale": "group", "num_iterations": 1},
    })


def step_images(records, step: int, b: int):
    return records[step * b:(step + 1) * b]


# ----------------------------------------------------------------------------------------------
# this stack
# ----------------------------------------------------------------------------------------------
def run_ours(args, records) -> tuple[list[float], list[float]]:
    from rl import grpo
    from rl.learner import Learner
    from rollouts.actors import RolloutWorker

    recipe = make_recipe(args)
    torch.manual_seed(recipe.seed)
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)
    g = recipe.rollout.group_size
    times, cpu, rewards = [], [], []
    for step in range(args.steps + 1):
        batch = step_images(records, step, args.images)
        t0, c0 = time.perf_counter(), time.process_time()
        worker.version = learner.version  # colocated: a weight sync is a version bump
        # step 1. rollout: G captions per image (on-policy: not scored, as encoder_rollout and TRL)
        group = worker.captions([r.image for r in batch], g, seed=args.seed + step, score=worker.score_captions)
        # step 2. reward and group-relative advantages
        r = colour_reward(completions=group.captions)
        adv = grpo.group_advantages(r, g, scale=recipe.grpo.scale, clip=recipe.grpo.adv_clip)
        # step 3. policy update
        learner.train_encoder(group, adv.advantages, adv.valid)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rewards.append(statistics.fmean(r))
    return times[1:], cpu[1:], rewards


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------
def run_trl(args, records) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl.models.encoder import UAE_CAPTION_PROMPT, USER_INSTRUCTION
    from rl.models.unified import build_models

    recipe = make_recipe(args)
    m = recipe.models.encoder
    enc = build_models(recipe, torch.device("cpu")).encoder  # the same PeftModel as our side's
    model = enc.model
    enc.processor.chat_template = JINJA_TEMPLATE
    enc.tokenizer.chat_template = JINJA_TEMPLATE

    prompt = [{"role": "system", "content": UAE_CAPTION_PROMPT}, {"role": "user", "content": USER_INSTRUCTION}]
    n = args.images * (args.steps + 1)
    # Encoder.prepare resizes to the encoder's square size first; do the same here.
    size = m.image_size
    data = Dataset.from_dict({
        "prompt": [prompt] * n,
        "image": [r.image.convert("RGB").resize((size, size)) for r in records[:n]],
    })

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self._t0, self._c0 = [], [], 0.0, 0.0

        def on_step_begin(self, a, state, control, **kw):
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self._t0)
            self.cpu.append(time.process_time() - self._c0)

    g = args.group_size
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.images * g,  # TRL counts completions: B images x G
        gradient_accumulation_steps=1,
        num_generations=g,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=recipe.grpo.max_grad_norm,
        max_steps=args.steps + 1, num_iterations=1, shuffle_dataset=False,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        disable_dropout=True, log_completions=False, seed=args.seed, dataloader_num_workers=0,
        # The same tokens ours never samples (vision placeholders, chat control).
        generation_kwargs={"suppress_tokens": enc.suppressed_ids},
    )
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=colour_reward, args=cfg, train_dataset=data,
                          processing_class=enc.processor, callbacks=[timer])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return timer.times[1:], timer.cpu[1:], rewards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps (one warm-up step runs first)")
    p.add_argument("--images", type=int, default=2, help="B: images per step")
    p.add_argument("--group-size", type=int, default=8, help="G: captions per image")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", "--impl", dest="only", choices=["ours", "trl", "both"], default="both",
                   help="which side(s) to run in this process (--impl: one configuration per process)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records = generate_shapes(args.images * (args.steps + 1), seed=args.seed + 100)

    results = {}
    # TRL first: the Learner starts torch.distributed (gloo), which accelerate would then pick up.
    if args.only in ("trl", "both"):
        results["trl"] = run_trl(args, records)
    if args.only in ("ours", "both"):
        results["ours"] = run_ours(args, records)

    print(f"\nsettings: B={args.images} images x G={args.group_size}, max_new_tokens={args.max_new_tokens}, "
          f"T={args.temperature}, beta={args.beta}, lr={args.lr}, LoRA r={args.lora_r}, "
          f"threads={args.threads}, steps={args.steps} (+1 warm-up)")
    print(f"versions: torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"trl {__import__('trl').__version__}, peft {__import__('peft').__version__}")
    # Wall time is what the target is about; CPU time (this process, all threads) is printed too
    # because on a shared machine wall time also counts waiting for a core.
    for name, (times, cpu, rewards) in results.items():
        print(f"{name:>4}: wall {statistics.fmean(times):.3f} s/step (median {statistics.median(times):.3f}), "
              f"cpu {statistics.fmean(cpu):.3f} s/step; reward/step (warm-up first): "
              f"{' '.join(f'{r:.3f}' for r in rewards)}")
    for name, (times, cpu, rewards) in results.items():
        print(json.dumps({"impl": name, "threads": args.threads, "steps": args.steps, "images": args.images,
                          "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                          "wall_s_per_step": statistics.fmean(times), "wall_median": statistics.median(times),
                          "cpu_s_per_step": statistics.fmean(cpu), "cpu_median": statistics.median(cpu),
                          "rewards": [round(r, 4) for r in rewards]}))
    if len(results) == 2:
        wall = statistics.fmean(results["ours"][0]) / statistics.fmean(results["trl"][0])
        cpu = statistics.fmean(results["ours"][1]) / statistics.fmean(results["trl"][1])
        print(f"ratio ours/trl: wall {wall:.2f}x, cpu {cpu:.2f}x  (issue 16 target: <= 0.50x at 1 thread)")


if __name__ == "__main__":
    main()
