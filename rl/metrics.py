"""Run outputs: `metrics.jsonl` (one flat JSON object per step), TensorBoard, and the reward plot.

TensorBoard tags are grouped by prefix (CleanRL's manner): `reward/`, `loss/`, `policy/`,
`caption/`, `time/`; metrics.jsonl keeps the flat keys (`reward_mean`, `loss`, ...).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

TAGS = {
    "reward_mean": "reward/mean", "reward_std": "reward/std", "loss": "loss/total", "kl": "policy/kl",
    "clip_frac": "policy/clip_frac", "entropy": "policy/entropy", "zero_var_frac": "reward/zero_var_frac",
    "caption_len_mean": "caption/len_mean", "caption_len_min": "caption/len_min",
    "caption_len_max": "caption/len_max", "caption/truncated_frac": "caption/truncated_frac",
    "sampling/is_ratio_mean": "sampling/is_ratio_mean", "sampling/is_ratio_min": "sampling/is_ratio_min",
    "sampling/is_ratio_max": "sampling/is_ratio_max", "seconds": "time/step_seconds", "grad_norm": "loss/grad_norm",
    "ratio_mean": "policy/ratio_mean",
}


class MetricsLogger:
    def __init__(self, out_dir: str, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None, purge_step: int | None = None):
        """`purge_step` (on resume): TensorBoard drops a killed run's events at steps >= it, so
        the curves match metrics.jsonl."""
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.out_dir = out_dir
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge_step)
        self.wandb = None
        if wandb_project:  # optional; the recipe check refuses a project name without wandb installed
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=config, dir=out_dir, resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb is not None:
            self.wandb.log({TAGS.get(k, k): v for k, v in row.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=row["step"])
        if self.writer is not None:
            step = row["step"]
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    if key in TAGS:
                        self.writer.add_scalar(TAGS[key], value, step)
                    elif key.startswith("reward/"):
                        self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; safe on a live run: a missing file gives [], and reading stops
    at a line still being written."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the run is writing this line
                break
    return rows


def plot_metrics(rows: list[dict[str, Any]], out_png: str) -> None:
    """Reward and caption length against step, one colour per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"warmup": "tab:green", "cold_start": "tab:gray", "encoder": "tab:blue", "decoder": "tab:orange"}
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for stage, colour in colours.items():
        pts = [r for r in rows if r.get("stage") == stage]
        if not pts:
            continue
        steps = [r["step"] for r in pts]
        axes[0].scatter(steps, [r.get("reward_mean", float("nan")) for r in pts], c=colour, s=12, label=stage)
        axes[1].scatter(steps, [r.get("caption_len_mean", float("nan")) for r in pts], c=colour, s=12, label=stage)
    axes[0].set_ylabel("reward (mean)")
    axes[1].set_ylabel("caption length (words)")
    axes[1].set_xlabel("step")
    axes[0].legend(loc="best", fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_layer_weights(rows: list[dict[str, Any]], out_png: str) -> bool:
    """The connector's layer weights alpha_i (GRAN-TED eq. 3) against step, one line per layer,
    from the rows that carry `layer_weights`. Returns False (and writes nothing) when there are none."""
    pts = [r for r in rows if r.get("layer_weights")]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in pts]
    fig, ax = plt.subplots(figsize=(8, 4))
    for i in range(len(pts[0]["layer_weights"])):
        ax.plot(steps, [r["layer_weights"][i] for r in pts], marker=".", label=f"layer {i + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("layer weight (softmax)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True
