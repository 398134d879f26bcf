"""Unified-Bench (UAE sec. 3) on the shapes world or any image set: caption, regenerate, compare.

    python -m rl.eval unified-bench --checkpoint runs/tiny --split heldout      # a run: its newest checkpoint
    python -m rl.eval unified-bench --checkpoint runs/tiny/checkpoints/step-000040 --split heldout
    python -m rl.eval unified-bench --checkpoint none                           # the embedded default before RL
    python -m rl.eval unified-bench --checkpoint DIR --baseline before.json --out after.json
    python -m rl.eval unified-bench --checkpoint runs/x --data my_images/ --backbone dino=timm:vit_small_patch14_dinov2.lvd142m@pretrained
    python -m rl.eval unified-bench --checkpoint runs/x --data sayakpaul/coco-30-val-2014 --split train --n 100

`--data` takes what `data.source` takes (an image folder, a saved `datasets` folder, a hub dataset
name; `--split`, `--image-column`); without it the images are the shapes world's `--split`.

The protocol of UAE sec. 3 on generated images with known ground truth: each image is captioned
greedily by the encoder under the UAE prompt, the decoder regenerates an image from that caption
alone (ODE, `rollout.trajectory.eval_steps`, the image's fixed noise), and the reconstruction is
compared with the source by every configured backbone:

- `clip`   the reward's backbone (the one RL optimised against);
- `clip_b` with pretraining, a second shapes-world CLIP trained from another seed on other scenes
           (never a reward: a check that gains are not an artefact of one backbone);
- every entry of `eval.backbones` (open_clip names, `timm:<name>`, or tiny-CLIP .safetensors).

The unified score is the mean over backbones of the mean cosine (UAE table 1's "Overall"). On the
shapes world the caption is also scored exactly: element coverage (recall of the ground-truth facts),
precision (share of stated facts that are true), from the generated world's own per-caption metrics
(rl.data `Generator.caption_metrics`, `data.generator`); on any image set, caption length in words. A table is printed and everything, per image too, is written as JSON; `--grid`
writes a source | caption | reconstruction PNG.

Backbones (`eval.backbones`, or `--backbone NAME=SPEC`): SPEC is an open_clip name with an optional
`@pretrained` tag (`ViT-B-32@openai`; no tag: random weights), `timm:<name>` with `@pretrained` for
timm's default weights (e.g. DINOv2: `timm:vit_small_patch14_dinov2.lvd142m@pretrained`; no tag:
random weights, what the tests use) and `?key=value&...` arguments for `timm.create_model`
(`timm:vit_small_patch14_dinov2?img_size=56`), or a tiny-CLIP `.safetensors`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("unified_grpo")

CAPTION_METRICS = ("coverage", "precision", "caption_length")


# ---------------------------------------------------------------------------------------------
# Arithmetic (pure; tests/rl/test_eval.py)
# ---------------------------------------------------------------------------------------------


def mean(xs: Sequence[float]) -> float:
    """Plain mean; NaN for an empty list (never a silent 0)."""
    return sum(xs) / len(xs) if len(xs) else float("nan")


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-image rows -> the benchmark's numbers.

    rows[i] = {"similarity": {backbone: cosine}, "truth_similarity": {backbone: cosine} (optional),
               "coverage": c, "precision": p, "caption_length": words, ...}: the caption metrics are
    whatever numbers the data's per-caption scores give (rl.data.caption_metrics).
    Returns {"n", "sim/<backbone>" (mean cosine per backbone), "unified" (mean over backbones of
    those means), "truth_sim/<backbone>" and "truth_unified" (the same for renders of the true
    caption, when rows have them: the decoder's fidelity whatever the encoder says), then the mean
    of every numeric caption metric over images, except counted pairs: `X_stated` and `X_correct`
    become `X_accuracy` = sum of correct / sum of stated (NaN when nothing is stated)}.
    """
    backbones = list(rows[0]["similarity"]) if rows else []
    out: dict[str, float] = {"n": len(rows)}
    for name in backbones:
        out[f"sim/{name}"] = mean([r["similarity"][name] for r in rows])
    out["unified"] = mean([out[f"sim/{name}"] for name in backbones])
    if rows and "truth_similarity" in rows[0]:
        for name in backbones:
            out[f"truth_sim/{name}"] = mean([r["truth_similarity"][name] for r in rows])
        out["truth_unified"] = mean([out[f"truth_sim/{name}"] for name in backbones])
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))] if rows else list(CAPTION_METRICS)
    counted = {k[: -len("_stated")] for k in keys if k.endswith("_stated") and k[: -len("_stated")] + "_correct" in keys}
    for key in keys:
        if key.endswith(("_stated", "_correct")) and key.rsplit("_", 1)[0] in counted:
            continue
        out[key] = mean([float(r[key]) for r in rows])
    for name in sorted(counted):
        stated = sum(r[f"{name}_stated"] for r in rows)
        out[f"{name}_accuracy"] = sum(r[f"{name}_correct"] for r in rows) / stated if stated else float("nan")
    return out


