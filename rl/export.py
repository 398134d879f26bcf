"""Export a checkpoint as folders that load with peft and diffusers alone, and push them to the Hub.

    python -m rl.export runs/tiny/checkpoints/step-000019 exported/
    python -m rl.export runs/tiny exported/ --merge-encoder              # the run's newest checkpoint
    python -m rl.export runs/tiny exported/ --push-to-hub me/unified-grpo-tiny --private

    exported/
      encoder/                 peft adapter: PeftModel.from_pretrained(base, "exported/encoder")
                               + chat_template.jinja and caption_prompt.json (in every encoder folder):
                               the chat template, messages and generate() settings the project captions with
      encoder/base/            the base Qwen2.5-VL and its processor, when it was built from a config
                               (`name: tiny` or `random_init`); adapter_config.json's base_model_name_or_path
                               is "encoder/base", relative to the export folder
      encoder_merged/          --merge-encoder: the base with the LoRA merged in, and the processor
      decoder/                 pytorch_lora_weights.safetensors: SD3Pipeline.load_lora_weights("exported/decoder")
      decoder/base/            a diffusers SD3 folder (transformer/, vae/, scheduler/, model_index.json)
                               when the decoder was built from a config; else the Hub id in the card
      connector/               model.safetensors + config.json (encoder hidden states -> decoder conditioning)
      README.md                model card: base models; code that captions an image, rebuilds the connector
                               in torch and renders a caption (transformers, peft, diffusers, torch only);
                               recipe, stages, final metrics

No file of an export holds an absolute path: bases are named relative to the export folder, by Hub
id, or (a local `path`) by the folder's name; absolute paths in the card's recipe become
`<local>/<last part>`.

The push uploads the folder with huggingface_hub (`HfApi.create_repo` + `upload_folder`); the token
comes from HF_TOKEN or `hf auth login` and is never printed. A failed push keeps the local export.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import torch
import yaml

from rl.adapters import merge_into_base

log = logging.getLogger("unified_grpo.export")

TAGS = ["unified-grpo", "grpo", "lora"]
MODEL_INDEX = {  # SD3Pipeline without its text encoders: the connector replaces them
    "_class_name": "StableDiffusion3Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": [None, None], "tokenizer": [None, None],
    "text_encoder_2": [None, None], "tokenizer_2": [None, None],
    "text_encoder_3": [None, None], "tokenizer_3": [None, None],
    "image_encoder": [None, None], "feature_extractor": [None, None],
}
_SECRET_KEYS = ("token", "api_key", "apikey", "secret", "password")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the name transformers' processors save and load
CAPTION_PROMPT_FILE = "caption_prompt.json"


class ExportError(RuntimeError):
    """An export or push that cannot be done; the message says why and what to do."""


def resolve_checkpoint(path: str) -> tuple[str, bool]:
    """(a checkpoint directory, whether its files were already checked against the manifest):
    `path` itself, or the newest complete one under a run's output or checkpoints dir."""
    from rl import checkpoint as ckpt

    if os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
        return path, False
    for root in (os.path.join(path, "checkpoints"), path):
        found, skipped = ckpt.find_latest(root)  # checks every file's sha256
        for bad, reason in skipped:
            log.warning("ignoring incomplete checkpoint %s: %s", bad, reason)
        if found:
            return found, True
    raise ExportError(f"no complete checkpoint at {path} (expected a checkpoints/step-NNNNNN directory "
                      f"with a {ckpt.MANIFEST}, or a run directory holding some)")


