"""Encoder policy: a Qwen2.5-VL vision-language model that captions an image (UAE sec. 2.1).

Two layers of builders, torchtune-style:

- `build_encoder(cfg)` is fully parameterised: a hub id (`from_pretrained`, production) or the
  name `"tiny"` (a randomly initialised `Qwen2_5_VLForConditionalGeneration` built from a config in
  code, with a word-level tokenizer and a processor built in-process, for CPU tests and the
  embedded default). The code path after construction is the same for both.
- `tiny_encoder_config(vocab_size)` and `qwen25_vl_3b()` fill in the numbers.

The chat prompt is UAE's Unified-Bench captioning prompt (sec. 3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

# UAE sec. 3, the prompt used to caption every source image.
UAE_CAPTION_PROMPT = (
    "You are a helpful assistant. Your task is to provide an accurate description based on the "
    "content of the image, helping the generation model to create an image based on your "
    "description. Ensure that your description is clear and comprehensive, so that the generation "
    "model can produce an image that closely matches the content of the image based on your input."
)
USER_INSTRUCTION = "Describe the image."

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen's chat layout, written out so the tiny tokenizer and a hub tokenizer see the same text.
CHAT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{user}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@dataclass
class Encoder:
    """A captioning LVLM and its processor. `model` may later be wrapped by peft."""

    model: torch.nn.Module
    processor: Any
    tokenizer: Any
    image_size: int | None  # images are resized to this square size before the processor
    system_prompt: str = UAE_CAPTION_PROMPT
    user_prompt: str = USER_INSTRUCTION

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.text_config.num_hidden_layers)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def suppressed_ids(self) -> list[int]:
        """Tokens a caption may never contain: vision placeholders and chat-control tokens (an
        `<|image_pad|>` in a caption would be read as an image slot). Masked identically in
        generation and in the learner's log-probs so the ratio compares the same distribution."""
        names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|endoftext|>"]
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in names]
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]

    def prompt_text(self) -> str:
        return CHAT_TEMPLATE.format(system=self.system_prompt, user=self.user_prompt)

    def resized(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Images as the encoder sees them: RGB squares of `image_size` (as given without one).
        Already-resized images pass through (PIL would return an identical copy)."""
        if self.image_size is None:
            return list(images)
        size = (self.image_size, self.image_size)
        return [im if im.mode == "RGB" and im.size == size else im.convert("RGB").resize(size, Image.BICUBIC)
                for im in images]

    def prepare(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch of images, all with the same prompt (left padding).

        Returns input_ids (B, P), attention_mask (B, P), pixel_values (sum of patches, D),
        image_grid_thw (B, 3).
        """
        images = self.resized(images)
        text = [self.prompt_text()] * len(images)
        out = self.processor(text=text, images=list(images), return_tensors="pt", padding=True)
        return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    def decode(self, token_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Caption strings from completion ids (B, T) and their mask (B, T)."""
        texts = []
        for ids, m in zip(token_ids.tolist(), mask.tolist()):
            kept = [t for t, keep in zip(ids, m) if keep and t != self.eos_token_id]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        return texts


def build_word_tokenizer(words: Sequence[str]):
    """A word-level fast tokenizer over a closed vocabulary, built in-process (no hub download).

    Holds Qwen's special tokens so that the real Qwen2.5-VL processor works with it unchanged.
    Words are split on whitespace and punctuation; unknown words map to `<unk>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in ["<unk>", *QWEN_SPECIAL_TOKENS, *words]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, tidies ' .'
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS,
    )
    fast.padding_side = "left"  # generation needs left padding
    return fast


def _prompt_words() -> list[str]:
    import re

    text = " ".join([UAE_CAPTION_PROMPT, USER_INSTRUCTION, "system user assistant"])
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


def tiny_encoder_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2,
                        patch_size: int = 4, vision_hidden_size: int = 32, vision_depth: int = 2,
                        rope_theta: float = 10000.0) -> dict:
    """Numbers for a tiny random Qwen2.5-VL that runs a forward pass in milliseconds on a CPU."""
    heads = 4
    head_dim = hidden_size // heads
    # mrope splits the rotary half-dimension over (temporal, height, width) positions.
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return {
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope},
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_hidden_size * 2,
            "num_heads": max(2, vision_hidden_size // 16),
            "out_hidden_size": hidden_size,
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": patch_size * 4,
            "fullatt_block_indexes": list(range(1, vision_depth, 2)),
        },
    }


def build_tiny_encoder(
    vocabulary: Sequence[str] = (),
    image_size: int = 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    rope_theta: float = 10000.0,
) -> Encoder:
    """A randomly initialised Qwen2_5_VLForConditionalGeneration with an in-process tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = build_word_tokenizer([*_prompt_words(), *vocabulary])
    patch = 4
    cfg_dict = tiny_encoder_config(len(tokenizer), hidden_size, num_layers, patch, vision_hidden_size, vision_depth,
                                   rope_theta)
    special = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    cfg_dict["text_config"].update(special)
    config = Qwen2_5_VLConfig(
        **cfg_dict,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    return Encoder(model=model, processor=processor, tokenizer=tokenizer, image_size=image_size)


def build_encoder(name: str, *, vocabulary: Sequence[str] = (), image_size: int | None = 32,
                  dtype: str = "float32", seed: int = 0, path: str | None = None, **tiny: Any) -> Encoder:
    """Build the encoder named by a recipe.

    Args:
        name: "tiny" for the in-code random model, else a hub id or a local folder
            (e.g. "Qwen/Qwen2.5-VL-3B-Instruct").
        vocabulary: extra words for the tiny tokenizer (ignored for hub models).
        image_size: square size images are resized to (None: the processor's own resizing).
        dtype: "float32" or "bfloat16".
        path: a folder of saved tiny weights (`save_pretrained` layout) to load instead of random.
    """
    torch_dtype = getattr(torch, dtype)
    if name == "tiny":
        tiny = {**tiny, **_saved_tiny_config(path, tiny)}
        enc = build_tiny_encoder(vocabulary, image_size=image_size or 32, seed=seed, dtype=torch_dtype, **tiny)
        if path:
            _load_weights(enc.model, path)
        return enc
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    source = path or name
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(source)
    processor.tokenizer.padding_side = "left"
    return Encoder(model=model, processor=processor, tokenizer=processor.tokenizer, image_size=image_size)


def qwen25_vl_3b() -> dict:
    """The paper's encoder (UAE sec. 2.1): Qwen2.5-VL-3B-Instruct, hidden size 2048."""
    return {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "dtype": "bfloat16", "image_size": None}


TINY_CONFIG_FILE = "tiny_config.json"
# Architecture numbers a saved tiny encoder folder may fix that the recipe has no field for.
_FOLDER_ONLY = ("vision_hidden_size", "vision_depth", "rope_theta")


def _saved_tiny_config(path: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The vision-tower numbers saved beside tiny weights (`tiny_config.json`, written by
    rl.pretrain), so that a folder describes its own architecture. Numbers the recipe also sets
    (hidden_size, num_layers) must agree with it: a mismatch would load weights into the wrong shapes."""
    if not path or not os.path.isfile(os.path.join(path, TINY_CONFIG_FILE)):
        return {}
    import json

    with open(os.path.join(path, TINY_CONFIG_FILE)) as f:
        saved = json.load(f)
    for key, value in saved.items():
        if key not in _FOLDER_ONLY and key in given and given[key] != value:
            raise ValueError(f"the tiny encoder in {path} has {key}={value}, the recipe asks for {given[key]}: "
                             f"set models.encoder.{key}: {value}, or point models.encoder.path elsewhere")
    return {k: v for k, v in saved.items() if k in _FOLDER_ONLY}


def _load_weights(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    state = load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"weights in {file} do not fit the encoder: unexpected keys {unexpected[:5]}")
