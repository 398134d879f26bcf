"""Pretrained tiny models for the shapes world, so that the embedded default can learn (issue 9).

    python -m rl.shapes.pretrain recipes/tiny.yaml              # build what is missing; print the paths
    python -m rl.shapes.pretrain recipes/tiny.yaml --out DIR    # another cache root than pretrain.cache_dir
    python -m rl.shapes.pretrain recipes/tiny.yaml --ship       # rebuild the shipped models (rl/shapes/shipped.py)

Random tiny models prove that the loop runs, not that it learns. Here each model of the loop is
given the skills the paper's pretrained models bring, on the shapes world (rl/shapes/world.py), whose
ground truth lets rl.eval count exactly which facts a caption carries:

1. `clip`     the reward's backbone f_I: a tiny open_clip ViT trained contrastively against FULL
              captions (every fact), so image embeddings separate scenes that differ in one colour,
              size, position or kind. Images are blurred and noised in training so that imperfect
              reconstructions are still read for their content. The text side is a small word-level
              transformer over the closed vocabulary (a training aid: open_clip's BPE text tower has
              32 positions, fewer than a 3-shape caption needs); the saved open_clip state dict keeps
              its own text tower untouched, because the reward reads images only.
2. `clip_eval` the same with another seed and other images: a second backbone for rl.eval's unified
              score that the policy was never optimised against (UAE sec. 3 scores with several).
3. `vae`      the decoder's AutoencoderKL, trained as a deterministic autoencoder (shape pixels
              weighted up) and its scaling/shift factors set so that latents are zero-mean, unit-std.
4. `encoder`  the tiny Qwen2.5-VL: a short supervised warm-up of the vision tower (a per-token probe
              of colour / kind / size, standing in for the pretrained ViT every LVLM starts from),
              then supervised fine-tuning of the merger and LM on (image, caption) under the UAE
              prompt: SHORT captions ("a circle and a square") with probability 1 - detail_share,
              FULL ones otherwise. The policy starts terse (greedy captions are short) yet samples a
              detailed caption now and then: RL has details to discover and the exploration to
              find them (UAE sec. 4.4, fig. 6).
5. `decoder`  the DiT and the connector trained with the rectified-flow loss on VAE latents,
              conditioned on FULL captions read by the frozen SFT'd encoder (`Models.condition`,
              the exact path RL uses): UAE's long-caption decoder warm-up (sec. 2.2).

With `pretrain.workers: 2` the parts run in two single-threaded processes (encoder then decoder in
one, VAE and the CLIPs in the other): about 6 minutes on a quiet 2-core machine.

Each part lives in `<cache>/<part>-<key>/`, where key hashes everything the part depends on (its
settings, the world, the architectures, the parts it builds on); `done.json` is written last, after
the weights, and a folder holding it is never trained again. Changing one setting rebuilds only
the parts that depend on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rl.config import PretrainConfig, Recipe

log = logging.getLogger("unified_grpo")

DONE = "done.json"
CACHE_ENV = "UNIFIED_GRPO_CACHE"


@dataclass
class PretrainedPaths:
    """Where the pretrained weights are; the recipe fields they fill in `apply_pretrained`."""

    clip: str  # models.clip.checkpoint (open_clip state dict, safetensors)
    clip_eval: str | None  # second CLIP for rl.eval only (None: pretrain.clip.eval_backbone off)
    encoder: str  # models.encoder.path (folder with model.safetensors)
    decoder: str  # models.decoder.path (diffusers layout: transformer/, vae/)
    connector: str  # models.connector.path (connector.safetensors)


# ---------------------------------------------------------------------------------------------
# Cache bookkeeping
# ---------------------------------------------------------------------------------------------


def cache_root(cfg: PretrainConfig, out: str | None = None) -> Path:
    """--out, else pretrain.cache_dir, else $UNIFIED_GRPO_CACHE, else ~/.cache/unified-grpo."""
    root = out or cfg.cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/unified-grpo"
    return Path(root).expanduser()


def part_key(spec: dict[str, Any]) -> str:
    """12 hex digits of sha256 over a part's canonical JSON spec."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def run_part(folder: Path, train: Callable[[Path], dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """Train a part into `folder` unless it is done; returns its done.json contents.

    Training writes into `<folder>.tmp-<pid>`, which is renamed to `folder` after `done.json` is
    written, so a killed run never leaves a folder that looks complete.
    """
    if is_done(folder):
        info = json.loads((folder / DONE).read_text())
        log.info("pretrain: %s exists (trained in %.0f s); skipped", folder, info.get("seconds", float("nan")))
        return info
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("pretrain: training %s", folder.name)
    wall, cpu = time.time(), _cpu_seconds()
    stats = train(tmp)
    info = {"part": folder.name.split("-")[0], "spec": spec, "seconds": round(time.time() - wall, 1),
            "cpu_seconds": round(_cpu_seconds() - cpu, 1), "threads": torch.get_num_threads(), **stats}
    (tmp / DONE).write_text(json.dumps(info, indent=1))
    if folder.exists():  # an incomplete folder from an older layout: replace it
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log.info("pretrain: %s done in %.0f s", folder.name, info["seconds"])
    return info


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The part of the recipe that fixes the images: side in pixels and shapes per image."""

    size: int
    max_objects: int


def world_of(recipe: Recipe) -> World:
    return World(size=recipe.models.decoder.image_size, max_objects=recipe.data.generate.max_objects)


def examples(world: World, n: int, seed: int, split: str = "train"):
    from rl.shapes import generate_shapes

    return generate_shapes(n, seed, size=world.size, max_objects=world.max_objects, split=split)


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) float32 in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)


