"""The unified auto-encoder: encoder -> caption -> connector -> decoder, with LoRA on both policies.

`build_models(recipe)` is the one place where a recipe becomes modules. Every process that holds
the models (learner, rollout actors) calls it with the same recipe and seed, so base weights agree;
adapters and connector are then synchronised by `trainable_state` / `load_trainable_state`.

The reference policy of each side is the same module with its adapter disabled (`reference()`),
never a second copy.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from rl import adapters
from rl.config import ConnectorConfig, Recipe
from rl.models.connector import Connector
from rl.models.decoder import Decoder, build_decoder, pad_condition
from rl.models.encoder import Encoder, build_encoder

log = logging.getLogger("unified_grpo.models")


@dataclass
class Models:
    encoder: Encoder  # encoder.model: a peft PeftModel (lora/lokr) or the LVLM with KAdapter layers
    connector: Connector
    decoder: Decoder  # decoder.transformer carries a diffusers/peft adapter or KAdapter layers
    device: torch.device
    reader: str = "policy"  # models.connector.reader: caption re-read with the encoder adapter on / off
    # Positions of every decoder condition (<|im_start|> + caption tokens, then padding), whatever
    # the batch: build_models sets rollout.caption.max_new_tokens + 1. None: the batch's own
    # length (rl/shapes/pretrain.py, which pads its caption pool to one length itself).
    cond_length: int | None = None

    def parameters(self, policy: str) -> list[torch.nn.Parameter]:
        """Trainable parameters of `encoder` (adapter), `decoder` (adapter) or `connector`."""
        if policy == "encoder":
            return adapters.adapter_parameters(self.encoder.model)
        if policy == "decoder":
            return adapters.adapter_parameters(self.decoder.transformer)
        if policy == "connector":
            return [p for n, p in self.connector.named_parameters() if n != "layer_logits" or self.connector.layers == "learned"]
        raise ValueError(f"unknown policy {policy!r}")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Adapters and connector as one flat CPU state dict (what crosses to rollout actors)."""
        state = {}
        # One copy to CPU whatever the device (.cpu().clone() would copy twice on a GPU).
        for n, p in adapters.named_adapter_parameters(self.encoder.model):
            state[f"encoder.{n}"] = p.detach().to("cpu", copy=True)
        for n, p in adapters.named_adapter_parameters(self.decoder.transformer):
            state[f"decoder.{n}"] = p.detach().to("cpu", copy=True)
        for n, t in self.connector.state_dict().items():
            state[f"connector.{n}"] = t.detach().to("cpu", copy=True)
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
            with adapters.disabled(self.encoder.model):
                yield
        elif policy == "decoder":
            with adapters.disabled(self.decoder.transformer):
                yield
        else:
            raise ValueError(f"no reference for {policy!r}")

    def read_captions(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor
                      ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The encoder LM's hidden states of captions read as text: (hidden_states (L+1 of (N, L', H)),
        mask (N, L')), what the connector turns into the decoder's conditioning.

        The caption is re-read as text (no image), so that the reconstruction depends on what the
        caption says and nothing else: the caption is the auto-encoder's bottleneck. A leading
        <|im_start|> keeps empty captions non-empty. With `reader == "base"` the encoder's adapter is
        off here, so training the caption policy leaves the conditioning unchanged.
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
        read = adapters.disabled(self.encoder.model) if self.reader == "base" else contextlib.nullcontext()
        with read:
            out = self.encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states, mask

    def condition(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder conditioning from captions alone: (cond (N, L, D), mask (N, L), pooled (N, P)).
        Differentiable: stage 1 calls it with gradients on.

        L is the fixed `cond_length` (shared/DESIGN.md, "Conditioning independent of the batch"), as
        SD3 pads its T5 prompt to 256 tokens: padding is not neutral in SD3's joint attention (the
        zeroed slots go through `context_embedder`, which has a bias, and are attended to), so a
        caption must see the same number of pad slots alone or beside a longer caption. Rule:
        <|im_start|> + the caption's tokens, then zeros (mask False) up to L; a longer
        caption keeps its first L - 1 tokens (a warning says so; rollouts never sample one, since
        L = max_new_tokens + 1). The encoder reads the caption causally with right padding, so the
        real positions, and `pooled: mean` (a mean over them), do not depend on the batch either.
        """
        if self.cond_length is not None and caption_ids.shape[1] > self.cond_length - 1:
            keep = self.cond_length - 1  # after the leading <|im_start|>
            if caption_mask[:, keep:].any():
                log.warning("captions longer than %d tokens are truncated to fit the decoder's fixed "
                            "conditioning length %d (rollout.caption.max_new_tokens + 1)", keep, self.cond_length)
            caption_ids, caption_mask = caption_ids[:, :keep], caption_mask[:, :keep]
        hidden_states, mask = self.read_captions(caption_ids, caption_mask)
        cond, pooled = self.connector(hidden_states, mask)
        mask = mask.bool()
        cond = cond * mask.unsqueeze(-1).to(cond.dtype)  # pad slots are zeros, whatever the encoder read there
        if self.cond_length is not None:
            cond, mask = pad_condition(cond, mask, self.cond_length)
        return cond, mask, pooled


def build_connector(cfg: ConnectorConfig, encoder: Encoder, decoder: Decoder) -> Connector:
    """The connector between these two models as `cfg` says; widths and depth from the models."""
    return Connector(
        hidden_size=encoder.hidden_size, cond_dim=decoder.joint_attention_dim,
        pooled_dim=decoder.pooled_projection_dim, num_layers=encoder.num_layers,
        layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, freeze_after_steps=cfg.freeze_after_steps,
        pooled=cfg.pooled,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_models(recipe: Recipe, device: torch.device | None = None, vocabulary: list[str] | None = None) -> Models:
    """Build encoder (+LoRA), connector and decoder (+LoRA) exactly as the recipe says. `vocabulary`:
    the tiny encoder's extra tokenizer words; None: the recipe's (rl.data.recipe_vocabulary: its
    generated world's caption words, e.g. the shapes world's)."""
    from rl.data import recipe_vocabulary

    m = recipe.models
    device = device or resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    encoder = build_encoder(
        m.encoder.name, vocabulary=vocabulary if vocabulary is not None else recipe_vocabulary(recipe),
        image_size=m.encoder.image_size, dtype=m.encoder.dtype, seed=recipe.seed, path=m.encoder.path,
        random_init=m.encoder.random_init,
        **({"hidden_size": m.encoder.hidden_size, "num_layers": m.encoder.num_layers} if m.encoder.name == "tiny" else {}),
    )
    decoder = build_decoder(
        m.decoder.name, image_size=m.decoder.image_size, shift=m.decoder.shift, dtype=m.decoder.dtype,
        seed=recipe.seed + 1, path=m.decoder.path, random_init=m.decoder.random_init,
    )
    encoder.model.requires_grad_(False)
    decoder.transformer.requires_grad_(False)
    torch.manual_seed(recipe.seed + 2)
    connector = build_connector(m.connector, encoder, decoder)
    if m.connector.path:
        from safetensors.torch import load_file

        connector.load_state_dict(load_file(m.connector.path), strict=True)
    torch.manual_seed(recipe.seed + 3)
    encoder.model = adapters.apply_adapter(encoder.model, m.encoder.adapter, "encoder")  # a PeftModel for lora/lokr
    adapters.apply_adapter(decoder.transformer, m.decoder.adapter, "decoder")  # in place
    # <|im_start|> + at most max_new_tokens caption tokens: the longest condition a rollout makes.
    models = Models(encoder=encoder, connector=connector, decoder=decoder, device=device, reader=m.connector.reader,
                    cond_length=recipe.rollout.caption.max_new_tokens + 1)
    encoder.model.to(device)
    decoder.transformer.to(device)
    decoder.vae.to(device)
    connector.to(device)
    return models
