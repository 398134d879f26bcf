"""A picture of the pretrained shapes-world models before any RL (issue 18, item 2).

    python bench/pretrained_grid.py recipes/tiny.yaml                      # -> bench/pretrained_grid.png
    python bench/pretrained_grid.py recipes/tiny.yaml --n 8 --out grid.png --set pretrain.encoder.steps=2000

One row per held-out scene (the decoder probe's scenes: `rl.shapes.pretrain.decoder_probe`, seed 999):
the source, the encoder's greedy caption (its kinds marked right or wrong), the ground-truth FULL
caption, and the decoder's render of that true caption (from the scene's own noise, as RL renders),
with its cosine to the source under the independent CLIP (`clip_eval`, never the reward's). The
title carries the done.json metrics of the models: kind accuracy / recall of greedy captions
(rl.shapes.pretrain.encoder_probe) and the independent-CLIP similarity of renders of true FULL captions
against the baseline of another scene's caption (decoder_probe).

The models are the ones `rl.train` would use (`rl.shapes.pretrain.prepare_recipe`): the shipped
ones (rl/shapes/pretrained/) when the recipe's pretraining settings are theirs, else the cache's,
missing parts pretrained first; `--cache DIR` takes the parts in DIR instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML with a `pretrain:` section, e.g. recipes/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe field")
    parser.add_argument("--n", type=int, default=6, help="scenes (rows)")
    parser.add_argument("--out", default="bench/pretrained_grid.png", help="PNG to write")
    parser.add_argument("--cache", help="take the parts from this cache root (default: shipped, else the recipe's cache)")
    args = parser.parse_args(argv)

    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rewards.clip import ClipReward, tiny_clip_config
    from rl.config import RecipeError, load_recipe
    from rl.models.unified import build_models
    from rl.shapes.pretrain import examples, prepare_recipe, render_captions, world_of
    from rl.shapes import parse_caption
    from rollouts.actors import image_seed
    from rollouts.captions import generate_captions

    try:
        recipe = load_recipe(args.recipe, args.set)
        recipe.device = "cpu"
        recipe.pretrain.enabled = True
        info = prepare_recipe(recipe, args.cache)
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clip_eval = recipe.eval.backbones.get("clip_b")
    torch.set_num_threads(recipe.pretrain.threads)
    models = build_models(recipe, torch.device("cpu"))
    world = world_of(recipe)
    exs = examples(world, args.n, seed=999, split="heldout")
    with torch.no_grad():
        greedy = generate_captions(models.encoder, [e.image for e in exs], 1, max_new_tokens=48, greedy=True).captions
        renders = render_captions(models, [e.captions["full"] for e in exs], [image_seed(e.image_id) for e in exs],
                                  recipe.rollout.trajectory.render_steps)
    sims = None
    if clip_eval and os.path.exists(clip_eval):
        clip = ClipReward(tiny_clip_config(image_size=world.size), checkpoint=clip_eval)
        sims = clip.similarity([e.image for e in exs], renders).tolist()

    enc, dec = info["encoder"], info["decoder"]
    title = (f"pretrained shapes models, before RL (held-out scenes)\n"
             f"encoder greedy SHORT captions: kind accuracy {enc.get('kind_accuracy', float('nan')):.2f}, "
             f"kind recall {enc.get('kind_recall', float('nan')):.2f} (n=64)\n"
             f"decoder, independent CLIP(source, render of true FULL caption) {dec.get('eval_clip_full', float('nan')):.2f}"
             f" vs {dec.get('eval_clip_other', float('nan')):.2f} for another scene's caption (n=64)")
    k = len(exs)
    fig, axes = plt.subplots(k, 4, figsize=(11, 1.6 * k + 1.0), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.0, 2.6, 1]})
    for i, e in enumerate(exs):
        said = {f[1] for f in parse_caption(greedy[i]) if f[0] == "kind"}
        mark = "kinds right" if said == {o.kind for o in e.objects} else "kinds WRONG"
        axes[i][0].imshow(e.image, interpolation="nearest")
        axes[i][3].imshow(renders[i], interpolation="nearest")
        axes[i][1].text(0, 0.5, "\n".join(textwrap.wrap(greedy[i] or "(empty)", 28)) + f"\n[{mark}]",
                        va="center", fontsize=8, family="monospace")
        truth = "\n".join(textwrap.wrap(e.captions["full"], 36))
        if sims is not None:
            truth += f"\n[clip_eval {sims[i]:.2f}]"
        axes[i][2].text(0, 0.5, truth, va="center", fontsize=7, family="monospace")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][1].axis("off")
        axes[i][2].axis("off")
    for j, name in enumerate(("source", "encoder (greedy)", "true FULL caption", "decoder render")):
        axes[0][j].set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
