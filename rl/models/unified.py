"""The unified auto-encoder: encoder -> caption -> connector -> decoder, with LoRA on both policies.

`build_models(recipe)` is the one place where a recipe becomes modules. Every process that holds
the models (learner, rollout actors) calls it with the same recipe and seed, so base weights agree;
adapters and connector are then synchronised by `trainable_state` / `load_trainable_state`.

The reference policy of each side is the same module with its adapter disabled (`reference()`),
never a second copy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from rl.config import AdapterConfig, Recipe
from rl.models.connector import Connector
from rl.models.decoder import Decoder, build_decoder
from rl.models.encoder import Encoder, build_encoder

# Only the language model's attention: the vision tower stays frozen (UAE follows Flow-GRPO's LoRA).
ENCODER_LORA_TARGETS = r".*language_model.*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
# Flow-GRPO's SD3 targets: both streams' attention projections.
DECODER_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

ADAPTER = "default"


@dataclass
class Models:
    encoder: Encoder  # encoder.model is a peft PeftModel
    connector: Connector
    decoder: Decoder  # decoder.transformer carries a diffusers/peft LoRA adapter
    device: torch.device

    def parameters(self, policy: str) -> list[torch.nn.Parameter]:
        """Trainable parameters of `encoder` (LoRA), `decoder` (LoRA) or `connector`."""
        if policy == "encoder":
            return [p for n, p in self.encoder.model.named_parameters() if "lora_" in n]
        if policy == "decoder":
            return [p for n, p in self.decoder.transformer.named_parameters() if "lora_" in n]
        if policy == "connector":
            return [p for n, p in self.connector.named_parameters() if n != "layer_logits" or self.connector.layers == "learned"]
        raise ValueError(f"unknown policy {policy!r}")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Adapters and connector as one flat CPU state dict (what crosses to rollout actors)."""
        state = {}
        for n, p in self.encoder.model.named_parameters():
            if "lora_" in n:
                state[f"encoder.{n}"] = p.detach().cpu().clone()
        for n, p in self.decoder.transformer.named_parameters():
            if "lora_" in n:
                state[f"decoder.{n}"] = p.detach().cpu().clone()
        for n, t in self.connector.state_dict().items():
            state[f"connector.{n}"] = t.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `trainable_state`; every key must match (a silent miss would desync policies)."""
        enc = dict(self.encoder.model.named_parameters())
        dec = dict(self.decoder.transformer.named_parameters())
        conn = {}
        for key, value in state.items():
            part, name = key.split(".", 1)
            if part == "encoder":
                enc[name].copy_(value)
            elif part == "decoder":
                dec[name].copy_(value)
            elif part == "connector":
                conn[name] = value
            else:
                raise KeyError(f"unexpected key {key!r} in a trainable state")
        if conn:
            self.connector.load_state_dict(conn, strict=True)

    @contextlib.contextmanager
    def reference(self, policy: str) -> Iterator[None]:
        """The reference policy: the same model with its adapter disabled (UAE eq. 2's pi_ref)."""
        if policy == "encoder":
            with self.encoder.model.disable_adapter():
                yield
        elif policy == "decoder":
            self.decoder.transformer.disable_adapters()
            try:
                yield
            finally:
                self.decoder.transformer.enable_adapters()
        else:
            raise ValueError(f"no reference for {policy!r}")

    def condition(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder conditioning from captions alone: (cond (N, L, D), mask (N, L), pooled (N, P)).

        The caption is re-read by the encoder's language model as text (no image), so that the
        reconstruction depends on what the caption says and nothing else: the caption is the
        auto-encoder's bottleneck. A leading <|im_start|> keeps empty captions non-empty.
        Differentiable: stage 1 calls it with gradients on.
        """
        n = caption_ids.shape[0]
        start = torch.full((n, 1), self.encoder.tokenizer.convert_tokens_to_ids("<|im_start|>"),
                           dtype=caption_ids.dtype, device=caption_ids.device)
        ids = torch.cat([start, caption_ids], dim=1)
        mask = torch.cat([torch.ones_like(start), caption_mask.to(caption_ids.dtype)], dim=1)
        # Drop EOS/pad from the text: the decoder should see words only.
        eos = self.encoder.eos_token_id
        mask = mask * (ids != eos).to(mask.dtype)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.encoder.pad_token_id))
        # Right-align nothing: causal attention with right padding leaves real tokens untouched.
        out = self.encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        cond, pooled = self.connector(out.hidden_states)
        return cond, mask.bool(), pooled


def _encoder_lora(model: torch.nn.Module, cfg: AdapterConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules or ENCODER_LORA_TARGETS, init_lora_weights=True,
    )
    return get_peft_model(model, lora, adapter_name=ADAPTER)


def _decoder_lora(transformer: torch.nn.Module, cfg: AdapterConfig) -> None:
    from peft import LoraConfig

    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian",
        target_modules=cfg.target_modules or DECODER_LORA_TARGETS,
    )
    transformer.add_adapter(lora, adapter_name=ADAPTER)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_models(recipe: Recipe, device: torch.device | None = None, vocabulary: list[str] | None = None) -> Models:
    """Build encoder (+LoRA), connector and decoder (+LoRA) exactly as the recipe says."""
    from rl.shapes import VOCABULARY

    m = recipe.models
    device = device or resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    encoder = build_encoder(
        m.encoder.name, vocabulary=vocabulary if vocabulary is not None else VOCABULARY,
        image_size=m.encoder.image_size, dtype=m.encoder.dtype, seed=recipe.seed, path=m.encoder.path,
        **({"hidden_size": m.encoder.hidden_size, "num_layers": m.encoder.num_layers} if m.encoder.name == "tiny" else {}),
    )
    decoder = build_decoder(
        m.decoder.name, image_size=m.decoder.image_size, shift=m.decoder.shift, dtype=m.decoder.dtype,
        seed=recipe.seed + 1, path=m.decoder.path,
    )
    encoder.model.requires_grad_(False)
    decoder.transformer.requires_grad_(False)
    torch.manual_seed(recipe.seed + 2)
    connector = Connector(
        hidden_size=encoder.hidden_size, cond_dim=decoder.joint_attention_dim,
        pooled_dim=decoder.pooled_projection_dim, num_layers=encoder.num_layers,
        layers=m.connector.layers, mlp_ratio=m.connector.mlp_ratio,
        freeze_after_steps=m.connector.freeze_after_steps,
    )
    if m.connector.path:
        from safetensors.torch import load_file

        connector.load_state_dict(load_file(m.connector.path), strict=True)
    torch.manual_seed(recipe.seed + 3)
    encoder.model = _encoder_lora(encoder.model, m.encoder.adapter)
    _decoder_lora(decoder.transformer, m.decoder.adapter)
    models = Models(encoder=encoder, connector=connector, decoder=decoder, device=device)
    encoder.model.to(device)
    decoder.transformer.to(device)
    decoder.vae.to(device)
    connector.to(device)
    return models
