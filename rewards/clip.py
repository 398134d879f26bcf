"""CLIP reconstruction reward (UAE sec. 2.3): R_i = cos<f_I(x), f_I(x_rec_i)>.

f_I is a frozen image encoder, by default CLIP ViT-L/14 (the paper's setting):

    reward = ClipReward("ViT-L-14", pretrained="openai", device="cuda")
    reward.similarity(sources, renders, source_keys=image_ids)     # (N,) in [-1, 1]

and, on CPU with no download, a randomly initialised tiny CLIP (or a tiny one loaded from a
safetensors file), or the published ViT-L/14 architecture with random weights at a reduced depth
(the production code path on a CPU, DESIGN.md "Real architectures on CPU"):

    reward = ClipReward(tiny_clip_config(), seed=0, checkpoint=None)
    reward = ClipReward(vit_l14_clip_config(layers=1), seed=0)

Preprocessing is fixed and the same for every backbone: resize the shortest side to the model's
size (bicubic), center crop, scale to [0, 1], normalise with the model's mean and std. For RGB
input it matches open_clip's eval transform pixel for pixel (a test checks it); interpolation and
resize mode from a model's own preprocess config are ignored on purpose, so scores from different
backbones are comparable. Extra backbones (timm models, other CLIPs) only serve evaluation
(`scores_all_backbones`, the Unified-Bench protocol of UAE sec. 3 scores with several).

Importing this module is cheap: open_clip and timm are imported when a model is built.
"""
from __future__ import annotations

import hashlib
import json
import logging
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # = open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)  # = open_clip.OPENAI_DATASET_STD
MAIN = "clip"  # name of the reward backbone among `ClipReward.backbones`


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePreprocess:
    """PIL images -> normalised float32 batch (N, 3, H, W). Deterministic, no augmentation."""

    size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        return torch.stack([self.one(image) for image in images])  # (N, 3, H, W)

    def one(self, image: Image.Image) -> Tensor:
        h, w = self.size
        image = image.convert("RGB")
        # 1) resize (bicubic) so the image covers (h, w), keeping its aspect ratio; for a square
        #    target the short side becomes h and the long one int(h * long / short), as torchvision.
        iw, ih = image.size
        if h == w:
            short, long = min(iw, ih), max(iw, ih)
            new_short, new_long = h, int(h * long / short)
            new_w, new_h = (new_short, new_long) if iw <= ih else (new_long, new_short)
        else:
            scale = max(h / ih, w / iw)
            new_w, new_h = max(w, round(iw * scale)), max(h, round(ih * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        # 2) center crop (torchvision's rounding)
        top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))
        image = image.crop((left, top, left + w, top + h))
        # 3) to [0, 1], then 4) (x - mean) / std per channel
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std  # (3, H, W)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def tiny_clip_config(image_size: int = 32, embed_dim: int = 32) -> dict:
    """open_clip config of a tiny ViT CLIP (~3.4M parameters, builds in ~50 ms on CPU).

    The text tower keeps CLIP's vocabulary (49408) so open_clip's stock tokenizer works with it
    (e.g. to pretrain it contrastively); it is unused by the reward, which needs images only.
    """
    return {
        "embed_dim": embed_dim,
        # width 64 / head_width 32 = 2 heads; patch 8 on 32 px = 16 tokens
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def vit_l14_clip_config(layers: int | None = None, quick_gelu: bool = True) -> dict:
    """open_clip config of CLIP ViT-L/14 (UAE's reward backbone), for random initialisation.

    The numbers are open_clip's own `ViT-L-14` config (`open_clip.get_model_config("ViT-L-14")`,
    shipped with the package: embed 768; vision 24 layers of width 1024, patch 14 at 224 px; text
    12 layers of width 768, 12 heads, context 77, vocabulary 49408), with
    layers: the depth of both towers (None: the published 24 / 12), for dry runs;
    quick_gelu: OpenAI's released ViT-L/14 (the recipe's `pretrained: openai`) uses QuickGELU
        (open_clip's `openai` tag sets it); it has no weights, so shapes do not depend on it.
    """
    import open_clip

    cfg = deepcopy(open_clip.get_model_config("ViT-L-14"))
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        cfg["vision_cfg"]["layers"] = layers
        cfg["text_cfg"]["layers"] = layers
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


# open_clip names whose architecture `ClipConfig.random_init` can build at a reduced depth.
RANDOM_INIT_CLIPS = {"ViT-L-14": vit_l14_clip_config}


IMAGE_TOWER = "visual."  # open_clip's image tower: the keys an image-only checkpoint holds


class TimmImageEncoder(nn.Module):
    """A timm image model with open_clip's `encode_image` interface: pooled pre-logits features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, D)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def build_clip(
    model: str | dict,
    pretrained: str | None = None,
    seed: int = 0,
    *,
    checkpoint: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> tuple[nn.Module, ImagePreprocess]:
    """A frozen image encoder (with `encode_image(x) -> (N, D)`) and its fixed preprocessing.

    model:
        "ViT-L-14" (any open_clip name, or "hf-hub:org/repo") with `pretrained` an open_clip tag
            such as "openai" or a weights file; no pretrained = random init;
        a config dict {"embed_dim", "vision_cfg", "text_cfg"} (e.g. `tiny_clip_config()`),
            randomly initialised;
        "timm:<name>" (e.g. "timm:vit_tiny_patch16_224") for an extra evaluation backbone;
            `pretrained` not None loads timm's default weights; `model_kwargs` go to
            `timm.create_model` (e.g. img_size=32, patch_size=8).
    seed: random init is drawn under `torch.manual_seed(seed)`, without touching the caller's RNG.
    checkpoint: a .safetensors state dict loaded strictly after building (never a pickle): the
        whole model's, or for open_clip models the image tower's alone (every key `visual.*`,
        loaded into `model.visual`; the text tower stays at its seeded random init).
    image_size: preprocessing size for timm models whose size cannot be read off the model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model, str) and model.startswith("timm:"):
            encoder, preprocess = _build_timm(model[len("timm:"):], pretrained, image_size, model_kwargs)
        else:
            # open_clip warns "No pretrained weights loaded ... initialized randomly" at build time;
            # with a checkpoint to load next that is not so, and it misleads whoever reads the log.
            root, quiet = logging.getLogger(), _QuietRandomInit()
            if checkpoint is not None:
                root.addFilter(quiet)
            try:
                encoder, preprocess = _build_open_clip(model, pretrained, model_kwargs)
            finally:
                root.removeFilter(quiet)  # a no-op when it was not added
    if checkpoint is not None:
        from safetensors.torch import load_file

        state = load_file(checkpoint)
        target = encoder.model if isinstance(encoder, TimmImageEncoder) else encoder
        if not isinstance(encoder, TimmImageEncoder) and state and all(k.startswith(IMAGE_TOWER) for k in state):
            # an image tower alone (the shapes world's shipped CLIPs, rl/shapes/shipped.py): loaded
            # strictly into `visual`; the text tower, which encode_image never reads, keeps its
            # random init drawn under `seed` above
            target = encoder.visual
            state = {k[len(IMAGE_TOWER):]: v for k, v in state.items()}
        target.load_state_dict(state, strict=True)
    encoder = encoder.to(device).eval().requires_grad_(False)
    return encoder, preprocess