def export_checkpoint(checkpoint: str, out_dir: str, merge_encoder: bool = False, ema: bool = False) -> str:
    """Write the export folders of `checkpoint` to `out_dir` (see the module docstring).

    The folders are written under a temporary name and renamed at the end. ema: the decoder LoRA
    from the learner's EMA (`grpo.decoder.ema_decay`) instead of the raw weights.
    """
    from rl import checkpoint as ckpt
    from rl.config import Recipe
    from rl.models.unified import build_models

    path, verified = resolve_checkpoint(checkpoint)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not empty; export into a new folder")
    c = ckpt.load_checkpoint(path, verify=not verified)
    try:
        recipe = Recipe.model_validate(c.recipe)
    except ValueError as e:
        raise ExportError(f"the recipe saved in {path} does not validate with this code:\n{e}") from None
    kinds = {part: getattr(recipe.models, part).adapter.kind for part in ("encoder", "decoder")}
    weights = dict(c.weights)
    if ema:
        shadow = (c.state["learner"].get("ema") or {}).get("shadow")
        if not shadow:
            raise ExportError(f"{path} has no EMA weights (grpo.decoder.ema_decay was not set); drop --ema")
        weights.update(shadow)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_dir)), f".tmp-export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    final = os.path.abspath(out_dir)
    models = build_models(recipe, torch.device("cpu"))
    models.load_trainable_state(weights)
    m, tokens = recipe.models, recipe.rollout.caption.max_new_tokens
    bases = {
        # peft/diffusers load a LoRA as an adapter; LoKr and the Kronecker adapter (kadapter) are
        # exported merged into their base (no inference cost, and no project code to load them).
        "encoder": _export_encoder(models, os.path.join(tmp, "encoder"), _saves_base(m.encoder),
                                   _base_reference(m.encoder), merge_encoder, tokens)
        if kinds["encoder"] == "lora" else _export_merged_encoder(models, os.path.join(tmp, "encoder"), tokens),
        "decoder": _export_decoder(models, os.path.join(tmp, "decoder"), _saves_base(m.decoder),
                                   _base_reference(m.decoder))
        if kinds["decoder"] == "lora" else _export_merged_decoder(models, os.path.join(tmp, "decoder")),
    }
    _export_connector(models, recipe, os.path.join(tmp, "connector"))
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(c, recipe, bases, merged=merge_encoder, ema=ema))
    if os.path.exists(final):
        os.rmdir(final)  # empty (checked above)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.rename(tmp, final)
    return final


def _saves_base(cfg) -> bool:
    """Whether a model's base weights go into the export: when they exist nowhere else, i.e. the
    model was built from a config in code (`name: tiny`, or `random_init` for a published
    architecture; a tiny model's `path` is the pretraining cache, also this machine's only)."""
    return cfg.name == "tiny" or cfg.random_init is not None


def _base_reference(cfg) -> str:
    """How an export names a base it does not hold: the Hub id, or for a local `path` the folder's
    name alone (an export holds no absolute path; the card says to point it at your copy)."""
    return os.path.basename(os.path.normpath(cfg.path)) if cfg.path else cfg.name


def _export_encoder(models, out: str, save_base: bool, hub_base: str, merge: bool, max_new_tokens: int) -> str:
    """peft adapter in `out`; the base in `out/base` when it exists nowhere else. Returns the base.
    adapter_config.json's base_model_name_or_path is relative to the export folder ("encoder/base")
    or the Hub id: never an absolute path."""
    peft_model = models.encoder.model
    base_ref = "encoder/base" if save_base else hub_base
    peft_model.peft_config["default"].base_model_name_or_path = base_ref
    peft_model.save_pretrained(out, save_embedding_layers=False)  # LoRA on attention only: no embeddings
    _save_caption_prompt(models.encoder, out, max_new_tokens)  # the base may be a Hub id: the prompt travels with the adapter
    if merge:  # on a copy: the adapter itself is saved above and the base below
        _save_encoder_folder(merge_into_base(copy.deepcopy(peft_model)), models.encoder,
                             os.path.join(os.path.dirname(out), "encoder_merged"), max_new_tokens)
    if save_base:  # the LoRA modules removed, nothing merged: the exact base weights
        _save_encoder_folder(peft_model.unload(), models.encoder, os.path.join(out, "base"), max_new_tokens)
    return "encoder/base" if save_base else hub_base


def _save_encoder_folder(model, encoder, out: str, max_new_tokens: int) -> None:
    """A transformers folder: the model, its processor (with the chat template) and the caption prompt."""
    model.save_pretrained(out)
    encoder.processor.save_pretrained(out)
    _save_caption_prompt(encoder, out, max_new_tokens)


