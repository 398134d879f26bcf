"""Decoder policy: an SD3-style flow-matching diffusion transformer with its VAE (UAE sec. 2.1).

`build_decoder(name, ...)` builds the paper's SD3.5 from the hub (production), a tiny randomly
initialised `SD3Transformer2DModel` + `AutoencoderKL` (CPU tests and the embedded default), or, with
`random_init`, a published architecture (SD3.5-large or -medium, and SD3's VAE) from its configs in
code with random weights at a reduced depth (the production code path on a CPU).
`build_decoder_from_config` is the fully parameterised in-code builder; `tiny_transformer_config`,
`sd35_large_transformer_config`, `sd35_medium_transformer_config`, `tiny_vae_config` and
`sd3_vae_config` fill in the numbers.

The text encoders of SD3 are not used: the connector's output replaces their prompt embeddings
(`encoder_hidden_states`), and the pooled projection is a learned vector owned by the connector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Decoder:
    """A flow-matching DiT, its VAE, and the SD3 scheduler's shift."""

    transformer: torch.nn.Module  # may later be wrapped by peft
    vae: torch.nn.Module  # frozen
    shift: float  # SD3's timestep shift (FlowMatchEulerDiscreteScheduler.shift)
    image_size: int  # pixels of the square images it renders

    @property
    def joint_attention_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    @property
    def pooled_projection_dim(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.image_size // self.vae_scale
        return (batch, int(self.transformer.config.in_channels), side, side)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                 pooled: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """v_theta(x_sigma, sigma, c): latents (B, C, h, w), sigma (B,), cond (B, T, D), pooled (B, P).

        SD3 takes the timestep as sigma * 1000, in float32. Padded condition positions (cond_mask
        False) are zeroed. Zeros are NOT neutral: SD3's joint attention has no key mask and its
        `context_embedder` has a bias, so every pad slot is an attended token and the output depends
        on T. A caption renders the same alone or in any batch only because every condition has one
        fixed T (`pad_condition`, `Models.condition`; shared/DESIGN.md, "Conditioning independent of
        the batch").
        """
        if cond_mask is not None:
            cond = cond * cond_mask.unsqueeze(-1).to(cond.dtype)
        dtype = next(self.transformer.parameters()).dtype
        out = self.transformer(
            hidden_states=latents.to(dtype),
            # float32 whatever the model dtype, as diffusers' SD3 pipeline and Flow-GRPO pass it: in
            # bfloat16 (8 significant bits) a timestep near 1000 moves by up to 2. SD3's time projection
            # computes its sinusoids from it in float32, then casts to the pooled input's dtype.
            timestep=sigma.float() * 1000.0,
            encoder_hidden_states=cond.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
        )[0]
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], differentiable."""
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.decode(latents.to(next(self.vae.parameters()).dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (B, C, h, w) (the VAE posterior mode)."""
        cfg = self.vae.config
        dist = self.vae.encode(images * 2 - 1).latent_dist
        return (dist.mode() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def pad_condition(cond: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad cond (N, T, D) / mask (N, T) with zeros / False to exactly `length` positions, or
    keep the first `length` (the fixed conditioning length, as SD3 pads or truncates T5 to 256
    tokens). Padded positions are zeros, as `Decoder.velocity` zeroes every masked position."""
    if cond.shape[1] >= length:
        return cond[:, :length], mask[:, :length]
    extra = length - cond.shape[1]
    cond = torch.cat([cond, cond.new_zeros(cond.shape[0], extra, cond.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return cond, mask


def tiny_transformer_config(image_size: int = 32, joint_attention_dim: int = 32) -> dict:
    """A 2-layer SD3 DiT over 8x8 latents: forward pass in a few ms on a CPU."""
    return {
        "sample_size": image_size // 4,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": joint_attention_dim,
        "caption_projection_dim": 32,
        "pooled_projection_dim": 32,
        "out_channels": 4,
        "pos_embed_max_size": 16,
    }


def tiny_vae_config() -> dict:
    """A 3-level AutoencoderKL (downsample 4) with 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    }


def sd35_large_transformer_config(num_layers: int | None = None) -> dict:
    """`SD3Transformer2DModel` arguments of stabilityai/stable-diffusion-3.5-large, UAE's decoder
    (sec. 2.1), from its published transformer/config.json: 38 MMDiT blocks of 38 heads x 64
    (width 2432), patch 2 over 16 latent channels, joint attention (text) width 4096 projected to
    2432, pooled width 2048, RMS q/k norm, no dual-attention (MMDiT-X) blocks, a 192 x 192 position
    grid cropped to the input (sample_size 128 = 1024 px / 8).

    num_layers: fewer blocks (None: the published 38), for dry runs. The last block is always
    `context_pre_only` (diffusers builds it so), as in the published model.
    """
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 38 if num_layers is None else _at_least_one(num_layers),
        "attention_head_dim": 64,
        "num_attention_heads": 38,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
        "dual_attention_layers": (),
        "qk_norm": "rms_norm",
    }