def compare(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before for every numeric key the two summaries share (except n)."""
    return {k: after[k] - before[k] for k in before
            if k != "n" and k in after and isinstance(before[k], (int, float))}


def format_table(columns: dict[str, dict[str, float]], title: str = "") -> str:
    """Summaries side by side: one column per summary (e.g. before / after / delta), one row per
    metric, in the order of the first summary."""
    names = list(columns)
    keys = [k for k in next(iter(columns.values())) if k != "n"] if columns else []
    width = max([len(k) for k in keys] + [10])
    lines = [title] if title else []
    lines.append(f"{'metric':{width}s} " + " ".join(f"{n:>10s}" for n in names))
    for k in keys:
        cells = []
        for n in names:
            v = columns[n].get(k, float("nan"))
            cells.append(f"{v:>+10.4f}" if n == "delta" else f"{v:>10.4f}")
        lines.append(f"{k:{width}s} " + " ".join(cells))
    return "\n".join(lines)


def score_captions(captions: Sequence[str], examples, recipe=None) -> list[dict[str, float]]:
    """Per-caption scores (rl.data.caption_metrics): with `recipe`, exact ones against the ground
    truth of its generated world (`data.generator`, e.g. coverage and precision in the shapes world);
    without, the caption length in words (any image set)."""
    from rl.data import caption_metrics, load_generator

    return caption_metrics(captions, examples, load_generator(recipe.data.generator) if recipe is not None else None)


# ---------------------------------------------------------------------------------------------
# Models and backbones
# ---------------------------------------------------------------------------------------------


EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def resolve_checkpoint(path: str | None) -> str | None:
    """A checkpoint folder as given; a run directory (output.dir, holding checkpoints/) or a
    checkpoints/ folder -> its newest complete checkpoint (rl.checkpoint.find_latest). FileNotFoundError
    naming the folder when there is none."""
    if path is None:
        return None
    from rl.checkpoint import ADAPTERS, find_latest

    p = Path(path)
    if (p / ADAPTERS).is_file():
        return str(p)
    for root in (p / "checkpoints", p):
        if root.is_dir():
            latest, _ = find_latest(str(root))
            if latest is not None:
                log.info("eval: %s -> its newest complete checkpoint %s", path, latest)
                return latest
    raise FileNotFoundError(f"--checkpoint {path}: neither a checkpoint (no {ADAPTERS}) nor a run directory with a "
                            "complete checkpoint under checkpoints/")


def resolve_recipe(checkpoint: str | None, recipe_path: str | None) -> str | None:
    """The recipe to build the models from: --recipe when given; else the checkpoint's own (None here);
    `--checkpoint none` alone means the embedded default (recipes/tiny.yaml), the README's command."""
    if recipe_path is not None or checkpoint is not None:
        return recipe_path
    if not EMBEDDED_DEFAULT.is_file():
        raise ValueError("--checkpoint none needs --recipe RECIPE (the models before RL)")
    log.info("eval: --checkpoint none without --recipe: the embedded default %s", EMBEDDED_DEFAULT)
    return str(EMBEDDED_DEFAULT)


def load_for_eval(checkpoint: str | None, recipe_path: str | None = None, overrides: Sequence[str] = ()):
    """(recipe, trainable weights or None). A checkpoint folder carries its recipe (recipe.yaml,
    with the pretrained paths it ran with) and its adapters; `None` means the pretrained models
    before RL, from `recipe_path` (pretrained first if missing; the embedded default when None)."""
    from rl.config import PRETRAIN_PROVIDERS, Recipe, load_recipe
    from rl.named import resolve

    recipe_path = resolve_recipe(checkpoint, recipe_path)
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, list(overrides))
        if recipe.pretrain.enabled:  # the recipe's pretrained models (pretrain.provider), built if missing
            resolve(recipe.pretrain.provider, PRETRAIN_PROVIDERS, "pretrain.provider")(recipe)
    else:
        import yaml

        from rl.checkpoint import RECIPE_YAML

        recipe = Recipe.model_validate(yaml.safe_load((Path(checkpoint) / RECIPE_YAML).read_text()))
    if checkpoint is None:
        return recipe, None
    from rl.checkpoint import load_adapters

    return recipe, load_adapters(checkpoint)


