"""Decoder policy: an SD3-style flow-matching diffusion transformer with its VAE (UAE sec. 2.1).

`build_decoder(name, ...)` builds either the paper's SD3.5 from the hub (production) or a tiny,
randomly initialised `SD3Transformer2DModel` + `AutoencoderKL` from configs in code (CPU tests and
the embedded default). The text encoders of SD3 are not used: the connector's output replaces
their prompt embeddings (`encoder_hidden_states`), and the pooled projection is a learned vector
owned by the connector.
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

        SD3 takes the timestep as sigma * 1000, in float32. Padded condition positions are zeroed:
        SD3's joint attention has no key mask, so zero vectors are what padding looks like to it.
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


def build_decoder(name: str, *, image_size: int = 32, shift: float = 3.0, dtype: str = "float32",
                  seed: int = 0, path: str | None = None, joint_attention_dim: int = 32) -> Decoder:
    """Build the decoder named by a recipe.

    Args:
        name: "tiny" (random, from code), or a diffusers pipeline id / folder with `transformer/`
            and `vae/` subfolders (e.g. "stabilityai/stable-diffusion-3.5-large").
        image_size: square output resolution in pixels.
        shift: SD3's sigma shift (3.0 for SD3/SD3.5).
        path: a folder with saved tiny weights (`transformer/`, `vae/` in diffusers layout).
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch_dtype = getattr(torch, dtype)
    if name == "tiny" and not path:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**tiny_transformer_config(image_size, joint_attention_dim))
        vae = AutoencoderKL(**tiny_vae_config())
    else:
        source = path or name
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype)
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "scheduler", "scheduler_config.json")):
            import json

            with open(os.path.join(source, "scheduler", "scheduler_config.json")) as f:
                shift = float(json.load(f).get("shift", shift))
    if torch_dtype != torch.float32:
        transformer.to(torch_dtype)
        vae.to(torch_dtype)
    vae.requires_grad_(False).eval()
    return Decoder(transformer=transformer, vae=vae, shift=shift, image_size=image_size)


def sd35_large() -> dict:
    """The paper's decoder (UAE sec. 2.1): SD3.5-large, joint attention width 4096, 1024 px."""
    return {"name": "stabilityai/stable-diffusion-3.5-large", "dtype": "bfloat16", "image_size": 1024}
