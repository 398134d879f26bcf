"""The decoder warm-up on long captions (UAE sec. 2.2), as a stage of any run: `schedule.warmup_steps`.

UAE warms its decoder up before RL on 700K images paired with captions of 250+ words ("the caption is
used as the input prompt and the diffusion transformer is trained to synthesize the corresponding
image from this text"), so that the decoder reads long, detailed descriptions. In this stack the
decoder hears captions through the encoder's hidden states and a connector (UAE sec. 2.1), which is
randomly initialised for a new pair of models: the warm-up teaches it the encoder's language.

One `warmup` step, for a batch of B images:

1. captions: the frozen encoder (adapter off) captions each image greedily under UAE's caption prompt
   (rl/models/encoder.py UAE_CAPTION_PROMPT), at most `warmup.max_new_tokens` tokens. Captions are
   cached on disk (`CaptionCache`), keyed by image id and the encoder's identity (`caption_key`), so
   every image is captioned once for all epochs and runs.
2. loss: rectified flow in SD3's convention (rollouts/sde.py): z0 = VAE(x), s = shift(u) with
   u ~ U(0, 1), eps ~ N(0, I), x_s = (1 - s) z0 + s eps, target v = eps - z0,
   loss = mean_i ||v_theta(x_s, s, c_i) - v||^2 / dim, c_i = connector(encoder LM hidden states of the
   caption) exactly as `Models.condition` builds it for RL. u and eps are drawn per image from its
   seed, so the loss does not depend on the micro-batching.
3. update: the DeepSpeed learner (`Learner.train_warmup`), `learner.micro_batch_size` images per
   forward/backward and one optimizer step per batch, at any ZeRO stage: the connector (and with
   `warmup.train_decoder_lora`, the decoder LoRA) trains; the encoder and the VAE are frozen.

The shapes-world pretraining (rl/shapes/pretrain.py `train_decoder`) is the same objective on the tiny DiT's
base weights: it calls `flow_matching_loss` and `caption_batch` from here.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) float32 in [0, 1] (what the VAE encodes)."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)


def caption_batch(encoder, captions: Sequence[str], eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> right-padded completion ids (B, T) ending in EOS (unless `eos` is False), and their
    mask (B, T): what a rollout's CaptionGroup holds, so `Models.condition` reads a cached caption as it
    reads a sampled one (it drops the EOS itself: the decoder hears words only)."""
    rows = [encoder.tokenizer(c, add_special_tokens=False)["input_ids"] + [encoder.eos_token_id] * eos
            for c in captions]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), encoder.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def flow_matching_loss(decoder, z0: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor, cmask: torch.Tensor,
                       u: torch.Tensor, eps: torch.Tensor, shift: float) -> torch.Tensor:
    """Per-row rectified-flow loss (b,): ||v_theta(x_s, s, c) - (eps - z0)||^2 averaged over latent
    dims, with s = shift(u) (SD3's shifted schedule) and x_s = (1 - s) z0 + s eps.
    z0, eps (b, C, h, w); u (b,) in [0, 1); cond (b, L, D), cmask (b, L), pooled (b, P)."""
    from rollouts.sde import shift_sigma

    sigma = shift_sigma(u, shift)  # (b,)
    s = sigma.view(-1, 1, 1, 1).to(z0.dtype)
    v = decoder.velocity((1 - s) * z0 + s * eps, sigma, cond, pooled, cmask)
    return F.mse_loss(v.float(), (eps - z0).float(), reduction="none").flatten(1).mean(1)


def warmup_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (b,), eps (b, *shape)) drawn per row from its own seed: independent of the micro-batching."""
    us, epss = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        us.append(torch.rand(1, generator=g))
        epss.append(torch.randn((1, *shape), generator=g))
    return torch.cat(us), torch.cat(epss)


# ---------------------------------------------------------------------------------------------
# The caption cache
# ---------------------------------------------------------------------------------------------


def caption_key(recipe) -> str:
    """12 hex digits naming what decides a warm-up caption: the encoder (name, weights path, random_init,
    widths, dtype, input size, the seed its random weights come from), the prompt and the length."""
    from rl.models.encoder import UAE_CAPTION_PROMPT, USER_INSTRUCTION

    e = recipe.models.encoder
    spec = {"encoder": e.model_dump(exclude={"adapter"}), "seed": recipe.seed, "prompt": [UAE_CAPTION_PROMPT, USER_INSTRUCTION],
            "max_new_tokens": warmup_tokens(recipe)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def warmup_tokens(recipe) -> int:
    return recipe.warmup.max_new_tokens or recipe.rollout.caption.max_new_tokens


def cache_dir(recipe) -> Path:
    """`<warmup.cache_dir or output.dir/cache>/warmup-captions-<caption_key>`."""
    root = recipe.warmup.cache_dir or os.path.join(recipe.output.dir, "cache")
    return Path(root).expanduser() / f"warmup-captions-{caption_key(recipe)}"


class CaptionCache:
    """One JSON per image ({"image_id", "caption"}) in `folder`, named by a hash of the image id;
    written to a temporary name, then renamed, so a killed run never leaves half a file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, image_id: str) -> Path:
        return self.folder / f"{hashlib.sha1(image_id.encode()).hexdigest()[:20]}.json"

    def get(self, image_id: str) -> str | None:
        path = self._path(image_id)
        if not path.is_file():
            return None
        try:
            row = json.loads(path.read_text())
        except ValueError:
            return None  # unreadable: captioned again
        return row["caption"] if row.get("image_id") == image_id else None

    def put(self, image_id: str, caption: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(image_id)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"image_id": image_id, "caption": caption}))
        os.replace(tmp, path)

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.json"))) if self.folder.is_dir() else 0


def cached_captions(cache: CaptionCache, image_ids: Sequence[str], images: Sequence[Any], caption_fn
                    ) -> tuple[list[str], int]:
    """Captions of `image_ids` from the cache; the missing ones from `caption_fn(images) -> list[str]`
    (one call for all of them), then stored. Returns (captions, how many were captioned now)."""
    found = [cache.get(i) for i in image_ids]
    missing = [k for k, c in enumerate(found) if c is None]
    if missing:
        new = caption_fn([images[k] for k in missing])
        for k, caption in zip(missing, new):
            cache.put(image_ids[k], caption)
            found[k] = caption
    return found, len(missing)