def eval_backbones(recipe) -> dict[str, dict[str, Any]]:
    """Extra backbones as `ClipReward(extra_backbones=...)` specs: `eval.backbones`, where the
    pretraining provider puts the second pretrained CLIP (`clip_b`). A missing tiny-CLIP file is
    skipped with a warning."""
    from rewards.clip import tiny_clip_config

    size = recipe.models.decoder.image_size
    out: dict[str, dict[str, Any]] = {}
    for name, spec in recipe.eval.backbones.items():
        if spec.endswith(".safetensors") and not os.path.exists(spec):
            log.warning("eval: backbone %s: %s is missing; scoring without it", name, spec)
        elif spec.endswith(".safetensors"):
            out[name] = {"model": tiny_clip_config(image_size=size), "checkpoint": spec}
        else:
            out[name] = parse_backbone(spec)
    return out


def parse_backbone(spec: str) -> dict[str, Any]:
    """`MODEL[@TAG][?k=v&...]` -> build_clip kwargs: open_clip name (TAG: its pretrained tag) or
    `timm:<name>` (TAG `pretrained`: timm's default weights); no TAG: random weights; `?k=v` are
    timm.create_model arguments (values read as YAML: img_size=56 is an int)."""
    import yaml

    spec, _, query = spec.partition("?")
    model, _, tag = spec.partition("@")
    out: dict[str, Any] = {"model": model, "pretrained": tag or None}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    if not tag:
        log.warning("eval: backbone %s has no @pretrained tag: random weights", model)
    return out


def build_scorer(recipe, device: str = "cpu"):
    """The reward's CLIP plus every evaluation backbone, as one ClipReward."""
    from rl.learner import make_clip_reward

    return make_clip_reward(recipe, device, extra_backbones=eval_backbones(recipe))


def heldout_examples(recipe, n: int, split: str = "heldout"):
    """`n` examples of `split` from the recipe's generated world (`data.generator`), seeded by
    `eval.seed`, at the decoder's image size."""
    from rl.data import load_generator

    return load_generator(recipe.data.generator).examples(
        n, recipe.eval.seed, split, size=recipe.models.decoder.image_size, max_objects=recipe.data.generate.max_objects)