class _QuietRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def quick_gelu_kwargs(model: str, pretrained: str | None, model_kwargs: dict) -> dict:
    """{"force_quick_gelu": True} when the pretrained tag's weights were trained with QuickGELU but
    the named config has plain GELU (`ViT-L-14` with `openai`): open_clip would build GELU layers,
    only warn ("QuickGELU mismatch"), and every feature would be off. {} otherwise, and when the
    recipe sets `force_quick_gelu` itself."""
    from open_clip.pretrained import get_pretrained_cfg

    if not pretrained or "force_quick_gelu" in model_kwargs or model.endswith("-quickgelu"):
        return {}
    return {"force_quick_gelu": True} if get_pretrained_cfg(model, pretrained).get("quick_gelu") else {}


def _build_open_clip(model: str | dict, pretrained: str | None, model_kwargs: dict):
    import open_clip
    import open_clip.factory

    if isinstance(model, dict):
        # open_clip builds only named configs, so the dict is entered in its registry under a
        # name derived from its content. `_MODEL_CONFIGS` is private; the public
        # `add_model_config` wants a JSON file and rescans every config on each call.
        digest = hashlib.sha1(json.dumps(model, sort_keys=True).encode()).hexdigest()[:12]
        name = f"unified_grpo-{digest}"
        open_clip.factory._MODEL_CONFIGS[name] = deepcopy(model)
        model = name
    model_kwargs = {**model_kwargs, **quick_gelu_kwargs(model, pretrained, model_kwargs)}
    encoder = open_clip.create_model(model, pretrained=pretrained, **model_kwargs)
    cfg = encoder.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    return encoder, ImagePreprocess(tuple(size), tuple(cfg["mean"]), tuple(cfg["std"]))


def _build_timm(name: str, pretrained: str | None, image_size: int | None, model_kwargs: dict):
    import timm

    net = timm.create_model(name, pretrained=pretrained is not None, num_classes=0, **model_kwargs)
    data_cfg = timm.data.resolve_model_data_config(net)
    if image_size is not None:
        size = (image_size, image_size)
    elif hasattr(net, "patch_embed") and getattr(net.patch_embed, "img_size", None):
        size = tuple(net.patch_embed.img_size)  # follows an img_size= override; data_cfg does not
    else:
        size = tuple(data_cfg["input_size"][1:])
    return TimmImageEncoder(net), ImagePreprocess(size, tuple(data_cfg["mean"]), tuple(data_cfg["std"]))