def _cosine_lr(step: int, total: int, base: float) -> float:
    """1) linear warm-up over the first 5% of `total` steps, 2) cosine decay to 5% of `base`."""
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _set_lr(opt: torch.optim.Optimizer, step: int, total: int, base: float) -> None:
    """The learning rate of `step` of `total` (`_cosine_lr`) on every group, times its `scale`."""
    lr = _cosine_lr(step, total, base)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("scale", 1.0)


def _losses(losses: list[float]) -> dict[str, float]:
    """What done.json says of a part's training loss: the first, and the mean of the last 10."""
    return {"loss_first": losses[0], "loss_last": float(np.mean(losses[-10:]))}


def _save_module(module: nn.Module, path: Path) -> None:
    """A module's state as safetensors; cloned because tied weights share storage."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(path))


# ---------------------------------------------------------------------------------------------
# 1-2. CLIP
# ---------------------------------------------------------------------------------------------


class WordTextTower(nn.Module):
    """Caption words -> (B, E) embedding: word + position embeddings, a small pre-norm transformer,
    masked mean over words, a linear projection. A training aid for the image tower only."""

    def __init__(self, vocab_size: int, embed_dim: int, width: int = 64, layers: int = 2,
                 heads: int = 4, max_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, width * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, T, W)
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).float()
        return self.proj((x * m).sum(1) / m.sum(1).clamp(min=1))  # (B, E)


def word_ids(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (ids (B, T), mask (B, T) bool) over rl.shapes.VOCABULARY (0 is padding)."""
    from rl.shapes import VOCABULARY, caption_words

    index = {w: i + 1 for i, w in enumerate(VOCABULARY)}
    rows = [[index[w] for w in caption_words(c) if w in index] for c in captions]
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, ids != 0


def degrade(x: torch.Tensor, gen: torch.Generator, max_sigma: float = 1.2, max_noise: float = 0.08) -> torch.Tensor:
    """Random per-image Gaussian blur (sigma up to max_sigma px), colour gain and pixel noise on
    (B, 3, H, W) in [0, 1]: what a reconstruction looks like next to its source."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=gen) * max_sigma + 1e-3
    r = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (B, 5)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0).unsqueeze(1)  # (3B, 1, 5, 5)
    y = F.conv2d(F.pad(x.reshape(1, 3 * b, *x.shape[2:]), (2, 2, 2, 2), mode="replicate"), k2, groups=3 * b)
    y = y.reshape_as(x)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.2
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) * max_noise)
    return (y * gain + noise).clamp(0, 1)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any) -> float:
    """One plain update (zero grads, backward, clip the norm at 1, step); the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def train_clip(out: Path, world: World, cfg, seed: int) -> dict[str, Any]:
    """Contrastive image / FULL-caption training of the tiny CLIP's image tower (CLIP loss, with
    open_clip's learnable temperature). Writes `model.safetensors` (the whole open_clip model)."""

    from rewards.clip import build_clip, tiny_clip_config
    from rl.learner import clip_pixels
    from rl.shapes import VOCABULARY

    model, preprocess = build_clip(tiny_clip_config(image_size=world.size), seed=seed)
    model.requires_grad_(False)
    visual = model.visual.train().requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    torch.manual_seed(seed)
    text = WordTextTower(len(VOCABULARY) + 1, int(model.text_projection.shape[1]))
    params = [*visual.parameters(), *text.parameters(), model.logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(cfg.steps):
        _set_lr(opt, step, cfg.steps, cfg.lr)
        batch = examples(world, cfg.batch_size, seed=seed * 100_003 + step)
        x = degrade(to_tensor([e.image for e in batch]), gen)
        img = F.normalize(model.encode_image(clip_pixels(x, preprocess)), dim=-1)  # (B, E)
        txt = F.normalize(text(*word_ids([e.captions["full"] for e in batch])), dim=-1)  # (B, E)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
        target = torch.arange(len(batch))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        losses.append(optimizer_step(opt, loss, params))
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("pretrain clip step %d/%d loss %.3f", step + 1, cfg.steps, losses[-1])
    model.eval().requires_grad_(False)
    _save_module(model, out / "model.safetensors")
    return {**_losses(losses), **clip_sensitivity(model, preprocess, world)}


@torch.no_grad()
def clip_sensitivity(model, preprocess, world: World, n: int = 64) -> dict[str, float]:
    """How much the image embedding moves when one fact of a held-out scene changes, against how
    much a reconstruction-like degradation moves it: the reward can only prefer correct details if
    the first is clearly larger. Returns mean cosines (1 = identical embeddings)."""
    from rl.learner import clip_pixels
    from rl.shapes import CELLS, COLORS, KINDS, SIZES, ShapeObject, render

    exs = examples(world, n, seed=12345, split="heldout")
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    edited = {"kind": [], "color": [], "size": [], "cell": []}
    for e in exs:
        i = int(rng.integers(len(e.objects)))
        o = e.objects[i]
        free = [c for c in CELLS if c not in {p.cell for p in e.objects}]
        other_kinds = [k for k in KINDS if k not in {p.kind for p in e.objects}]
        swaps = {
            "kind": ShapeObject(str(rng.choice(other_kinds)), o.color, o.size, o.cell, world.size),
            "color": ShapeObject(o.kind, str(rng.choice([c for c in COLORS if c != o.color])), o.size, o.cell, world.size),
            "size": ShapeObject(o.kind, o.color, [s for s in SIZES if s != o.size][0], o.cell, world.size),
            "cell": ShapeObject(o.kind, o.color, o.size, str(rng.choice(free)), world.size),
        }
        for name, new in swaps.items():
            objs = [new if j == i else p for j, p in enumerate(e.objects)]
            edited[name].append(render(objs, e.background, world.size))

    def emb(images):
        x = images if isinstance(images, torch.Tensor) else to_tensor(images)
        return F.normalize(model.encode_image(clip_pixels(x, preprocess)).float(), dim=-1)

    src = emb([e.image for e in exs])
    out = {f"cos_{k}_changed": float((src * emb(v)).sum(-1).mean()) for k, v in edited.items()}
    out["cos_degraded"] = float((src * emb(degrade(to_tensor([e.image for e in exs]), gen))).sum(-1).mean())
    out["cos_other_scene"] = float((src * src.roll(1, 0)).sum(-1).mean())
    return out


# ---------------------------------------------------------------------------------------------
# 3. VAE
# ---------------------------------------------------------------------------------------------


def train_vae(out: Path, world: World, cfg, seed: int) -> dict[str, Any]:
    """AutoencoderKL (rl.models.decoder.tiny_vae_config) as a deterministic autoencoder on the
    world's images (the posterior mode is what `Decoder.encode` uses): foreground-weighted L1 + MSE,
    latent noise, a small L2 on latents to keep them bounded. Then scaling_factor / shift_factor
    make latents zero-mean with unit standard deviation, as flow matching from N(0, 1) expects.
    Saved with `save_pretrained` (diffusers layout)."""
    from diffusers import AutoencoderKL

    from rl.models.decoder import tiny_vae_config

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**tiny_vae_config(), "sample_size": world.size}).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    losses = []
    for step in range(cfg.steps):
        _set_lr(opt, step, cfg.steps, cfg.lr)
        x = to_tensor([e.image for e in examples(world, cfg.batch_size, seed=seed * 100_003 + step)])
        x = x.contiguous(memory_format=torch.channels_last)
        z = vae.encode(x * 2 - 1).latent_dist.mode()  # (B, C, h, w)
        # A little latent noise: generated latents are never exact, the decoder must not mind.
        y = vae.decode(z + cfg.latent_noise * torch.randn_like(z)).sample / 2 + 0.5
        # Shapes cover a small part of each image: weight their pixels up, or the cheapest fit is
        # a grey blob where a coloured shape was. Background = the top-left pixel's colour.
        fg = (x - x[:, :, :1, :1]).abs().amax(1, keepdim=True).gt(0.02).float()  # (B, 1, H, W)
        w = 1 + cfg.foreground_weight * fg
        err = (y - x).abs() + (y - x) ** 2
        loss = (w * err).mean() / w.mean() + cfg.latent_weight * z.pow(2).mean()
        losses.append(optimizer_step(opt, loss, vae.parameters()))
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("pretrain vae step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    vae.eval()
    with torch.no_grad():
        x = to_tensor([e.image for e in examples(world, 128, seed=777, split="heldout")])
        z = vae.encode(x * 2 - 1).latent_dist.mode()
        y = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale, shift_factor=float(z.mean()))  # Decoder.encode: (z - shift) * scale
    vae.to(memory_format=torch.contiguous_format)
    vae.save_pretrained(str(out))
    return {**_losses(losses),
            "heldout_l1": float((y - x).abs().mean()), "scaling_factor": scale}