def evaluate(worker, scorer, examples, seed: int = 0, recipe=None) -> tuple[list[dict[str, Any]], list]:
    """(rows, renders) for `examples` (a generated world's, with `recipe` naming it; or rl.data
    ImageRecords with `recipe` None): greedy caption, ODE render at eval_steps from the image's fixed
    noise, similarity with every backbone, caption scores (score_captions: exact ones against the
    generated world's ground truth; length elsewhere). With ground truth (`recipe`), the true FULL
    caption is rendered too, from the same noise, and scored the same way (`truth_similarity`): the
    decoder's own fidelity, which RL's decoder stage should raise (issue 18).
    `worker` is a rollouts.actors.RolloutWorker, `scorer` a ClipReward (build_scorer)."""
    images, ids = [e.image for e in examples], [e.image_id for e in examples]
    captions, renders = worker.eval_render(images, ids, seed)
    sims = scorer.scores_all_backbones(images, renders)  # backbone -> (N,)
    scores = score_captions(captions, examples, recipe)
    truth_sims = None
    if recipe is not None:
        truth_renders = worker.eval_render_texts([e.captions["full"] for e in examples], ids)
        truth_sims = scorer.scores_all_backbones(images, truth_renders)
    rows = []
    for i, (e, c, s) in enumerate(zip(examples, captions, scores)):
        truth = {"truth": e.captions["full"]} if recipe is not None else {}
        rows.append({"image_id": e.image_id, "caption": c, **truth, **s,
                     "similarity": {name: float(v[i]) for name, v in sims.items()}})
        if truth_sims is not None:
            rows[-1]["truth_similarity"] = {name: float(v[i]) for name, v in truth_sims.items()}
    return rows, renders


def data_examples(recipe, source: str, split: str, n: int | None, image_column: str = "image") -> list:
    """The first `n` images of a data source (rl.data: folder, saved dataset, hub name), resized to
    the decoder's size like training images. rl.data.DataError names what is wrong."""
    from rl.data import load_dataset_from_config

    ds = load_dataset_from_config(source, image_column=image_column, split=split, limit=n,
                                  image_size=recipe.models.decoder.image_size)
    return list(ds.records)