# ---------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------


class ClipReward:
    """Reconstruction reward: cosine of frozen image embeddings of source and render.

    Source embeddings are cached by image id (`source_keys` / kwargs["image_ids"]): each source
    is rendered G times per step and seen again every epoch, so it is encoded once.
    `extra_backbones` maps a name to a `build_clip` spec (a model string, or a dict of
    `build_clip` keyword arguments with a "model" key) for `scores_all_backbones`.
    """

    def __init__(
        self,
        model: str | dict,
        pretrained: str | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        extra_backbones: dict[str, str | dict] | None = None,
        checkpoint: str | None = None,
    ):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.backbones: dict[str, tuple[nn.Module, ImagePreprocess]] = {
            MAIN: build_clip(model, pretrained, seed, checkpoint=checkpoint, device=self.device)
        }
        for name, spec in (extra_backbones or {}).items():
            if name in self.backbones:
                raise ValueError(f"extra backbone name {name!r} is reserved for the reward model")
            kwargs = dict(spec) if isinstance(spec, dict) and "model" in spec else {"model": spec}
            self.backbones[name] = build_clip(**kwargs, device=self.device)
        self._cache: dict[str, dict[Hashable, Tensor]] = {name: {} for name in self.backbones}

    @property
    def model(self) -> nn.Module:
        return self.backbones[MAIN][0]

    @property
    def preprocess(self) -> ImagePreprocess:
        return self.backbones[MAIN][1]

    def clear_cache(self) -> None:
        for cache in self._cache.values():
            cache.clear()

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], backbone: str = MAIN) -> Tensor:
        """L2-normalised image embeddings (N, D), float32, on `device`, in batches."""
        encoder, preprocess = self.backbones[backbone]
        out = []
        for i in range(0, len(images), self.batch_size):
            x = preprocess(images[i : i + self.batch_size]).to(self.device)  # (B, 3, H, W)
            out.append(nn.functional.normalize(encoder.encode_image(x).float(), dim=-1))  # (B, D)
        if not out:
            return torch.empty(0, 0, device=self.device)
        return torch.cat(out)

    def similarity(
        self,
        sources: Sequence[Image.Image],
        renders: Sequence[Image.Image],
        source_keys: Sequence[Hashable] | None = None,
        backbone: str = MAIN,
    ) -> Tensor:
        """cos<f(source_i), f(render_i)> for i < N, shape (N,), in [-1, 1], on the CPU."""
        n_keys = len(sources) if source_keys is None else len(source_keys)
        if not len(sources) == len(renders) == n_keys:
            raise ValueError(
                f"similarity needs aligned lists: {len(sources)} sources, {len(renders)} renders, "
                f"{'no' if source_keys is None else len(source_keys)} keys"
            )
        if not sources:
            return torch.empty(0)
        # Without keys, nothing is kept between calls, but repeats of one image object within the
        # call (a source shared by its G renders) are still encoded once.
        cache = self._cache[backbone] if source_keys is not None else {}
        keys = list(source_keys) if source_keys is not None else [id(s) for s in sources]
        missing: dict[Hashable, Image.Image] = {}
        for key, image in zip(keys, sources):
            if key not in cache:
                missing.setdefault(key, image)
        if missing:
            cache.update(zip(missing, self.embed(list(missing.values()), backbone)))
        src = torch.stack([cache[k] for k in keys])  # (N, D)
        rec = self.embed(renders, backbone)  # (N, D)
        return (src * rec).sum(-1).clamp(-1.0, 1.0).cpu()  # (N,) cosine of unit vectors

    def scores_all_backbones(
        self,
        sources: Sequence[Image.Image],
        renders: Sequence[Image.Image],
        source_keys: Sequence[Hashable] | None = None,
    ) -> dict[str, Tensor]:
        """Backbone name -> (N,) cosine, for the reward model ("clip") and every extra backbone."""
        return {name: self.similarity(sources, renders, source_keys, name) for name in self.backbones}

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        """Native reward signature: kwargs["images"], kwargs["renders"] (None = no render, no
        score) and optionally kwargs["image_ids"], each aligned with `completions`."""
        images, renders = kwargs.get("images"), kwargs.get("renders")
        if images is None or renders is None:
            raise ValueError("the CLIP reward needs kwargs 'images' and 'renders' (one per completion)")
        ids = kwargs.get("image_ids")
        keep = [i for i, r in enumerate(renders) if r is not None]
        scores: list[float | None] = [None] * len(completions)
        if keep:
            sims = self.similarity(
                [images[i] for i in keep],
                [renders[i] for i in keep],
                None if ids is None else [ids[i] for i in keep],
            )
            for i, s in zip(keep, sims.tolist()):
                scores[i] = s
        return scores