def _save_caption_prompt(encoder, out: str, max_new_tokens: int) -> None:
    """`chat_template.jinja` (the processor's chat template; AutoProcessor loads it) and
    `caption_prompt.json`: the messages the project captions every image with, and the exact prompt
    text `apply_chat_template(messages, add_generation_prompt=True)` renders (Encoder.prompt_text)."""
    from rl.models.encoder import QWEN25_VL_CHAT_TEMPLATE

    os.makedirs(out, exist_ok=True)
    template = getattr(encoder.processor, "chat_template", None) or QWEN25_VL_CHAT_TEMPLATE
    with open(os.path.join(out, CHAT_TEMPLATE_FILE), "w") as f:
        f.write(template)
    prompt = {
        "system": encoder.system_prompt, "user": encoder.user_prompt, "messages": encoder.messages(),
        "add_generation_prompt": True, "prompt": encoder.prompt_text(),
        # what the project resizes an image to before the processor (None: the processor's own resizing)
        "image_size": encoder.image_size,
        # generate() keywords of the project's captions (rollouts/captions.py): EOS <|im_end|>, and the
        # vision and chat-control tokens a caption may never contain
        "generation": {"eos_token_id": encoder.eos_token_id, "pad_token_id": encoder.pad_token_id,
                       "suppress_tokens": encoder.suppressed_ids,
                       "max_new_tokens": max_new_tokens},
        "doc": "UAE sec. 3 captioning prompt. processor.apply_chat_template(messages, add_generation_prompt=True, "
               "tokenize=False) == prompt; then processor(text=[prompt], images=[image]) and pass everything it "
               "returns to the model (mm_token_type_ids included: Qwen2.5-VL's M-RoPE image positions need it).",
    }
    with open(os.path.join(out, CAPTION_PROMPT_FILE), "w") as f:
        json.dump(prompt, f, indent=2)


def _export_decoder(models, out: str, save_base: bool, hub_base: str) -> str:
    """LoRA in diffusers' format (`transformer.` keys, LoRA config in the safetensors metadata so
    that alpha/r survive); the base pipeline folder in `out/base` when it exists nowhere else."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    transformer = models.decoder.transformer
    StableDiffusion3Pipeline.save_lora_weights(
        out, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="default"),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    if save_base:
        transformer.unload_lora()
        _save_sd3_folder(transformer, models.decoder, os.path.join(out, "base"))
    return "decoder/base" if save_base else hub_base


def _save_sd3_folder(transformer, decoder, out: str) -> None:
    """A diffusers SD3 folder without text encoders: transformer/, vae/, scheduler/, model_index.json."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer.save_pretrained(os.path.join(out, "transformer"))
    decoder.vae.save_pretrained(os.path.join(out, "vae"))
    FlowMatchEulerDiscreteScheduler(shift=decoder.shift).save_pretrained(os.path.join(out, "scheduler"))
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({**MODEL_INDEX, "_diffusers_version": diffusers.__version__}, f, indent=2)


def _export_merged_encoder(models, out: str, max_new_tokens: int) -> str:
    """A non-LoRA encoder adapter merged into the base: `Qwen2_5_VLForConditionalGeneration
    .from_pretrained(out)` and `AutoProcessor.from_pretrained(out)` load it, no peft needed."""
    _save_encoder_folder(merge_into_base(models.encoder.model), models.encoder, out, max_new_tokens)
    return "encoder (merged)"


def _export_merged_decoder(models, out: str) -> str:
    """A non-LoRA decoder adapter merged into the base: a diffusers folder (transformer/, vae/,
    scheduler/) whose transformer loads with `SD3Transformer2DModel.from_pretrained(out,
    subfolder="transformer")`, no peft needed."""
    _save_sd3_folder(merge_into_base(models.decoder.transformer), models.decoder, out)
    return "decoder (merged)"


