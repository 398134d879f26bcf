"""Run outputs: `metrics.jsonl` (one flat JSON object per step), TensorBoard, the reward plot, and
the completions table (`completions.jsonl` and a TensorBoard text table).

TensorBoard tags are grouped by prefix (CleanRL's manner): `reward/`, `rewards/`, `loss/`, `policy/`,
`caption/`, `time/`; metrics.jsonl keeps the flat keys (`reward_mean`, `loss`, ...). Each reward
function's mean and std are `reward_<name>_mean` / `reward_<name>_std` there and
`rewards/<name>/mean` / `rewards/<name>/std` in TensorBoard (TRL 1.16 GRPOTrainer's tags).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

TAGS = {
    "reward_mean": "reward/mean", "reward_std": "reward/std", "loss": "loss/total", "kl": "policy/kl",
    "clip_frac": "policy/clip_frac", "entropy": "policy/entropy", "zero_var_frac": "reward/zero_var_frac",
    "caption_len_mean": "caption/len_mean", "caption_len_min": "caption/len_min",
    "caption_len_max": "caption/len_max", "caption/truncated_frac": "caption/truncated_frac",
    "sampling/is_ratio_mean": "sampling/is_ratio_mean", "sampling/is_ratio_min": "sampling/is_ratio_min",
    "sampling/is_ratio_max": "sampling/is_ratio_max", "seconds": "time/step_seconds", "grad_norm": "loss/grad_norm",
    "ratio_mean": "policy/ratio_mean",
}

# reward_<name>_mean / reward_<name>_std (reward_stats) -> rewards/<name>/mean|std
_PER_REWARD = re.compile(r"reward_(.+)_(mean|std)")
# judge_<name>_contra_frac / judge_<name>_<group>_coverage (rewards.actors.judge_details) -> judge/<name>/...
_JUDGE = re.compile(r"judge_(.+)_(contra_frac|user_coverage|detail_coverage|supplementary_coverage)")


def tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl key (None: not a scalar curve)."""
    if key in TAGS:
        return TAGS[key]
    if (m := _PER_REWARD.fullmatch(key)) is not None:
        return f"rewards/{m.group(1)}/{m.group(2)}"
    if (m := _JUDGE.fullmatch(key)) is not None:
        return f"judge/{m.group(1)}/{m.group(2)}"
    return None


def reward_stats(per_reward: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """Each reward function's mean and std over the step's present scores (None: no score):
    {reward_<name>_mean, reward_<name>_std}, as TRL 1.16 logs rewards/<name>/mean (nanmean) and
    rewards/<name>/std (nanstd: Bessel-corrected). Raw scores, before the weights. Differences from
    TRL: std is 0.0 with fewer than two scores (TRL: NaN), and mean is NaN with none (as TRL)."""
    out = {}
    for name, scores in per_reward.items():
        present = [float(s) for s in scores if s is not None]
        mean = sum(present) / len(present) if present else float("nan")
        var = sum((x - mean) ** 2 for x in present) / (len(present) - 1) if len(present) > 1 else 0.0
        out[f"reward_{name}_mean"], out[f"reward_{name}_std"] = mean, math.sqrt(var)
    return out


def completions_table(step: int, image_ids: Sequence[str], captions: Sequence[str], group_size: int,
                      per_reward: Mapping[str, Sequence[float | None]], advantages: Sequence[float],
                      limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of the completions table of one encoder step (TRL's log_completions table: prompt,
    completion, one column per reward, advantage): one per caption, image-major (caption r is of
    image r // group_size), the first `limit` (None: all)."""
    n = len(captions)
    if len(image_ids) * group_size != n or len(advantages) != n:
        raise ValueError(f"{len(image_ids)} images x G={group_size} != {n} captions / {len(advantages)} advantages")
    rows = []
    for r in range(n if limit is None else min(limit, n)):
        rewards = {name: (None if scores[r] is None else float(scores[r])) for name, scores in per_reward.items()}
        rows.append({"step": step, "image_id": image_ids[r // group_size], "caption": captions[r],
                     "rewards": rewards, "advantage": float(advantages[r])})
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `completions_table` rows (TensorBoard renders text summaries as Markdown)."""
    names = list(rows[0]["rewards"]) if rows else []
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    num = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
    lines = ["| image | caption | " + " | ".join(names + ["advantage"]) + " |",
             "|" + "---|" * (len(names) + 3)]
    lines += [f"| {cell(r['image_id'])} | {cell(r['caption'])} | "
              + " | ".join([num(r["rewards"][k]) for k in names] + [num(r["advantage"])]) + " |" for r in rows]
    return "\n".join(lines)


class MetricsLogger:
    def __init__(self, out_dir: str, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None, purge_step: int | None = None):
        """`purge_step` (on resume): TensorBoard drops a killed run's events at steps >= it, so
        the curves match metrics.jsonl."""
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.completions_path = os.path.join(out_dir, "completions.jsonl")
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
            self.wandb.log({tag(k) or k: v for k, v in row.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=row["step"])
        if self.writer is not None:
            step = row["step"]
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    if (name := tag(key)) is not None:
                        self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def log_completions(self, rows: list[dict[str, Any]]) -> None:
        """Append `completions_table` rows to completions.jsonl (one JSON object per caption), and
        write them as a TensorBoard text table (tag `completions`) and a wandb table."""
        if not rows:
            return
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        step = rows[0]["step"]
        if self.writer is not None:
            self.writer.add_text("completions", _markdown(rows), step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            names = list(rows[0]["rewards"])
            table = wandb.Table(columns=["step", "image_id", "caption", *names, "advantage"],
                                data=[[r["step"], r["image_id"], r["caption"], *(r["rewards"][k] for k in names),
                                       r["advantage"]] for r in rows])
            self.wandb.log({"completions": table}, step=step)

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