def sd35_medium_transformer_config(num_layers: int | None = None) -> dict:
    """`SD3Transformer2DModel` arguments of stabilityai/stable-diffusion-3.5-medium (MMDiT-X), from
    its published transformer/config.json: 24 blocks of 24 heads x 64 (width 1536), caption
    projection 1536, joint attention width 4096, pooled 2048, patch 2 over 16 latent channels, RMS
    q/k norm, a 384 x 384 position grid, and dual (self + joint) attention in blocks 0-12.

    num_layers: fewer blocks (None: the published 24); the dual-attention blocks kept are those
    below it (at 1 or 2 layers every block has dual attention).
    """
    layers = 24 if num_layers is None else _at_least_one(num_layers)
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": layers,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(i for i in range(13) if i < layers),
        "qk_norm": "rms_norm",
    }


def sd3_vae_config() -> dict:
    """`AutoencoderKL` arguments of the SD3 / SD3.5 VAE (vae/config.json of SD3.5-large and
    -medium, the same autoencoder): 4 levels of 128, 256, 512, 512 channels (downsample 8), 2
    ResNet layers per block, 16 latent channels, latents scaled as (z - 0.0609) * 1.5305, no
    quant / post-quant convolutions. Always full size (84M parameters): it has no depth to cut."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def _at_least_one(num_layers: int) -> int:
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    return num_layers


# Published pipelines whose architecture can be built from configs in code (`random_init`):
# name -> transformer config builder (num_layers); both use `sd3_vae_config()`.
RANDOM_INIT_DECODERS = {
    "stabilityai/stable-diffusion-3.5-large": sd35_large_transformer_config,
    "stabilityai/stable-diffusion-3.5-medium": sd35_medium_transformer_config,
}


def build_decoder_from_config(transformer_config: dict, vae_config: dict, *, image_size: int, shift: float = 3.0,
                              dtype: torch.dtype = torch.float32, seed: int = 0) -> Decoder:
    """A randomly initialised SD3Transformer2DModel and AutoencoderKL from their config arguments,
    built in float32 under `torch.manual_seed(seed)` (transformer first), then cast to `dtype`;
    the VAE frozen."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_config)
    vae = AutoencoderKL(**vae_config)
    return _finish(transformer, vae, shift, image_size, dtype)


def _finish(transformer: torch.nn.Module, vae: torch.nn.Module, shift: float, image_size: int,
            dtype: torch.dtype) -> Decoder:
    if dtype != torch.float32:
        transformer.to(dtype)
        vae.to(dtype)
    vae.requires_grad_(False).eval()
    return Decoder(transformer=transformer, vae=vae, shift=shift, image_size=image_size)


def build_decoder(name: str, *, image_size: int = 32, shift: float = 3.0, dtype: str = "float32",
                  seed: int = 0, path: str | None = None, joint_attention_dim: int = 32,
                  random_init: dict | None = None) -> Decoder:
    """Build the decoder named by a recipe.

    Args:
        name: "tiny" (random, from code), or a diffusers pipeline id / folder with `transformer/`
            and `vae/` subfolders (e.g. "stabilityai/stable-diffusion-3.5-large").
        image_size: square output resolution in pixels.
        shift: SD3's sigma shift (3.0 for SD3/SD3.5).
        path: a folder with saved tiny weights (`transformer/`, `vae/` in diffusers layout).
        random_init: build the published architecture `name` from its configs in code with random
            weights instead of loading it, e.g. {"num_layers": 1} (None value: the published
            depth); the VAE is built full size. Names: `RANDOM_INIT_DECODERS`.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch_dtype = getattr(torch, dtype)
    if random_init is not None:
        if name not in RANDOM_INIT_DECODERS:
            raise ValueError(f"random_init: no config in code for {name!r}; supported: {sorted(RANDOM_INIT_DECODERS)}")
        if path:
            raise ValueError("random_init builds random weights: it cannot be combined with a weights path")
        return build_decoder_from_config(RANDOM_INIT_DECODERS[name](**random_init), sd3_vae_config(),
                                         image_size=image_size, shift=shift, dtype=torch_dtype, seed=seed)
    if name == "tiny" and not path:
        return build_decoder_from_config(tiny_transformer_config(image_size, joint_attention_dim), tiny_vae_config(),
                                         image_size=image_size, shift=shift, dtype=torch_dtype, seed=seed)
    source = path or name
    transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype)
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "scheduler", "scheduler_config.json")):
        import json

        with open(os.path.join(source, "scheduler", "scheduler_config.json")) as f:
            shift = float(json.load(f).get("shift", shift))
    return _finish(transformer, vae, shift, image_size, torch_dtype)


def sd35_large() -> dict:
    """The paper's decoder (UAE sec. 2.1): SD3.5-large, joint attention width 4096, 1024 px."""
    return {"name": "stabilityai/stable-diffusion-3.5-large", "dtype": "bfloat16", "image_size": 1024}