def _export_connector(models, recipe, out: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in models.connector.state_dict().items()},
              os.path.join(out, "model.safetensors"))
    config = {
        "hidden_size": models.encoder.hidden_size, "num_layers": models.encoder.num_layers,
        "cond_dim": models.decoder.joint_attention_dim, "pooled_dim": models.decoder.pooled_projection_dim,
        **{k: v for k, v in recipe.models.connector.model_dump(mode="json").items() if k != "path"},
        "doc": "UAE sec. 2.1: the encoder's hidden states of the caption (layer selection `layers`) "
               "-> proj (Linear, GELU, Linear) -> the decoder's encoder_hidden_states; `pooled` fills "
               "its pooled_projections. Keys as in rl/models/connector.py.",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------
def model_card(c, recipe, bases: dict[str, str], merged: bool = False, ema: bool = False) -> str:
    """README.md: front matter (tags, Hub base models), what is where, how to load, the stages
    trained, the final metrics per stage and the recipe (secrets redacted)."""
    hub_bases = [bases[p] for p in ("encoder", "decoder")
                 if bases[p] == getattr(recipe.models, p).name and not _saves_base(getattr(recipe.models, p))]
    front = {"library_name": "peft", "tags": TAGS}
    if hub_bases:
        front["base_model"] = hub_bases
    enc, dec = recipe.models.encoder, recipe.models.decoder
    stages = recipe.stages()[: c.step]
    counts = {s: stages.count(s) for s in ("warmup", "cold_start", "encoder", "decoder")}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        "# Unified-GRPO adapters", "",
        "A unified multimodal auto-encoder trained with GRPO (UAE): an encoder LVLM captions an image, a "
        "connector maps its hidden states to a diffusion decoder's conditioning, and the decoder "
        "reconstructs the image; both policies carry LoRA adapters.", "",
        "## Base models", "",
        "| part | base | adapter |", "|---|---|---|",
        f"| encoder | `{bases['encoder']}` ({enc.name}) | `encoder/` (peft LoRA r={enc.adapter.r}, "
        f"alpha={enc.adapter.alpha}) |",
        f"| decoder | `{bases['decoder']}` ({dec.name}) | `decoder/pytorch_lora_weights.safetensors` "
        f"(diffusers LoRA r={dec.adapter.r}, alpha={dec.adapter.alpha}{', EMA weights' if ema else ''}) |",
        f"| connector | - | `connector/` (`{recipe.models.connector.layers}` layers, Linear-GELU-Linear) |",
        "",
    ]
    if merged:
        lines += ["`encoder_merged/` holds the encoder with its LoRA merged in.", ""]
    if "(merged)" in bases["encoder"] or "(merged)" in bases["decoder"]:
        # LoKr and the Kronecker adapter are exported merged into their base: plain models.
        lines += [
            "## Loading (merged adapters)", "",
            f"The encoder adapter is `{enc.adapter.kind}` and the decoder adapter `{dec.adapter.kind}`; "
            "a non-LoRA adapter is merged into its base weights (dW = sum_i A_i kron u_i v_i^T for "
            "`kadapter`), so the folder is a plain model:", "", "```python",
            "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration",
            "from diffusers import SD3Transformer2DModel", "",
            "encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(\"encoder\")  # if merged",
            "processor = AutoProcessor.from_pretrained(\"encoder\")",
            "transformer = SD3Transformer2DModel.from_pretrained(\"decoder\", subfolder=\"transformer\")  # if merged",
            "```", "", "A LoRA part, if any, loads as below.", "",
        ]
    lines += [
        *_usage_sections(recipe, bases),
        "## Training stages", "",
        f"Checkpoint step {c.step} of {len(recipe.stages())}: "
        + ", ".join(f"{k} {v} steps" for k, v in counts.items() if v) + ".", "",
        "Schedule: "
        + (f"{recipe.schedule.warmup_steps} decoder warm-up steps (UAE sec. 2.2), then "
           if recipe.schedule.warmup_steps else "")
        + f"{recipe.schedule.cold_start_steps} cold-start steps (UAE eq. 3), then "
        + ", ".join(f"{p.stage} {p.steps}" for p in recipe.schedule.phases)
        + f" x {recipe.schedule.cycles} cycles (encoder: caption GRPO, UAE sec. 2.3; "
        "decoder: trajectory GRPO, UAE eq. 4).", "",
        "## Final metrics", "",
    ]
    metrics = c.trainer.get("metrics") or {}
    if metrics:
        keys = ["step", "reward_mean", "reward_std", "loss", "kl", "clip_frac", "caption_len_mean"]
        lines += ["| stage | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for stage, row in metrics.items():
            lines.append(f"| {stage} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    else:
        lines.append("No steps were trained.")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(_portable(_redact(c.recipe)), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _usage_sections(recipe, bases: dict[str, str]) -> list[str]:
    """The card's "Use it" sections: python blocks that, run in order in the export folder, load the
    parts, caption an image greedily as the project does, rebuild the connector in ~10 lines of
    torch, build a caption's condition as `Models.condition` does (FIXED length; shared/DESIGN.md,
    "Conditioning independent of the batch") and render it with a stock SD3 pipeline: transformers,
    peft, diffusers and torch only. tests/rl/test_export.py runs them in a process without the
    project."""
    m, conn, t = recipe.models, recipe.models.connector, recipe.rollout.trajectory
    length = recipe.rollout.caption.max_new_tokens + 1
    enc_lora, dec_lora = m.encoder.adapter.kind == "lora", m.decoder.adapter.kind == "lora"
    enc_base, dec_base = bases["encoder"], bases["decoder"]
    hub = [bases[p] for p in ("encoder", "decoder") if bases[p] == getattr(m, p).name and not _saves_base(getattr(m, p))]
    local = [bases[p] for p in ("encoder", "decoder") if getattr(m, p).path and not _saves_base(getattr(m, p))]
    where = "".join([f"; base models from the Hub: {', '.join(f'`{b}`' for b in hub)}" if hub else "",
                     f"; {', '.join(f'`{b}`' for b in local)}: the name of the local folder the base was loaded "
                     "from in training, point it at your copy" if local else ""])
    load = (["base = Qwen2_5_VLForConditionalGeneration.from_pretrained(" + repr(enc_base).replace("'", '"') + ")",
             "encoder = PeftModel.from_pretrained(base, \"encoder\").eval()",
             "processor = AutoProcessor.from_pretrained(" + repr(enc_base).replace("'", '"') + ")"]
            if enc_lora else
            ["encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(\"encoder\").eval()  # merged",
             "processor = AutoProcessor.from_pretrained(\"encoder\")"])
    load += ["no_text = {k: None for k in (\"text_encoder\", \"tokenizer\", \"text_encoder_2\", \"tokenizer_2\",",
             "                             \"text_encoder_3\", \"tokenizer_3\")}  # the connector replaces them"]
    load += (["pipe = StableDiffusion3Pipeline.from_pretrained(" + repr(dec_base).replace("'", '"') + ", **no_text)",
              "pipe.load_lora_weights(\"decoder\")"] if dec_lora else
             ["pipe = StableDiffusion3Pipeline.from_pretrained(\"decoder\", **no_text)  # merged"])
    pooled_init = {
        "learned": "self.pooled = torch.nn.Parameter(torch.zeros(c[\"pooled_dim\"]))  # pooled: learned",
        "zeros": "self.register_buffer(\"pooled\", torch.zeros(c[\"pooled_dim\"]))  # pooled: zeros",
        "mean": "self.pooled_proj = torch.nn.Linear(c[\"hidden_size\"], c[\"pooled_dim\"])  # pooled: mean",
    }[conn.pooled]
    select = {
        "last": ["h = hidden[-1]  # layers: last"],
        "norm_avg": ["h = torch.stack([F.layer_norm(x.float(), x.shape[-1:]) for x in hidden[1:]]).mean(0)  # norm_avg"],
        "learned": ["w = torch.softmax(self.layer_logits.float(), 0)  # layers: learned",
                    "h = torch.einsum(\"l,lbth->bth\", w, torch.stack([F.layer_norm(x.float(), x.shape[-1:]) for x in hidden[1:]]))"],
    }[conn.layers]
    pooled = ("self.pooled_proj(h.float().mean(1).to(dtype))  # mean over the caption's positions"
              if conn.pooled == "mean" else "self.pooled[None]")
    read = ["    hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states  # reader: policy"]
    if conn.reader == "base" and enc_lora:  # the caption is re-read by the base encoder, its adapter off
        read = ["    with encoder.disable_adapter():  # connector.reader: base",
                "        hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states"]
    elif conn.reader == "base":  # a merged encoder has no adapter to switch off
        read = ["    # connector.reader: base read captions with the encoder's adapter OFF; this merged encoder",
                "    # carries it, so for training's condition load the base model here instead",
                "    hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states"]
    return [
        "## Use it: caption an image, render a caption", "",
        "The python blocks below, run in order in this folder, need transformers, peft, diffusers and "
        f"torch only{where}.", "",
        "### Loading", "", "```python",
        "import json", "",
        "import torch",
        "import torch.nn.functional as F",
        "from diffusers import StableDiffusion3Pipeline",
        "from peft import PeftModel",
        "from PIL import Image",
        "from safetensors.torch import load_file",
        "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration", "",
        "torch.set_grad_enabled(False)  # inference only",
        *load,
        "```", "",
        "### Caption an image", "",
        f"The encoder captions with the chat template in `{CHAT_TEMPLATE_FILE}` and the messages in "
        f"`{CAPTION_PROMPT_FILE}` (both in every encoder folder; its `prompt` is the exact rendered text, "
        "`generation` the project's generate() settings, greedy here). Feed the model everything the "
        "processor returns, `mm_token_type_ids` included (without it Qwen2.5-VL gives image tokens 1-D "
        "instead of 3-D M-RoPE positions and captions differently):", "",
        "```python",
        "request = json.load(open(\"encoder/caption_prompt.json\"))",
        "image = Image.open(\"image.png\").convert(\"RGB\")  # your image",
        "if request[\"image_size\"]:  # the project's square resize before the processor",
        "    image = image.resize((request[\"image_size\"],) * 2, Image.Resampling.BICUBIC)",
        "text = processor.apply_chat_template(request[\"messages\"], add_generation_prompt=True, tokenize=False)",
        "inputs = processor(text=[text], images=[image], return_tensors=\"pt\")",
        "ids = encoder.generate(**inputs, do_sample=False, **request[\"generation\"])",
        "caption = processor.batch_decode(ids[:, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True)[0].strip()",
        "```", "",
        "### The connector", "",
        "`connector/` holds plain safetensors and `config.json`; this rebuilds it in torch (keys as in "
        "training):", "",
        "```python",
        "class Connector(torch.nn.Module):",
        "    def __init__(self, c):  # connector/config.json",
        "        super().__init__()",
        "        width = int(c[\"cond_dim\"] * c[\"mlp_ratio\"])",
        "        self.proj = torch.nn.Sequential(torch.nn.Linear(c[\"hidden_size\"], width), torch.nn.GELU(),",
        "                                        torch.nn.Linear(width, c[\"cond_dim\"]))",
        f"        {pooled_init}",
        *(["        self.layer_logits = torch.nn.Parameter(torch.zeros(c[\"num_layers\"]))"] if conn.layers == "learned" else []),
        "        self.register_buffer(\"steps_done\", torch.zeros((), dtype=torch.long))  # a training counter", "",
        "    def forward(self, hidden):  # the encoder's hidden_states: embeddings, then one per layer",
        *[f"        {line}" for line in select],
        "        dtype = self.proj[0].weight.dtype",
        f"        return self.proj(h.to(dtype)), {pooled}", "",
        "connector = Connector(json.load(open(\"connector/config.json\")))",
        "connector.load_state_dict(load_file(\"connector/model.safetensors\"))",
        "```", "",
        "### Render a caption", "",
        "A caption becomes the decoder's condition as in training: `<|im_start|>` + the caption's tokens read "
        "as text by the encoder "
        + ("with its adapter on" if conn.reader == "policy" else "with its adapter off")
        + f" (`connector.reader: {conn.reader}`), the connector, then zeros up to a FIXED length of "
        f"{length} positions (`rollout.caption.max_new_tokens + 1`; a longer caption keeps its first "
        f"{length - 1} tokens). SD3 pads its T5 prompt to 256 tokens for the same reason: its joint "
        "attention has no key mask, so the number of pad slots changes the image. Keep the length fixed "
        "and a caption renders the same alone or in any batch. The condition replaces SD3's text encoders "
        "(`prompt_embeds`, `pooled_prompt_embeds`); the empty caption is the unconditional (negative) "
        "condition of classifier-free guidance.", "",
        "```python",
        f"LENGTH = {length}  # fixed conditioning length: rollout.caption.max_new_tokens + 1", "",
        "def condition(caption: str) -> tuple[torch.Tensor, torch.Tensor]:",
        "    \"\"\"(prompt_embeds (1, LENGTH, D), pooled_prompt_embeds (1, P)) of one caption.\"\"\"",
        "    tok = processor.tokenizer",
        "    words = tok(caption, add_special_tokens=False).input_ids[: LENGTH - 1]",
        "    ids = torch.tensor([[tok.convert_tokens_to_ids(\"<|im_start|>\")] + words])",
        *read,
        "    cond, pooled = connector(hidden)",
        "    return F.pad(cond, (0, 0, 0, LENGTH - cond.shape[1])), pooled  # zeros up to the fixed length", "",
        "cond, pooled = condition(caption)",
        "uncond, upooled = condition(\"\")  # the unconditional (negative) condition: same length",
        "cond, pooled, uncond, upooled = (t.to(pipe.dtype) for t in (cond, pooled, uncond, upooled))",
        "render = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,",
        f"              negative_pooled_prompt_embeds=upooled, guidance_scale={t.cfg_scale},",
        f"              num_inference_steps={t.eval_steps}, height={m.decoder.image_size}, "
        f"width={m.decoder.image_size}).images[0]",
        "```", "",
    ]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _portable(tree: Any) -> Any:
    """`tree` with every absolute path (a string starting with / or a drive, or ~) replaced by
    `<local>/<its last part>`: an export names nothing of the machine it was made on."""
    if isinstance(tree, dict):
        return {k: _portable(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_portable(v) for v in tree]
    if isinstance(tree, str) and (os.path.isabs(tree) or tree.startswith("~") or re.match(r"^[A-Za-z]:[\\/]", tree)):
        return f"<local>/{os.path.basename(os.path.normpath(tree))}"
    return tree


def _redact(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: ("<redacted>" if any(s in str(k).lower() for s in _SECRET_KEYS) and v else _redact(v))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redact(v) for v in tree]
    return tree


# ----------------------------------------------------------------------------------------------
# push
# ----------------------------------------------------------------------------------------------
def push_to_hub(folder: str, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the model repo `repo_id` (created if needed); returns the commit URL.
    Token and endpoint come from huggingface_hub's usual places (HF_TOKEN / login, HF_ENDPOINT)."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ExportError("HF_HUB_OFFLINE is set: unset it (or set it to 0) to push")
    if not get_token():
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                             commit_message="Upload Unified-GRPO adapters (rl.export)")
    return str(getattr(info, "commit_url", info))


def _scrub(text: str) -> str:
    """The message with the Hub token (if any) masked: error texts can echo request details."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "hf_***") if token else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoints/step-NNNNNN directory, or a run directory (its newest)")
    parser.add_argument("out_dir", help="new folder for encoder/, decoder/, connector/, README.md")
    parser.add_argument("--merge-encoder", action="store_true", help="also write encoder_merged/ (LoRA merged in)")
    parser.add_argument("--ema", action="store_true", help="export the decoder LoRA's EMA (grpo.decoder.ema_decay)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from rl.checkpoint import CheckpointError

    t0 = time.time()
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, merge_encoder=args.merge_encoder, ema=args.ema)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out} in {time.time() - t0:.1f} s")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as e:  # any failure of the push: the export stays, the token never shows
            print(f"error: push to {args.push_to_hub} failed: {_scrub(f'{type(e).__name__}: {e}')}\n"
                  f"the export is kept in {out}; push it later with "
                  f"`hf upload {args.push_to_hub} {out} .`", file=sys.stderr)
            return 3
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