# ---------------------------------------------------------------------------------------------
# 4. Encoder SFT
# ---------------------------------------------------------------------------------------------


def caption_level(rng: np.random.Generator, detail_share: float) -> str:
    """`full` with probability detail_share, else `short`."""
    return "full" if rng.random() < detail_share else "short"


def _completion_batch(encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> right-padded completion ids (B, T) ending in EOS, and their mask (B, T)
    (rl.warmup.caption_batch, shared with the warm-up stage)."""
    from rl.warmup import caption_batch

    return caption_batch(encoder, captions)


def token_labels(example, grid: int) -> torch.Tensor:
    """(grid * grid, 3) labels of the merged vision tokens of a scene, row-major: the colour, kind
    and size index of the object covering most of the token's pixels, or the last index ("none")."""
    from rl.shapes import COLORS, KINDS, SIZES, render

    size = example.image.size[0]
    cell = size // grid
    none = torch.tensor([len(COLORS), len(KINDS), len(SIZES)])
    labels = none.repeat(grid * grid, 1)
    counts = torch.zeros(grid * grid)
    bg = np.asarray(render([], example.background, size))
    for obj in example.objects:
        mask = np.any(np.asarray(render([obj], example.background, size)) != bg, axis=-1)  # (H, W)
        per_token = torch.from_numpy(mask[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).sum((1, 3)))
        per_token = per_token.flatten().float()
        win = per_token > counts
        labels[win] = torch.tensor([list(COLORS).index(obj.color), KINDS.index(obj.kind), list(SIZES).index(obj.size)])
        counts = torch.maximum(counts, per_token)
    return labels


def warm_up_vision(encoder, world: World, cfg, seed: int) -> dict[str, float]:
    """Supervised warm-up of the tiny vision tower, standing in for the pretrained ViT every real
    LVLM starts from: a linear probe on each merged vision token predicts the colour, kind and
    size of the object under it (or none). Without it the LM had to discover appearance through
    its captions alone and, in a few hundred steps, learned where shapes are but not what they are."""
    from rl.shapes import COLORS, KINDS, SIZES

    visual = encoder.model.model.visual
    heads = nn.ModuleList([nn.Linear(encoder.hidden_size, len(v) + 1) for v in (COLORS, KINDS, SIZES)])
    params = [*visual.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.0)
    losses, accs = [], []
    for step in range(cfg.vision_steps):
        _set_lr(opt, step, cfg.vision_steps, cfg.vision_lr)
        batch = examples(world, cfg.vision_batch_size, seed=seed * 100_003 + 50_000 + step)
        inputs = encoder.prepare([e.image for e in batch])
        feats = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output  # (B * T, H)
        grid = int(round(math.sqrt(feats.shape[0] // len(batch))))
        labels = torch.cat([token_labels(e, grid) for e in batch])  # (B * T, 3)
        logits = [head(feats) for head in heads]
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        losses.append(optimizer_step(opt, loss, params))
        accs.append(float(np.mean([(lg.argmax(-1) == labels[:, i]).float().mean().item() for i, lg in enumerate(logits)])))
        if step % 50 == 0 or step == cfg.vision_steps - 1:
            log.info("pretrain encoder vision step %d/%d loss %.3f acc %.3f", step + 1, cfg.vision_steps, losses[-1], accs[-1])
    # Held-out probe accuracy per attribute on the tokens that show an object (most tokens show
    # background, which inflates vision_token_acc): the ceiling of what the LM can read per token.
    with torch.no_grad():
        exs = examples(world, 128, seed=4343, split="heldout")
        inputs = encoder.prepare([e.image for e in exs])
        feats = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        grid = int(round(math.sqrt(feats.shape[0] // len(exs))))
        labels = torch.cat([token_labels(e, grid) for e in exs])  # (B * T, 3)
        shown = labels[:, 1] != len(KINDS)
        held = {f"vision_{name}_acc": float((head(feats[shown]).argmax(-1) == labels[shown, i]).float().mean())
                for i, (name, head) in enumerate(zip(("color", "kind", "size"), heads))}
    log.info("pretrain encoder vision held-out accuracy on object tokens: %s", {k: round(v, 3) for k, v in held.items()})
    return {"vision_loss_last": float(np.mean(losses[-10:])), "vision_token_acc": float(np.mean(accs[-10:])), **held}


def encoder_kwargs(recipe: Recipe) -> dict[str, Any]:
    e = recipe.models.encoder
    return {"image_size": e.image_size, "hidden_size": e.hidden_size, "num_layers": e.num_layers, "seed": recipe.pretrain.seed}


def train_encoder(out: Path, world: World, cfg, enc_kwargs: dict[str, Any], seed: int,
                  probe_scenes: int = 64) -> dict[str, Any]:
    """Supervised fine-tuning of the tiny Qwen2.5-VL (after `warm_up_vision`): cross-entropy on
    caption tokens (and EOS) given the image under the UAE prompt, with the same suppressed tokens as
    generation (rollouts.captions.completion_logprobs, the learner's own log-prob function).
    Writes `model.safetensors` and `tiny_config.json` (the architecture numbers the recipe lacks)."""

    from rl.models.encoder import TINY_CONFIG_FILE, build_encoder
    from rl.shapes import VOCABULARY
    from rollouts.captions import CaptionGroup, completion_logprobs

    vision = {"vision_hidden_size": cfg.vision_hidden_size, "vision_depth": cfg.vision_depth, "rope_theta": cfg.rope_theta}
    encoder = build_encoder("tiny", vocabulary=VOCABULARY, **enc_kwargs, **vision)
    model = encoder.model.train()
    warm = warm_up_vision(encoder, world, cfg, seed) if cfg.vision_steps else {}
    if cfg.qk_init_std:
        # Sharper attention from the start: with HF's 0.02 init the LM's attention from caption
        # tokens stayed nearly uniform over the ~100 prompt and image tokens for hundreds of steps,
        # so nothing could be copied from the shape being described (only "where", not "what").
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=gen) * cfg.qk_init_std)
    # The vision tower learns at vision_lr_scale * lr: trained end to end at the language model's
    # rate, the tiny tower collapsed its patch features to "is there a shape here" (colours lost)
    # within a few hundred steps. Its merger (into the LM's width) learns at the full rate.
    visual = model.model.visual
    tower = [p for n, p in visual.named_parameters() if not n.startswith("merger.")]
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    visual.requires_grad_(cfg.vision_lr_scale > 0)
    visual.merger.requires_grad_(True)
    groups = [{"params": rest, "scale": 1.0}]
    if cfg.vision_lr_scale > 0:
        groups.append({"params": tower, "scale": cfg.vision_lr_scale})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    suppressed = encoder.suppressed_ids
    losses = []
    for step in range(cfg.steps):
        _set_lr(opt, step, cfg.steps, cfg.lr)
        batch = examples(world, cfg.batch_size, seed=seed * 100_003 + step)
        captions = [e.captions[caption_level(rng, cfg.detail_share)] for e in batch]
        inputs = encoder.prepare([e.image for e in batch])
        ids, mask = _completion_batch(encoder, captions)
        group = CaptionGroup(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                             inputs["image_grid_thw"], ids, mask, torch.zeros(ids.shape), captions, 1, 0,
                             mm_token_type_ids=inputs["mm_token_type_ids"])  # Qwen's 3-D image positions
        logp, _ = completion_logprobs(model, group, 1.0, suppressed)  # (B, T), 0 on padding
        loss = -logp.sum() / mask.sum()  # token-mean negative log-likelihood
        losses.append(optimizer_step(opt, loss, params))
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("pretrain encoder step %d/%d loss %.3f", step + 1, cfg.steps, losses[-1])
    model.eval()
    # Clone every tensor: the tied input / output embeddings would otherwise share storage.
    _save_module(model, out / "model.safetensors")
    # The folder describes its own vision tower (the recipe has no field for it); build_encoder reads it.
    arch = {"hidden_size": enc_kwargs["hidden_size"], "num_layers": enc_kwargs["num_layers"], **vision}
    (out / TINY_CONFIG_FILE).write_text(json.dumps(arch, indent=1))
    return {**warm, **_losses(losses), **encoder_probe(encoder, world, n=probe_scenes)}


def kind_scores(captions: list[str], exs) -> dict[str, float]:
    """How well captions (one per scene of `exs`) name the scenes' kinds, read with
    rl.shapes.parse_caption (a kind counts as named when ("kind", k) is among the parsed facts):

    - `kind_accuracy`: the fraction of scenes whose caption names exactly the scene's kinds, none
      missing and none extra (kinds are distinct within a scene, so this is set equality).
    - `kind_recall`: over all objects of all scenes, the fraction whose kind the caption names.
    - `kind_precision`: over all kinds the captions name, the fraction that are in their scene
      (1.0 when none is named).
    - `repeats`: the fraction of captions with a repeated phrase, which no ground-truth caption
      has: rl.shapes.repeats_phrase ("three shapes on a three shapes on a"), or one kind word
      more than once ("a circle and a circle").
    """
    from rl.shapes import caption_words, parse_caption, repeats_phrase

    exact, named_true, named, objects, repeats = 0, 0, 0, 0, 0
    for caption, e in zip(captions, exs, strict=True):
        said = {f[1] for f in parse_caption(caption) if f[0] == "kind"}
        truth = {o.kind for o in e.objects}
        exact += said == truth
        named_true += len(said & truth)
        named += len(said)
        objects += len(truth)
        words = caption_words(caption)
        repeats += repeats_phrase(caption) or any(words.count(k) > 1 for k in truth | said)
    return {"kind_accuracy": exact / len(exs), "kind_recall": named_true / objects,
            "kind_precision": named_true / named if named else 1.0, "repeats": repeats / len(exs)}


def color_accuracy(captions: list[str], exs) -> float:
    """Of all colours the captions give to shapes (("color", kind, c) facts), the fraction that are
    true: rl.shapes.color_counts summed over captions (rl.eval's color_accuracy); 0.0 when none."""
    from rl.shapes import color_counts

    counts = [color_counts(c, e) for c, e in zip(captions, exs, strict=True)]
    stated = sum(s for s, _ in counts)
    return sum(r for _, r in counts) / stated if stated else 0.0


@torch.no_grad()
def encoder_probe(encoder, world: World, n: int = 64, samples: int = 4) -> dict[str, Any]:
    """On `n` held-out scenes (the "heldout" split, seed 4242), greedy captions (terse: SHORT, the
    kinds only) and `samples` sampled ones (T = 1) per scene:

    - `kind_accuracy`, `kind_recall`, `kind_precision`, `greedy_repeats` of the greedy captions:
      `kind_scores` (kind_accuracy: the fraction of scenes whose greedy caption names exactly the
      scene's kinds).
    - `greedy_coverage`: mean rl.shapes.coverage of the greedy captions (a perfect SHORT caption
      covers 3/14 .. 1/6 of a scene's facts, 0.18 on average).
    - `sampled_detailed_share`: the share of sampled captions that are detailed (start with a count
      word); `sampled_detailed_coverage`: their mean coverage; `color_accuracy`: `color_accuracy`
      of them (the colours a FULL caption states).
    - `greedy_examples`: the first four greedy captions.
    """
    from rl.shapes import NUMBER_WORDS, caption_words, coverage
    from rollouts.captions import generate_captions

    exs = examples(world, n, seed=4242, split="heldout")
    images = [e.image for e in exs]
    greedy = generate_captions(encoder, images, 1, max_new_tokens=48, greedy=True).captions
    sampled = generate_captions(encoder, images, samples, max_new_tokens=48, seed=1).captions
    rows = [(c, exs[i // samples]) for i, c in enumerate(sampled)]
    detailed = [(c, e) for c, e in rows if caption_words(c)[:1] and caption_words(c)[0] in NUMBER_WORDS]
    kinds = kind_scores(greedy, exs)
    return {
        **{k: v for k, v in kinds.items() if k != "repeats"},
        "greedy_repeats": kinds["repeats"],
        "greedy_coverage": float(np.mean([coverage(c, e) for c, e in zip(greedy, exs)])),
        "sampled_detailed_share": len(detailed) / len(rows),
        "sampled_detailed_coverage": float(np.mean([coverage(c, e) for c, e in detailed])) if detailed else 0.0,
        "color_accuracy": color_accuracy([c for c, _ in detailed], [e for _, e in detailed]),
        "greedy_examples": greedy[:4],
    }


# ---------------------------------------------------------------------------------------------
# 5. Decoder + connector
# ---------------------------------------------------------------------------------------------


def transformer_config(world: World, cfg) -> dict[str, Any]:
    """The shapes decoder's SD3Transformer2DModel: rl.models.decoder.tiny_transformer_config with
    the widths of `pretrain.decoder` (a 2-layer, 32-wide DiT cannot place three shapes)."""
    from rl.models.decoder import tiny_transformer_config

    width = cfg.num_heads * cfg.head_dim
    latent = world.size // 4  # tiny_vae_config downsamples by 4
    return {**tiny_transformer_config(world.size, cfg.joint_attention_dim), "sample_size": latent,
            "patch_size": cfg.patch_size, "num_layers": cfg.num_layers, "attention_head_dim": cfg.head_dim,
            "num_attention_heads": cfg.num_heads, "caption_projection_dim": width,
            "pos_embed_max_size": max(16, latent // cfg.patch_size)}


def train_decoder(out: Path, world: World, cfg, recipe: Recipe, encoder_dir: Path, vae_dir: Path,
                  seed: int, clip_path: str | None = None, eval_clip_path: str | None = None,
                  probe_scenes: int = 64) -> dict[str, Any]:
    """The warm-up stage's objective (rl/warmup.py `flow_matching_loss`: rectified flow in SD3's
    convention, x_s = (1 - s) z0 + s eps, target v = eps - z0, s = shift(u), u ~ U(0, 1)) with
    c = connector(encoder LM hidden states of the FULL caption), on the tiny DiT's base weights:
    UAE sec. 2.2's long-caption warm-up, where the shapes world's FULL caption is the long caption
    (ground truth rather than the encoder's, and the DiT trained from scratch in this process with
    plain AdamW, not through the learner: a `warmup` stage trains LoRA and connector only).
    Trains the transformer's base weights and the connector; the encoder and VAE are frozen.
    `clip_path` (the reward's CLIP) and `eval_clip_path` (the independent one), where they exist,
    serve the quality probe in done.json only (`decoder_probe`)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from rl.models.decoder import Decoder, pad_condition
    from rl.models.encoder import build_encoder
    from rl.models.unified import Models, build_connector
    from rl.shapes import VOCABULARY
    from rl.warmup import flow_matching_loss

    m = recipe.models
    encoder = build_encoder("tiny", vocabulary=VOCABULARY, path=str(encoder_dir), **encoder_kwargs(recipe))
    encoder.model.requires_grad_(False).eval()
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).requires_grad_(False).eval()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_config(world, cfg))
    decoder = Decoder(transformer=transformer, vae=vae, shift=m.decoder.shift, image_size=world.size)
    connector = build_connector(m.connector, encoder, decoder)
    length = recipe.rollout.caption.max_new_tokens + 1  # the fixed conditioning length RL uses (Models.condition)
    models = Models(encoder=encoder, connector=connector, decoder=decoder, device=torch.device("cpu"),
                    cond_length=length)

    # A pool of scenes encoded once by the frozen VAE, and their FULL captions read once by the
    # frozen encoder LM (exactly as Models.condition reads them); batches are drawn from the pool.
    pool = examples(world, cfg.pool_size, seed=seed * 100_003)
    with torch.no_grad():
        latents = torch.cat([decoder.encode(to_tensor([e.image for e in pool[i: i + 256]]))
                             for i in range(0, len(pool), 256)])  # (P, C, h, w)
        hidden, hmask = caption_features(models, [e.captions["full"] for e in pool])  # (L+1, P, T, H), (P, T)

    params = [*transformer.parameters(), *connector.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    shift = m.decoder.shift
    losses = []
    for step in range(cfg.steps):
        _set_lr(opt, step, cfg.steps, cfg.lr)
        idx = torch.randint(len(pool), (cfg.batch_size,), generator=gen)
        z0 = latents[idx]
        cmask = hmask[idx]
        cond, pooled = connector(list(hidden[:, idx]), cmask)  # = Models.condition with a frozen encoder
        cond, cmask = pad_condition(cond * cmask.unsqueeze(-1).to(cond.dtype), cmask, length)  # its fixed length
        u = torch.rand(len(idx), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        loss = flow_matching_loss(decoder, z0, cond, pooled, cmask, u, eps, shift).mean()
        losses.append(optimizer_step(opt, loss, params))
        connector.after_optimizer_step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("pretrain decoder step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    transformer.eval()
    probe = decoder_probe(models, clip_path, world, steps=recipe.rollout.trajectory.render_steps,
                          eval_clip_path=eval_clip_path, n=probe_scenes)
    transformer.save_pretrained(str(out / "transformer"))
    vae.save_pretrained(str(out / "vae"))
    _save_module(connector, out / "connector.safetensors")
    return {**_losses(losses), **probe}


@torch.no_grad()
def caption_features(models, captions: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder LM's hidden states of captions read as text, by `Models.read_captions` (what
    `Models.condition` feeds the connector): ((L+1, N, T, H), mask (N, T)), right-padded to one T."""
    ids, mask = _completion_batch(models.encoder, captions)
    states, masks = [], []
    for i in range(0, len(captions), chunk):
        hidden, m = models.read_captions(ids[i: i + chunk], mask[i: i + chunk])
        states.append(torch.stack(list(hidden)))  # (L+1, n, T, H)
        masks.append(m.bool())
    return torch.cat(states, 1), torch.cat(masks, 0)


@torch.no_grad()
def render_captions(models, captions: list[str], seeds: list[int], steps: int) -> list:
    """The decoder's renders (PIL) of `captions` as RL makes them: read by the encoder LM
    (`Models.condition`), ODE sampling with `steps` steps from the noise of `seeds` (one per caption)."""
    from rollouts.actors import to_pil
    from rollouts.trajectories import render

    ids, mask = _completion_batch(models.encoder, captions)
    cond, cmask, pooled = models.condition(ids, mask)
    return to_pil(render(models.decoder, cond, cmask, pooled, steps, seeds))


@torch.no_grad()
def decoder_probe(models, clip_path: str | None, world: World, steps: int, n: int = 64,
                  eval_clip_path: str | None = None) -> dict[str, float]:
    """How recognisably the decoder renders ground-truth captions, on `n` held-out scenes (seed 999):
    each scene's FULL and SHORT caption, and (a baseline) the FULL caption of another held-out
    scene (the next one in the list), all rendered from the scene's own noise (`image_seed`, ODE,
    `steps`) and compared with the scene's source image:

    - `eval_clip_{full,short,other}`: mean cosine of source and render under `eval_clip_path`, the
      independent CLIP (`clip_eval`, rl.eval's `clip_b`), which neither the decoder nor RL is
      trained against. full >> other means the render shows *this* scene, not a generic one.
    - `reward_clip_{full,short,other}`: the same under the reward's CLIP (`clip_path`): what
      encoder GRPO sees; RL has something to find only if full > short clearly.
    - `pixel_l1_{full,short,other}`: mean absolute pixel difference in [0, 1].
    A backbone whose file is missing is skipped."""
    from rewards.clip import ClipReward, tiny_clip_config
    from rollouts.actors import image_seed

    exs = examples(world, n, seed=999, split="heldout")
    seeds = [image_seed(e.image_id) for e in exs]
    captions = {"full": [e.captions["full"] for e in exs], "short": [e.captions["short"] for e in exs]}
    captions["other"] = captions["full"][1:] + captions["full"][:1]
    clips = {name: ClipReward(tiny_clip_config(image_size=world.size), checkpoint=path)
             for name, path in (("eval_clip", eval_clip_path), ("reward_clip", clip_path))
             if path and os.path.exists(path)}
    x = to_tensor([e.image for e in exs])
    out: dict[str, float] = {}
    for level, texts in captions.items():
        images = render_captions(models, texts, seeds, steps)
        out[f"pixel_l1_{level}"] = float((x - to_tensor(images)).abs().mean())
        for name, clip in clips.items():
            out[f"{name}_{level}"] = float(clip.similarity([e.image for e in exs], images).mean())
    return out


# ---------------------------------------------------------------------------------------------
# The whole pretraining and its use by a recipe
# ---------------------------------------------------------------------------------------------


def part_specs(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """What each part depends on (hashed into its folder name). Later parts include the keys of
    the parts they are built on, so a change propagates downstream and nowhere else."""
    p = recipe.pretrain
    world = asdict(world_of(recipe))
    m = recipe.models
    specs: dict[str, dict[str, Any]] = {
        "clip": {"world": world, "cfg": p.clip.model_dump(exclude={"eval_backbone"}), "seed": recipe.pretrain.seed + 4},
        "clip_eval": {"world": world, "cfg": p.clip.model_dump(exclude={"eval_backbone"}), "seed": recipe.pretrain.seed + 1004},
        "vae": {"world": world, "cfg": p.vae.model_dump(), "seed": recipe.pretrain.seed + 2},
        # positions: "mrope" since the encoder sees Qwen2.5-VL's 3-D image positions (mm_token_type_ids);
        # encoders cached before were trained with 1-D positions and are rebuilt
        "encoder": {"world": world, "cfg": p.encoder.model_dump(), "arch": encoder_kwargs(recipe),
                    "seed": recipe.pretrain.seed + 3, "positions": "mrope"},
    }
    specs["decoder"] = {
        "world": world, "cfg": p.decoder.model_dump(), "seed": recipe.pretrain.seed + 1,
        "connector": m.connector.model_dump(exclude={"path", "reader"}), "shift": m.decoder.shift,
        "cond_length": recipe.rollout.caption.max_new_tokens + 1,  # fixed conditioning length (batch-independent renders)
        "encoder": part_key(specs["encoder"]), "vae": part_key(specs["vae"]),
    }
    return specs


def part_dirs(recipe: Recipe, out: str | None = None) -> dict[str, Path]:
    root = cache_root(recipe.pretrain, out)
    return {name: root / f"{name}-{part_key(spec)}" for name, spec in part_specs(recipe).items()}


def pretrained_paths(recipe: Recipe, out: str | None = None) -> PretrainedPaths:
    d = part_dirs(recipe, out)
    return PretrainedPaths(
        clip=str(d["clip"] / "model.safetensors"),
        clip_eval=str(d["clip_eval"] / "model.safetensors") if recipe.pretrain.clip.eval_backbone else None,
        encoder=str(d["encoder"]), decoder=str(d["decoder"]),
        connector=str(d["decoder"] / "connector.safetensors"),
    )


def train_part(name: str, recipe: Recipe, out: str | None = None) -> dict[str, Any]:
    """Train one part (unless done) in this process; what each pool worker runs."""
    p, world = recipe.pretrain, world_of(recipe)
    specs, dirs = part_specs(recipe), part_dirs(recipe, out)
    seed = specs[name]["seed"]
    train: Callable[[Path], dict[str, Any]] = {
        "clip": lambda o: train_clip(o, world, p.clip, seed),
        "clip_eval": lambda o: train_clip(o, world, p.clip, seed),
        "vae": lambda o: train_vae(o, world, p.vae, seed),
        "encoder": lambda o: train_encoder(o, world, p.encoder, encoder_kwargs(recipe), seed, p.probe_scenes),
        "decoder": lambda o: train_decoder(o, world, p.decoder, recipe, dirs["encoder"], dirs["vae"], seed,
                                           clip_path=str(dirs["clip"] / "model.safetensors"),
                                           eval_clip_path=str(dirs["clip_eval"] / "model.safetensors"),
                                           probe_scenes=p.probe_scenes),
    }[name]
    return run_part(dirs[name], train, specs[name])


def _worker_init(threads: int) -> None:
    # Tiny models are overhead-bound: one intra-op thread per process, and the parts side by side,
    # use two cores better than two threads on one part (and far better on a busy machine).
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def pretrain(recipe: Recipe, out: str | None = None) -> tuple[PretrainedPaths, dict[str, dict[str, Any]]]:
    """Build every missing part for `recipe`; returns the paths and each part's done.json (its
    timings and quality probes).

    Dependencies: decoder <- encoder, vae (and the two CLIPs, which its done.json probe scores
    renders with); the rest are independent. With `pretrain.workers: 2` the parts run in two
    processes: one does encoder then decoder (the long chain), the other vae, clip and clip_eval
    while the encoder trains.
    """
    check_pretrainable(recipe)
    p, dirs = recipe.pretrain, part_dirs(recipe, out)
    names = [n for n in ("encoder", "vae", "clip", "clip_eval", "decoder") if n != "clip_eval" or p.clip.eval_backbone]
    todo = [n for n in names if not is_done(dirs[n])]
    info: dict[str, dict[str, Any]] = {}
    if p.workers > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(p.workers, mp_context=ctx, initializer=_worker_init, initargs=(p.threads,)) as pool:
            first = {n: pool.submit(train_part, n, recipe, out) for n in names if n != "decoder"}
            for n, future in first.items():
                info[n] = future.result()  # the decoder needs all of them (the CLIPs for its probe only)
            info["decoder"] = pool.submit(train_part, "decoder", recipe, out).result()
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(p.threads)
        try:
            for n in names:
                info[n] = train_part(n, recipe, out)
        finally:
            torch.set_num_threads(threads)
    return pretrained_paths(recipe, out), {n: info[n] for n in names}


def check_pretrainable(recipe: Recipe) -> None:
    m = recipe.models
    if recipe.data.source is not None:
        raise ValueError("pretraining is for the generated shapes world: set data.source: null, or pretrain.enabled: false")
    if (m.encoder.name, m.decoder.name, m.clip.model) != ("tiny", "tiny", "tiny"):
        raise ValueError("pretraining builds the tiny models: models.encoder.name, models.decoder.name and "
                         "models.clip.model must all be `tiny` (or set pretrain.enabled: false)")


def apply_pretrained(recipe: Recipe, paths: PretrainedPaths) -> list[str]:
    """Fill the recipe's model paths that are unset with the pretrained ones; an explicitly given
    path wins. Returns the fields filled."""
    m = recipe.models
    filled = []
    for section, field, value in [(m.encoder, "path", paths.encoder), (m.decoder, "path", paths.decoder),
                                  (m.connector, "path", paths.connector), (m.clip, "checkpoint", paths.clip)]:
        if getattr(section, field) is None:
            setattr(section, field, value)
            filled.append(field)
    return filled


def prepare_recipe(recipe: Recipe, out: str | None = None) -> dict[str, dict[str, Any]]:
    """`pretrain.provider: shapes`, what the driver and rl.eval call before building any model (when
    `pretrain.enabled`): the shipped models
    when the recipe's parts are the shipped ones (sha256-checked, rl/shapes/shipped.py; a mismatch
    raises ShippedModelError), else pretrain what is missing from the cache; then point the recipe
    at the weights (unset `models` paths; `eval.backbones.clip_b`, the second CLIP). Returns the
    parts' training stats (done.json)."""
    from rl.shapes import shipped

    if not recipe.pretrain.enabled:
        return {}
    found = shipped.resolve(recipe) if out is None else None
    paths, info = found if found is not None else pretrain(recipe, out)
    apply_pretrained(recipe, paths)
    if paths.clip_eval and "clip_b" not in recipe.eval.backbones:  # rl.eval's second backbone, first in order
        recipe.eval.backbones = {"clip_b": paths.clip_eval, **recipe.eval.backbones}
    return info


def main(argv: list[str] | None = None) -> int:
    from rl.config import RecipeError, load_recipe

    parser = argparse.ArgumentParser(prog="python -m rl.shapes.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml (its `pretrain:` section)")
    parser.add_argument("--out", help="cache root (default: pretrain.cache_dir, $UNIFIED_GRPO_CACHE, ~/.cache/unified-grpo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe field")
    parser.add_argument("--ship", action="store_true",
                        help="train every part in a fresh folder (with --out: there, reusing the parts done there) "
                             "and rewrite the shipped models (pretrain.shipped_dir, default rl/shapes/pretrained/) "
                             "and their manifest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        recipe = load_recipe(args.recipe, args.set)
        check_pretrainable(recipe)
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    if args.ship:
        return ship(recipe, args, t0)
    paths, info = pretrain(recipe, args.out)
    for name, i in info.items():
        probes = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in i.items()
                  if k not in ("spec", "part")}
        print(f"{name:10s} {json.dumps(probes)}")
    print(json.dumps(asdict(paths), indent=1))
    print(f"pretraining: {time.time() - t0:.0f} s")
    return 0


def ship(recipe: Recipe, args: argparse.Namespace, t0: float) -> int:
    """`--ship`: build every part into --out (parts done there are kept) or a fresh folder, then
    write the shipped files and their manifest (rl/shapes/shipped.py)."""
    import shlex
    import tempfile

    from rl.shapes import shipped

    root = args.out or tempfile.mkdtemp(prefix="unified-grpo-ship-")
    try:
        _, info = pretrain(recipe, root)
        # the command that rebuilds the set from a fresh clone (--out only says where parts are built)
        command = shlex.join(["python", "-m", "rl.shapes.pretrain", args.recipe, "--ship",
                              *[a for s in args.set for a in ("--set", s)]])
        manifest = shipped.write(recipe, root, info, command)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    dest = shipped.shipped_dir(recipe.pretrain)
    for rel, f in manifest["files"].items():
        print(f"{f['bytes']:>10d}  {f['sha256'][:16]}  {dest / rel}")
    print(f"shipped {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.2f} MiB, manifest "
          f"{dest / shipped.MANIFEST}; built by `{manifest['command']}` in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
