"""Encoder policy: a Qwen2.5-VL vision-language model that captions an image (UAE sec. 2.1).

Two layers of builders, torchtune-style:

- `build_encoder(name, ...)` is what a recipe calls: a hub id (`from_pretrained`, production), the
  name `"tiny"` (CPU tests and the embedded default), or a published name with `random_init` (the
  published architecture from its config in code, random weights, optionally fewer layers: the
  production code path on a CPU, DESIGN.md "Real architectures on CPU").
- `build_qwen_vl(config, tokenizer, ...)` is the fully parameterised in-code builder: a randomly
  initialised `Qwen2_5_VLForConditionalGeneration`, a word-level tokenizer and the real
  `Qwen2_5_VLProcessor` built in-process (no hub download). The code path after construction is the
  same as for a hub model.
- `tiny_encoder_config(vocab_size)`, `qwen25_vl_3b_config()` and the named builders
  `build_tiny_encoder`, `build_random_qwen25_vl_3b` fill in the numbers.

The chat prompt is UAE's Unified-Bench captioning prompt (sec. 3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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

# Their ids in Qwen2.5's tokenizer (Qwen/Qwen2.5-VL-3B-Instruct, tokenizer_config.json
# "added_tokens_decoder"; config.json's image_token_id / video_token_id / vision_*_token_id).
QWEN25_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}

# Qwen's chat layout, written out so the tiny tokenizer and a hub tokenizer see the same text.
CHAT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{user}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# Qwen2.5-VL's own chat template (Qwen/Qwen2.5-VL-3B-Instruct, chat_template.json), given to the
# in-code processors and saved with every export. With `caption_messages` and
# add_generation_prompt=True it renders exactly CHAT_TEMPLATE (tests/rollouts/test_qwen_inputs.py).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def caption_messages(system: str = UAE_CAPTION_PROMPT, user: str = USER_INSTRUCTION) -> list[dict]:
    """The caption request as chat messages (one image, then the instruction): what
    `processor.apply_chat_template(..., add_generation_prompt=True)` turns into CHAT_TEMPLATE."""
    return [{"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]


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

    def messages(self) -> list[dict]:
        """The chat messages whose chat-template rendering is `prompt_text()`."""
        return caption_messages(self.system_prompt, self.user_prompt)

    def resized(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Images as the encoder sees them: RGB squares of `image_size` (as given without one).
        Already-resized images pass through (PIL would return an identical copy)."""
        if self.image_size is None:
            return list(images)
        size = (self.image_size, self.image_size)
        return [im if im.mode == "RGB" and im.size == size else im.convert("RGB").resize(size, Image.BICUBIC)
                for im in images]

    def prepare(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch of images, all with the same prompt (left padding): every key
        the processor returns, none dropped.

        For Qwen2.5-VL: input_ids (B, P), attention_mask (B, P), mm_token_type_ids (B, P) (0 text,
        1 image token), pixel_values (sum of patches, D), image_grid_thw (B, 3). The model computes
        its 3-D M-RoPE positions of the image tokens (Qwen2.5-VL `get_rope_index`) only when
        mm_token_type_ids is passed; without it every token gets a 1-D text position.
        """
        images = self.resized(images)
        text = [self.prompt_text()] * len(images)
        out = self.processor(text=text, images=list(images), return_tensors="pt", padding=True)
        return dict(out)

    def decode(self, token_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Caption strings from completion ids (B, T) and their mask (B, T)."""
        texts = []
        for ids, m in zip(token_ids.tolist(), mask.tolist()):
            kept = [t for t, keep in zip(ids, m) if keep and t != self.eos_token_id]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        return texts


def build_word_tokenizer(words: Sequence[str], special_ids: Mapping[str, int] | None = None):
    """A word-level fast tokenizer over a closed vocabulary, built in-process (no hub download).

    Holds Qwen's special tokens so that the real Qwen2.5-VL processor works with it unchanged.
    Words are split on whitespace and punctuation; unknown words map to `<unk>`.

    special_ids: None puts the special tokens right after `<unk>` (ids 1-7, the tiny models);
        `QWEN25_SPECIAL_IDS` puts them at Qwen2.5's real ids (151643...), so that a model with
        Qwen's vocabulary (151,936) and config sees the ids it was built for. Words keep the low
        ids either way; ids that name no token decode to nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in ["<unk>", *(QWEN_SPECIAL_TOKENS if special_ids is None else ()), *words]:
        if tok not in vocab and tok not in (special_ids or {}):
            vocab[tok] = len(vocab)
    if special_ids is not None:
        if set(special_ids) != set(QWEN_SPECIAL_TOKENS):
            raise ValueError(f"special_ids must give an id to each of {QWEN_SPECIAL_TOKENS}")
        if len(vocab) > min(special_ids.values()):
            raise ValueError(f"{len(vocab)} words do not fit below the first special id {min(special_ids.values())}")
        vocab.update(special_ids)
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


def qwen25_vl_3b_config(num_layers: int | None = None, vision_depth: int | None = None) -> dict:
    """`Qwen2_5_VLConfig` keyword arguments of Qwen/Qwen2.5-VL-3B-Instruct, UAE's encoder (sec. 2.1).

    Numbers from the model's published config.json (huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct):
    text hidden 2048, intermediate 11008, 36 layers, 16 heads (head dim 128), 2 KV heads, vocabulary
    151,936, rope_theta 1e6 with M-RoPE sections [16, 24, 24] (temporal, height, width; they sum to
    the rotary half-dimension 64), tied embeddings, 128,000 positions, RMSNorm eps 1e-6; vision tower
    32 blocks of width 1280 (intermediate 3420, 16 heads), patch 14, 2x2 spatial merge, temporal
    patch 2, window attention over 112-pixel windows except the full-attention blocks 7, 15, 23, 31,
    output width 2048 (= the LM's). Special token ids as in `QWEN25_SPECIAL_IDS`.

    num_layers / vision_depth: fewer LM layers / vision blocks (None: the published 36 / 32), for
    dry runs. A reduced vision tower keeps the full-attention indexes that still exist, and at
    least one (its last block), so that both attention kinds of the tower stay on the code path.
    """
    layers = 36 if num_layers is None else num_layers
    depth = 32 if vision_depth is None else vision_depth
    if layers < 1 or depth < 1:
        raise ValueError(f"num_layers ({num_layers}) and vision_depth ({vision_depth}) must be at least 1")
    fullatt = [i for i in (7, 15, 23, 31) if i < depth] or [depth - 1]
    ids = QWEN25_SPECIAL_IDS
    return {
        "text_config": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": layers,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "use_sliding_window": False,
            "sliding_window": 32768,
            "max_window_layers": 70,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],  # generation_config.json: pad_token_id 151643
        },
        "vision_config": {
            "depth": depth,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "hidden_act": "silu",
            "in_channels": 3,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": fullatt,
            "tokens_per_second": 2,
        },
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
    }


# Qwen/Qwen2.5-VL-3B-Instruct's preprocessor_config.json: Qwen2VLImageProcessor with
# min_pixels 56*56 and max_pixels 12845056 (= 28*28*16384); patch, merge and temporal patch sizes
# come from the vision config, mean and std are the processor class's (OpenAI CLIP's).
QWEN25_VL_MIN_PIXELS = 3136
QWEN25_VL_MAX_PIXELS = 12845056


def build_qwen_vl(
    config: dict,
    tokenizer: Any,
    *,
    image_size: int | None,
    min_pixels: int,
    max_pixels: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Encoder:
    """A randomly initialised Qwen2_5_VLForConditionalGeneration from `config` (Qwen2_5_VLConfig
    keyword arguments), with `tokenizer` inside the real `Qwen2_5_VLProcessor`.

    The special token ids of the config (bos/eos/pad, image/video/vision start/end) are taken from
    the tokenizer, so that model and tokenizer agree whatever ids the tokenizer gives them. The
    image processor is the real `Qwen2VLImageProcessor` at the vision config's patch, merge and
    temporal patch sizes, resizing within [min_pixels, max_pixels] (Qwen's smart_resize).
    The model is built in float32 under `torch.manual_seed(seed)`, then cast to `dtype`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tid = tokenizer.convert_tokens_to_ids
    special = {"bos_token_id": tid("<|endoftext|>"), "eos_token_id": tid("<|im_end|>"),
               "pad_token_id": tokenizer.pad_token_id}
    cfg = {**config, "text_config": {**config["text_config"], **special},
           "image_token_id": tid("<|image_pad|>"), "video_token_id": tid("<|video_pad|>"),
           "vision_start_token_id": tid("<|vision_start|>"), "vision_end_token_id": tid("<|vision_end|>")}
    vision = cfg["vision_config"]
    sizes = {"patch_size": vision["patch_size"], "merge_size": vision["spatial_merge_size"],
             "temporal_patch_size": vision["temporal_patch_size"]}
    image_processor = Qwen2VLImageProcessor(**sizes, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    video_processor = Qwen2VLVideoProcessor(**sizes)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=QWEN25_VL_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).to(dtype)
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    return Encoder(model=model, processor=processor, tokenizer=tokenizer, image_size=image_size)


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
    """A randomly initialised tiny Qwen2_5_VLForConditionalGeneration with an in-process tokenizer
    (special tokens at ids 1-7, vocabulary = the tokenizer's), patch 4, every image resized to
    exactly `image_size`."""
    tokenizer = build_word_tokenizer([*_prompt_words(), *vocabulary])
    config = tiny_encoder_config(len(tokenizer), hidden_size, num_layers, 4, vision_hidden_size, vision_depth,
                                 rope_theta)
    pixels = image_size * image_size
    return build_qwen_vl(config, tokenizer, image_size=image_size, min_pixels=pixels, max_pixels=pixels,
                         seed=seed, dtype=dtype)


def build_random_qwen25_vl_3b(
    vocabulary: Sequence[str] = (),
    image_size: int | None = None,
    num_layers: int | None = None,
    vision_depth: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Encoder:
    """Qwen2.5-VL-3B-Instruct's architecture (`qwen25_vl_3b_config`) with random weights, at
    `num_layers` LM layers and `vision_depth` vision blocks (None: the published depth).

    The tokenizer is the in-process word-level one over the prompt words and `vocabulary`, with
    Qwen2.5's special tokens at their real ids; the model keeps Qwen's 151,936-row vocabulary.
    The image processor is Qwen's at its real sizes (patch 14, merge 2, temporal 2): with
    `image_size` set, images are resized to that square and the processor keeps exactly that many
    pixels (a multiple of 28 avoids a further resize); None: Qwen's own min/max pixels.
    In float32, the 151,936 x 2048 embeddings (tied with the LM head) alone are 1.2 GB.
    """
    tokenizer = build_word_tokenizer([*_prompt_words(), *vocabulary], special_ids=QWEN25_SPECIAL_IDS)
    config = qwen25_vl_3b_config(num_layers, vision_depth)
    if image_size is None:
        lo, hi = QWEN25_VL_MIN_PIXELS, QWEN25_VL_MAX_PIXELS
    else:
        lo = hi = image_size * image_size
    return build_qwen_vl(config, tokenizer, image_size=image_size, min_pixels=lo, max_pixels=hi, seed=seed,
                         dtype=dtype)


# Published names whose architecture can be built from a config in code (`random_init`).
RANDOM_INIT_ENCODERS = {"Qwen/Qwen2.5-VL-3B-Instruct": build_random_qwen25_vl_3b}


def build_encoder(name: str, *, vocabulary: Sequence[str] = (), image_size: int | None = 32,
                  dtype: str = "float32", seed: int = 0, path: str | None = None,
                  random_init: Mapping[str, Any] | None = None, **tiny: Any) -> Encoder:
    """Build the encoder named by a recipe.

    Args:
        name: "tiny" for the in-code random model, else a hub id or a local folder
            (e.g. "Qwen/Qwen2.5-VL-3B-Instruct").
        vocabulary: extra words for the in-process tokenizer (tiny and random_init; ignored for
            hub models).
        image_size: square size images are resized to (None: the processor's own resizing).
        dtype: "float32" or "bfloat16".
        path: a folder of saved tiny weights (`save_pretrained` layout) to load instead of random.
        random_init: build the published architecture `name` from its config in code with random
            weights instead of loading it, e.g. {"num_layers": 1, "vision_depth": 1} (a None
            value: the published depth). Names: `RANDOM_INIT_ENCODERS`.
    """
    torch_dtype = getattr(torch, dtype)
    if random_init is not None:
        if name not in RANDOM_INIT_ENCODERS:
            raise ValueError(f"random_init: no config in code for {name!r}; supported: {sorted(RANDOM_INIT_ENCODERS)}")
        if path:
            raise ValueError("random_init builds random weights: it cannot be combined with a weights path")
        return RANDOM_INIT_ENCODERS[name](vocabulary, image_size=image_size, seed=seed, dtype=torch_dtype,
                                          **random_init)
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
    if getattr(processor, "chat_template", None) is None:  # a folder saved without one
        processor.chat_template = QWEN25_VL_CHAT_TEMPLATE
    return Encoder(model=model, processor=processor, tokenizer=processor.tokenizer, image_size=image_size)


def qwen25_vl_3b() -> dict:
    """The paper's encoder (UAE sec. 2.1): Qwen2.5-VL-3B-Instruct, hidden size 2048."""
    return {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "dtype": "bfloat16", "image_size": None}


TINY_CONFIG_FILE = "tiny_config.json"
# Architecture numbers a saved tiny encoder folder may fix that the recipe has no field for.
_FOLDER_ONLY = ("vision_hidden_size", "vision_depth", "rope_theta")


def _saved_tiny_config(path: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The vision-tower numbers saved beside tiny weights (`tiny_config.json`, written by
    rl.shapes.pretrain), so that a folder describes its own architecture. Numbers the recipe also sets
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