def run_unified_bench(checkpoint: str | None, recipe_path: str | None = None, *, split: str | None = None,
                      n: int | None = None, overrides: Sequence[str] = (), grid: str | None = None,
                      data: str | None = None, image_column: str = "image",
                      backbones: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole benchmark; returns {"summary", "rows", ...} (what --out writes). `data`: any image
    set (rl.data sources) instead of the shapes world; `backbones`: extra ones, name -> spec."""
    import torch

    from rollouts.actors import RolloutWorker

    t0 = time.time()
    if data:  # a wrong --data fails here, before any model is built (or pretrained)
        from rl.data import check_source

        check_source(data, image_column)
    checkpoint = resolve_checkpoint(checkpoint)
    recipe, weights = load_for_eval(checkpoint, recipe_path, overrides)
    recipe.device = "cpu" if not torch.cuda.is_available() else recipe.device
    if backbones:
        recipe.eval.backbones = {**recipe.eval.backbones, **backbones}
    split = split or ("train" if data else "heldout")
    if data:
        examples = data_examples(recipe, data, split, n or recipe.eval.n, image_column)
    else:
        examples = heldout_examples(recipe, n or recipe.eval.n, split)
    worker = RolloutWorker(recipe)
    if weights is not None:
        worker.set_weights(weights, version=-1)
    scorer = build_scorer(recipe, str(worker.models.device))
    rows, renders = evaluate(worker, scorer, examples, seed=recipe.eval.seed, recipe=recipe if data is None else None)
    if grid:
        k = recipe.eval.grid_images or 4
        scores = [r["coverage"] for r in rows[:k]] if data is None else None
        render_grid([e.image for e in examples[:k]], [r["caption"] for r in rows[:k]], renders[:k], grid,
                    title=f"{checkpoint or 'before RL'}", scores=scores)
    return {"benchmark": "unified-bench", "world": recipe.data.generator if data is None else "data", "data": data, "split": split,
            "checkpoint": checkpoint or "none", "eval_steps": recipe.rollout.trajectory.eval_steps,
            "backbones": list(rows[0]["similarity"]), "summary": summarize(rows), "seconds": round(time.time() - t0, 1),
            "rows": rows}


# ---------------------------------------------------------------------------------------------
# The grid: source | caption | reconstruction
# ---------------------------------------------------------------------------------------------


def render_grid(sources, captions: Sequence[str], renders, out_png: str, title: str = "",
                scores: Sequence[float] | None = None) -> None:
    """One row per image: the source, its caption (wrapped; with its coverage when given) and the
    reconstruction from that caption."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(sources)
    fig, axes = plt.subplots(k, 3, figsize=(8, 1.9 * k + 0.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.6, 1]})
    for i in range(k):
        axes[i][0].imshow(sources[i], interpolation="nearest")
        axes[i][2].imshow(renders[i], interpolation="nearest")
        text = "\n".join(textwrap.wrap(captions[i] or "(empty)", 44))
        if scores is not None:
            text += f"\n[coverage {scores[i]:.2f}]"
        axes[i][1].text(0.0, 0.5, text, va="center", ha="left", fontsize=8, family="monospace")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][1].axis("off")
    axes[0][0].set_title("source", fontsize=9)
    axes[0][1].set_title("caption", fontsize=9)
    axes[0][2].set_title("reconstruction", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ub = sub.add_parser("unified-bench", help="caption -> regenerate -> compare (UAE sec. 3)")
    ub.add_argument("--checkpoint", required=True,
                    help="a checkpoint folder (runs/x/checkpoints/step-N), a run directory (runs/x: its newest "
                         "complete checkpoint), or `none` for the models before RL")
    ub.add_argument("--recipe", help="recipe YAML (default: the checkpoint's recipe.yaml; with --checkpoint none, "
                                     "the embedded default recipes/tiny.yaml)")
    ub.add_argument("--data", help="score these images instead of the shapes world: an image folder, a saved "
                                   "`datasets` folder or a hub dataset name (what data.source takes)")
    ub.add_argument("--image-column", default="image", help="image column of a `datasets` --data (default image)")
    ub.add_argument("--split", help="shapes split train|val|heldout (default heldout), or the --data split (default train)")
    ub.add_argument("--n", type=int, help="images (default: eval.n of the recipe)")
    ub.add_argument("--backbone", action="append", default=[], metavar="NAME=SPEC",
                    help="an extra similarity backbone (repeatable): open_clip MODEL[@TAG], timm:NAME[@pretrained]"
                         "[?k=v], or a tiny-CLIP .safetensors; no tag: random weights")
    ub.add_argument("--out", help="write the JSON here (default: <checkpoint>/unified_bench_<split>.json, or stdout only for none)")
    ub.add_argument("--grid", help="also write a source | caption | reconstruction PNG here")
    ub.add_argument("--baseline", help="a JSON written earlier (e.g. before RL): print before / after / delta")
    ub.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field of --recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
    if args.split is not None and args.data is None and args.split not in ("train", "val", "heldout"):
        print(f"error: --split {args.split!r}: the shapes world's splits are train, val, heldout", file=sys.stderr)
        return 2
    backbones = {}
    for item in args.backbone:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            print(f"error: --backbone {item!r}: expected NAME=SPEC", file=sys.stderr)
            return 2
        backbones[name] = spec
    try:
        result = run_unified_bench(checkpoint, args.recipe, split=args.split, n=args.n, overrides=args.set,
                                   grid=args.grid, data=args.data, image_column=args.image_column, backbones=backbones)
    except (ValueError, FileNotFoundError) as e:  # RecipeError and rl.data's DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"data {args.data}" if args.data else "shapes world"
    title = f"Unified-Bench, {where}, split {result['split']}, n={result['summary']['n']}, checkpoint {result['checkpoint']}"
    columns = {"score": result["summary"]}
    if args.baseline:
        before = json.loads(Path(args.baseline).read_text())["summary"]
        columns = {"before": before, "after": result["summary"], "delta": compare(before, result["summary"])}
    print(format_table(columns, title))
    for r in result["rows"][:3]:
        print(f"  {r['image_id']}: {r['caption']!r}" + (f" (coverage {r['coverage']:.2f})" if "coverage" in r else ""))
    checkpoint = result["checkpoint"] if result["checkpoint"] != "none" else None
    out = args.out or (os.path.join(checkpoint, f"unified_bench_{result['split']}.json") if checkpoint else None)
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
