"""The recipe schema: one place for every option of a Unified-GRPO run and its default.

A recipe is a YAML file validated by `Recipe`. Unknown fields, wrong types, out-of-range numbers,
missing files and unknown rewards are refused by `load_recipe` with a `RecipeError` that names the
field path, before Ray or any model starts. Defaults come from the papers:

- UAE (seeds/uae_unified_grpo.txt): the three stages, CLIP reconstruction reward, eq. 1-4.
- Flow-GRPO (cited by UAE for the decoder side and its LoRA settings): LoRA r=32/alpha=64,
  noise level a=0.7, 10 training steps / 40 evaluation steps, clip range 1e-4, advantages clipped
  to +-5, KL beta 0.04, learning rate 3e-4.
- GRPO (DeepSeekMath) and ReaDe (seeds/reade_caption_reward.txt, table 10) for the caption side:
  epsilon 0.2, group of 8, learning rate 1e-6..1e-5.
The embedded default `recipes/tiny.yaml` scales the sizes down for a CPU; it keeps the algorithm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Stage = Literal["warmup", "cold_start", "encoder", "decoder"]


class RecipeError(ValueError):
    """A recipe that cannot run. The message names the field path and what to do."""


SEED_MAX = 2**32 - 1  # numpy's seed range; torch and python take it too, and seed * 1_000_003 + step fits in 64 bits
MAX_GENERATE = 1_000_000  # data.generate.n: generated images are held in memory
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything near this size is not one


class _Section(BaseModel):
    # allow_inf_nan=False: every float field of the tree refuses nan and +-inf at load (an lr of
    # .inf or a reward weight of nan would otherwise validate and poison the weights or advantages).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class AdapterConfig(_Section):
    """The trainable adapter on a policy (`rl/adapters.py`). LoRA settings follow Flow-GRPO (UAE sec. 2.1)."""

    kind: Literal["lora", "lokr", "kadapter"] = Field(
        "lora",
        description="Adapter kind. `lora`: peft LoRA, dW = B A (rank r). `lokr`: peft LoKr, dW = w1 (kron) w2, "
        "one Kronecker term per module (w1 about n x n, w2 of rank r). `kadapter`: the thesis's KAdaptation "
        "(ch. 2 eq. 2.4, ch. 9 eq. 9.2), dW = sum_{i=1..n} A_i (kron) u_i v_i^T with the n x n slow weights A_i "
        "shared by all adapted layers of the policy: a rank-r LoRA's parameter count, rank up to n^2 r.",
    )
    r: int = Field(32, gt=0, description="Rank of the low-rank factor (LoRA: B A; LoKr: w2; kadapter: each u_i v_i^T). "
                   "Flow-GRPO and UAE (LoRA): 32.")
    alpha: float = Field(64.0, gt=0, description="Scale alpha/r on dW, for every kind. Flow-GRPO: 64.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter path (LoKr: module dropout). "
                           "0 keeps rollouts and learner identical.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. None: the policy's default (encoder: the language "
        "model's q/k/v/o projections; decoder: the attention projections to_q/to_k/to_v/to_out.0 "
        "and add_q/k/v_proj, to_add_out).",
    )
    n: int = Field(4, gt=1, description="lokr and kadapter: size of the small Kronecker factor (n x n); kadapter "
                   "also sums n terms (thesis eq. 2.3). Must divide both dims of every adapted layer (checked when "
                   "the models are built). Ignored by lora.")
    shared: bool = Field(True, description="kadapter only: true (thesis) shares the slow weights A_1..A_n across all "
                         "adapted layers of the policy (n^3 parameters once); false gives each layer its own A.")
    init: Literal["default", "gaussian", "lycoris", "random"] = Field(
        "default",
        description="Initial adapter weights; every choice but `random` starts at dW = 0 (policy = reference). "
        "`default`: lora kaiming A / zero B on the encoder, gaussian A / zero B on the decoder (Flow-GRPO); "
        "lokr peft's default (w2 = 0); kadapter A ~ N(0, 1/n), u kaiming, v = 0. `gaussian`: lora only. "
        "`lycoris`: lokr only (LyCORIS's init). `random`: kadapter only, v random too (dW != 0: tests, ablations).",
    )

    @model_validator(mode="after")
    def _init_fits_kind(self) -> "AdapterConfig":
        allowed = {"gaussian": "lora", "lycoris": "lokr", "random": "kadapter"}
        if self.init in allowed and allowed[self.init] != self.kind:
            raise ValueError(f"init={self.init!r} is for kind {allowed[self.init]!r}, not {self.kind!r}: "
                             f"use init='default' or kind={allowed[self.init]!r}")
        return self


def _check_random_init(random_init: dict[str, int | None], name: str, names, keys: tuple[str, ...],
                       conflicts: dict[str, Any], name_field: str = "name") -> None:
    """The checks every `random_init` field shares: the architecture has a config in code, the keys
    are known and at least 1 (or null: the published depth), and nothing else loads weights."""
    names = sorted(names)
    if name not in names:
        raise ValueError(f"random_init: no config in code for {name_field} {name!r}; random_init builds one of "
                         f"{names}: set {name_field} to one of them, or random_init: null")
    for key, value in random_init.items():
        if key not in keys:
            raise ValueError(f"random_init: unknown key {key!r}; keys: {', '.join(keys)}")
        if value is not None and value < 1:
            raise ValueError(f"random_init.{key} must be at least 1 (or null: the published depth), got {value}")
    for field, value in conflicts.items():
        if value is not None:
            if field == "path":
                raise ValueError("random_init builds random weights, path loads saved ones: set one of them to null")
            raise ValueError(f"random_init builds random weights, {field} loads others: set {field}: null, "
                             "or random_init: null")


class EncoderConfig(_Section):
    """The captioning LVLM (UAE: Qwen2.5-VL-3B-Instruct)."""

    name: str = Field("tiny", description="`tiny` (random Qwen2.5-VL built in code, CPU) or a hub id / folder, e.g. `Qwen/Qwen2.5-VL-3B-Instruct`.")
    path: str | None = Field(None, description="Folder of saved weights to load into the tiny model (e.g. pretrained shapes encoder).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype. bfloat16 on GPU; float32 on CPU.")
    image_size: int | None = Field(32, gt=0, description="Square size source images are resized to before the processor. None: the processor's own resizing (production).")
    hidden_size: int = Field(64, gt=0, description="Tiny model only: language model width.")
    num_layers: int = Field(2, gt=0, description="Tiny model only: language model depth.")
    adapter: AdapterConfig = Field(default_factory=lambda: AdapterConfig(r=8, alpha=16.0))
    random_init: dict[str, int | None] | None = Field(
        None,
        description="Build the published architecture `name` from its config in code, with random weights, instead "
        "of loading it: the production code path as a dry run on a CPU (DESIGN.md, 'Real architectures on CPU'). "
        "Keys: `num_layers` (language-model layers; published 36) and `vision_depth` (vision blocks; published 32, "
        "the full-attention blocks that still exist are kept, at least one), each absent or null for the published "
        "depth, e.g. {num_layers: 1, vision_depth: 1}. Names with a config in code: Qwen/Qwen2.5-VL-3B-Instruct "
        "(rl/models/encoder.py `qwen25_vl_3b_config`, from its config.json). The tokenizer is an in-process "
        "word-level one (prompt and shapes-world words) with Qwen2.5's special tokens at their real ids; the image "
        "processor is Qwen's (patch 14, merge 2; min = max pixels = image_size^2 when image_size is set, else "
        "Qwen's 3136..12845056). Not with `path`. None (default): load `name` (or build `tiny`).",
    )

    @model_validator(mode="after")
    def _random_init_has_a_config(self) -> "EncoderConfig":
        if self.random_init is not None:
            from rl.models.encoder import RANDOM_INIT_ENCODERS

            _check_random_init(self.random_init, self.name, RANDOM_INIT_ENCODERS, ("num_layers", "vision_depth"),
                               {"path": self.path})
        return self
        from rl.models.encoder import RANDOM_INIT_ENCODERS

        names, keys = sorted(RANDOM_INIT_ENCODERS), ("num_layers", "vision_depth")
        if self.name not in names:
            raise ValueError(f"random_init: no config in code for name {self.name!r}; random_init builds one of "
                             f"{names}: set name to one of them, or random_init: null")
        for key, value in self.random_init.items():
            if key not in keys:
                raise ValueError(f"random_init: unknown key {key!r}; keys: {', '.join(keys)}")
            if value is not None and value < 1:
                raise ValueError(f"random_init.{key} must be at least 1 (or null: the published depth), got {value}")
        if self.path is not None:
            raise ValueError("random_init builds random weights, path loads saved ones: set one of them to null")
        return self


class DecoderConfig(_Section):
    """The flow-matching DiT and its VAE (UAE: SD3.5-large)."""

    name: str = Field("tiny", description="`tiny` (random SD3Transformer2DModel + AutoencoderKL built in code) or a diffusers pipeline id / folder, e.g. `stabilityai/stable-diffusion-3.5-large`.")
    path: str | None = Field(None, description="Folder of saved weights (diffusers layout: transformer/, vae/).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype.")
    image_size: int = Field(32, gt=0, description="Square render resolution in pixels (SD3.5: 1024).")
    shift: float = Field(3.0, gt=0, description="SD3's sigma shift for the flow-matching schedule (SD3/SD3.5: 3.0).")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    random_init: dict[str, int | None] | None = Field(
        None,
        description="Build the published architecture `name` from its configs in code, with random weights, instead "
        "of loading it: the production code path as a dry run on a CPU (DESIGN.md, 'Real architectures on CPU'). "
        "Key: `num_layers` (transformer blocks; published 38 for SD3.5-large, 24 for SD3.5-medium, whose "
        "dual-attention blocks 0-12 are kept below it), absent or null for the published depth, e.g. "
        "{num_layers: 1}. The VAE is SD3's, full size (rl/models/decoder.py `sd3_vae_config`). Names with a config "
        "in code: stabilityai/stable-diffusion-3.5-large, stabilityai/stable-diffusion-3.5-medium (their "
        "transformer/config.json and vae/config.json). Not with `path`. None (default): load `name` (or build `tiny`).",
    )

    @model_validator(mode="after")
    def _random_init_has_a_config(self) -> "DecoderConfig":
        if self.random_init is not None:
            from rl.models.decoder import RANDOM_INIT_DECODERS

            _check_random_init(self.random_init, self.name, RANDOM_INIT_DECODERS, ("num_layers",), {"path": self.path})
        return self
        from rl.models.decoder import RANDOM_INIT_DECODERS

        names = sorted(RANDOM_INIT_DECODERS)
        if self.name not in names:
            raise ValueError(f"random_init: no config in code for name {self.name!r}; random_init builds one of "
                             f"{names}: set name to one of them, or random_init: null")
        for key, value in self.random_init.items():
            if key != "num_layers":
                raise ValueError(f"random_init: unknown key {key!r}; keys: num_layers")
            if value is not None and value < 1:
                raise ValueError(f"random_init.{key} must be at least 1 (or null: the published depth), got {value}")
        if self.path is not None:
            raise ValueError("random_init builds random weights, path loads saved ones: set one of them to null")
        return self


class ConnectorConfig(_Section):
    """Encoder hidden states -> decoder conditioning (UAE sec. 2.1; GRAN-TED sec. 3.5)."""

    layers: Literal["last", "norm_avg", "learned"] = Field("last", description="`last`: last hidden state (UAE). `norm_avg`: mean of parameter-free LayerNorm(h_i) over the L transformer layers, embeddings excluded (GRAN-TED sec. 2.1 eq. 1; the paper's baseline). `learned`: softmax-weighted LayerNorm(h_i), trained then frozen after `freeze_after_steps` (GRAN-TED sec. 3.5 eqs. 3-4; the paper's best).")
    mlp_ratio: float = Field(2.0, gt=0, description="Hidden width of the 2-layer MLP projector, as a multiple of the decoder width.")
    freeze_after_steps: int | None = Field(None, ge=0, description="`learned` only: freeze the layer weights after this many optimiser steps (None: never). GRAN-TED trains them jointly for 12k of 20k steps, then freezes (appendix C.1).")
    pooled: Literal["learned", "zeros", "mean"] = Field("learned", description="What fills SD3's pooled conditioning vector (its CLIP pooled text embedding has no counterpart here). `learned` (default): one trainable vector shared by all captions. `zeros`: a fixed zero vector. `mean`: masked mean of the selected hidden state over caption tokens through a trainable Linear to the pooled width.")
    reader: Literal["policy", "base"] = Field("policy", description="Which encoder re-reads a caption to condition the decoder. `policy` (UAE sec. 3.3): the encoder with its adapter on, so stage 1 trains the encoder adapter through the conditioning and encoder GRPO also moves what the decoder hears (\"the LVLM emits last-hidden representations that maximize reconstruction\"). `base`: the adapter off, so encoder GRPO changes only what the caption says and the decoder keeps the conditioning it was trained on (UAE sec. 6's decoupled encoder/decoder); stage 1 then trains connector and decoder only.")
    path: str | None = Field(None, description="A connector.safetensors to start from.")


class ClipConfig(_Section):
    """The frozen CLIP image encoder f_I of the reconstruction reward (UAE sec. 2.3)."""

    model: str = Field("tiny", description="`tiny` (a custom open_clip config, random) or an open_clip model name, e.g. `ViT-L-14`.")
    pretrained: str | None = Field(None, description="open_clip pretrained tag, e.g. `openai`.")
    checkpoint: str | None = Field(None, description="A safetensors state dict to load (e.g. the pretrained shapes-world CLIP).")
    random_init: dict[str, int | None] | None = Field(
        None,
        description="Build the open_clip architecture `model` from its config (shipped with open_clip) with random "
        "weights: the production code path as a dry run on a CPU (DESIGN.md, 'Real architectures on CPU'). Key: "
        "`layers` (depth of both towers; ViT-L/14 publishes 24 vision / 12 text), absent or null for the published "
        "depth, e.g. {layers: 1}. Names: ViT-L-14 (rewards/clip.py `vit_l14_clip_config`, with OpenAI's QuickGELU). "
        "Not with `pretrained` or `checkpoint`. None (default): build `model` as they say.",
    )

    @model_validator(mode="after")
    def _random_init_has_a_config(self) -> "ClipConfig":
        if self.random_init is not None:
            from rewards.clip import RANDOM_INIT_CLIPS

            _check_random_init(self.random_init, self.model, RANDOM_INIT_CLIPS, ("layers",),
                               {"pretrained": self.pretrained, "checkpoint": self.checkpoint}, name_field="model")
        return self
        from rewards.clip import RANDOM_INIT_CLIPS

        names = sorted(RANDOM_INIT_CLIPS)
        if self.model not in names:
            raise ValueError(f"random_init: no config in code for model {self.model!r}; random_init builds one of "
                             f"{names}: set model to one of them, or random_init: null")
        for key, value in self.random_init.items():
            if key != "layers":
                raise ValueError(f"random_init: unknown key {key!r}; keys: layers")
            if value is not None and value < 1:
                raise ValueError(f"random_init.{key} must be at least 1 (or null: the published depth), got {value}")
        for field in ("pretrained", "checkpoint"):
            if getattr(self, field) is not None:
                raise ValueError(f"random_init builds random weights, {field} loads others: set {field}: null, "
                                 "or random_init: null")
        return self


class ModelsConfig(_Section):
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)


# ----------------------------------------------------------------------------------------------
# data and schedule
# ----------------------------------------------------------------------------------------------
class GenerateConfig(_Section):
    """The synthetic shapes world used when no data source is given."""

    n: int = Field(64, gt=0, le=MAX_GENERATE, description="Number of images to generate, at most 1,000,000 (they are "
                   "held in memory, about size^2 x 3 bytes each; more than half this machine's memory is refused too).")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Generator seed, 0 .. 2^32 - 1.")
    size: int = Field(32, gt=0, le=4096, description="Image side in pixels (at most 4096).")
    max_objects: int = Field(3, gt=0, description="At most this many shapes per image.")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> "GenerateConfig":
        need = self.n * (self.size * self.size * 3 + 2048)  # pixels + a PIL image's own bookkeeping
        total = _physical_memory()
        if total and need > total // 2:
            raise ValueError(f"{self.n} generated {self.size}x{self.size} images need about {need / 2**30:.1f} GiB, "
                             f"more than half of this machine's {total / 2**30:.1f} GiB: lower n or size")
        return self


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return None


class DataConfig(_Section):
    source: str | None = Field(None, description="An image folder, a Hugging Face `datasets` name or saved-dataset folder. None: generate images with `generator` (default the 32x32 shapes world, rl/shapes/world.py), valid only with tiny models (`tiny` or `random_init` encoder, decoder and CLIP): a recipe with published weights and no data source is refused at load.")
    image_column: str = Field("image", description="Image column of a `datasets` source.")
    split: str = Field("train", description="Split of a `datasets` source.")
    limit: int | None = Field(None, gt=0, description="Use at most this many images.")
    reference_column: str | None = Field(None, description="Column of reference caption texts (a string or a list of strings per image), passed to reward functions as `references`; e.g. the `text` column of an image folder's metadata.jsonl / metadata.csv (datasets' imagefolder convention). None: `text` or `caption` when the dataset has one, else no references. A named column the dataset lacks is refused at load.")
    on_bad_image: Literal["fail", "skip"] = Field("fail", description="An image that fails to decode (corrupt or truncated file, unknown format, a header announcing more than 2 x PIL's MAX_IMAGE_PIXELS: a decompression bomb). `fail`: exit 2 naming the file, before Ray starts. `skip`: leave it out; the count and the first file are logged.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    generator: str = Field("shapes", description="What generates the images when `source` is null (rl/data.py `Generator`: examples with ground truth, the words of their captions for the tiny tokenizer, exact per-caption metrics for rl.eval): a registered name (`shapes`: the shapes world, rl/shapes/source.py) or `module:function` returning a Generator. The trainer imports it only when named here; an unknown name is refused at load.")


class PhaseConfig(_Section):
    stage: Literal["encoder", "decoder"] = Field(description="`encoder`: stage 2, caption GRPO with the decoder frozen. `decoder`: stage 3, trajectory GRPO with the encoder frozen.")
    steps: int = Field(gt=0, description="Optimisation steps in this phase.")


class ScheduleConfig(_Section):
    """The decoder warm-up (UAE sec. 2.2), then stage 1 once, then the phases in order, repeated
    `cycles` times (UAE sec. 2.3)."""

    warmup_steps: int = Field(0, ge=0, description="Steps of the `warmup` stage before anything else (UAE sec. 2.2's long-caption decoder warm-up, rl/warmup.py; settings in the `warmup:` section): the frozen encoder captions each image at length under UAE's prompt (cached on disk), and the connector (and, with warmup.train_decoder_lora, the decoder LoRA) learn to render the image from that caption with the flow-matching loss. 0 (default): none. unified_grpo.yaml: 200.")
    cold_start_steps: int = Field(0, ge=0, description="Stage 1 steps (UAE eq. 3) before any RL.")
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [PhaseConfig(stage="encoder", steps=50), PhaseConfig(stage="decoder", steps=50)],
        description="The alternation, e.g. [{stage: encoder, steps: 50}, {stage: decoder, steps: 50}].",
    )
    cycles: int = Field(1, gt=0, description="How many times the phases repeat.")


# ----------------------------------------------------------------------------------------------
# rollouts, algorithm, rewards
# ----------------------------------------------------------------------------------------------
class CaptionSampling(_Section):
    max_new_tokens: int = Field(64, gt=0, description="Maximum caption length in tokens (ReaDe: 768).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use the same scaling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    backend: Literal["hf", "vllm", "vllm_server"] = Field(
        "hf",
        description="`hf`: transformers generate (default). `vllm`: an in-process vLLM engine on the rollout worker's GPU "
        "(TRL vllm_mode `colocate`); needs the `vllm` extra and a CUDA GPU. `vllm_server`: generation on a separate vLLM "
        "server on other GPUs or nodes (TRL vllm_mode `server`), started with `trl vllm-serve --model BASE "
        "--enable-scale-out` on the encoder's base weights; the rollout worker sends token-id prompts with the server's "
        "image features and pushes the encoder's merged LoRA modules after every weight sync through TRL's VLLMClient "
        "(NCCL: the rollout worker needs vLLM installed and a CUDA GPU too). Unlike TRL, which pushes every parameter, "
        "only the modules the LoRA changes are pushed. Both vLLM backends return processed log-probs and the learner "
        "applies grpo.encoder.vllm_importance_sampling_correction.")
    vllm_server_base_url: str | None = Field(None, description="backend `vllm_server`: the server's base URL, e.g. `http://10.0.0.2:8000`; when set, vllm_server_host and vllm_server_port are ignored (TRL vllm_server_base_url, default None).")
    vllm_server_host: str = Field("0.0.0.0", description="backend `vllm_server`: host of the server (TRL vllm_server_host, default 0.0.0.0).")
    vllm_server_port: int = Field(8000, gt=0, lt=65536, description="backend `vllm_server`: HTTP port of the server (TRL vllm_server_port, default 8000).")
    vllm_server_timeout: float = Field(240.0, ge=0, description="backend `vllm_server`: seconds to wait for the server to answer before the rollout worker fails with a ConnectionError (TRL vllm_server_timeout, default 240).")
    vllm_group_port: int = Field(51216, gt=0, lt=65536, description="backend `vllm_server`: port of the NCCL weight-update group between the rollout worker and the server (TRL vllm_group_port, default 51216).")
    generate_loop: Literal["lean", "hf"] = Field(
        "lean",
        description="backend `hf`: how tokens are sampled. `lean` (default): `rollouts.captions.lean_generate`, "
        "transformers generate's own preparation, logits processors and stopping in a plain per-token loop (prefill, "
        "then one cached forward per token): the same tokens as generate from the same seed (tests/rollouts/"
        "test_lean_generate.py), without generate's per-token bookkeeping. `hf`: `model.generate` itself (TRL's "
        "non-vLLM path).")
    top_k: int | None = Field(None, ge=0, description="Sample among the k most likely tokens (TRL GRPOConfig.top_k; TRL's default 0 = off). None or 0: off. As in TRL, log-probs are of the temperature-scaled distribution without the filter. hf backend only.")
    min_p: float | None = Field(None, ge=0, le=1, description="Drop tokens below min_p x the top probability (TRL GRPOConfig.min_p; default None = off). hf backend only.")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on tokens already in the prompt or caption (TRL GRPOConfig.repetition_penalty; 1.0 = off, TRL's default). hf backend only.")


class TrajectorySampling(_Section):
    num_steps: int = Field(10, gt=0, description="Denoising steps of a training rollout (Flow-GRPO: 10).")
    eval_steps: int = Field(40, gt=0, description="ODE steps for evaluation renders (Flow-GRPO: 40).")
    noise_level: float = Field(0.7, ge=0, description="SDE noise scale a (Flow-GRPO: 0.7).")
    sde_window: int | None = Field(None, gt=0, description="Only this many consecutive steps are stochastic and trained, the rest are ODE steps (the window is drawn per rollout inside `window_range`; Flow-GRPO-Fast: 2-3); None: no window. Implies step_selection `window`; exclusive with `timestep_fraction`.")
    window_range: tuple[int, int] | None = Field(None, description="Steps [lo, hi) the whole window must lie in, as Flow-GRPO-Fast's sde_window_range: the start is drawn uniformly in {lo, ..., hi - sde_window} (range (0, 6) with a window of 3: starts 0..3). hi - lo must be at least sde_window. None: anywhere in [0, num_steps). Only with sde_window.")
    timestep_fraction: float | None = Field(None, gt=0, le=1, description="Fraction f of the steps that are trained, for step_selection `random_subset` (round(f * num_steps) random steps, at least 1) or `flow_grpo` (the first int(f * num_steps), at least 1; Flow-GRPO: 0.99, i.e. 9 of 10). None: off (default). Exclusive with `sde_window`.")
    step_selection: Literal["all", "window", "random_subset", "flow_grpo"] | None = Field(
        None,
        description="Which steps are trained, and which are stochastic. `all`: every step is SDE and trained. `window`: "
        "`sde_window` consecutive steps (drawn per rollout) are SDE and trained, the rest ODE (Flow-GRPO-Fast). "
        "`random_subset`: round(timestep_fraction * num_steps) random steps (drawn per rollout) are SDE and trained, the "
        "rest ODE. `flow_grpo`: every step is SDE, the first int(timestep_fraction * num_steps) are trained (Flow-GRPO's "
        "train_sd3.py; with 0.99 and 10 steps, steps 0-8 are trained and the last is sampled but not trained). "
        "None (default): inferred from the other fields (`window` when sde_window is set, `random_subset` when "
        "timestep_fraction is, `all` otherwise). unified_grpo.yaml: flow_grpo with timestep_fraction 0.99.",
    )
    render_steps: int = Field(10, gt=0, description="ODE steps of the frozen decoder rendering captions in stage 2 and cold start.")
    cfg_scale: float = Field(1.0, ge=1, description="Classifier-free guidance scale s: v = v_u + s (v_c - v_u), with v_u the velocity for the empty caption (the connector's output for it). 1.0: off, one conditional pass. SD3/SD3.5 sample with 7.0 (Flow-GRPO samples and trains SD3.5 with 4.5; unified_grpo.yaml: 4.5); used in decoder rollouts and caption renders. Cold start never uses it.")
    cfg_in_training: bool = Field(True, description="With cfg_scale > 1: the learner's log-probs use the guided velocity (one batched conditional + unconditional pass, as the rollout sampled). False: the learner scores and trains the conditional velocity alone (half the compute; the rollout stores log-probs under that policy too). Flow-GRPO: true (train.cfg).")
    cfg_detach_uncond: bool = Field(
        False,
        description="With guidance in training (cfg_scale > 1 and cfg_in_training): stop the gradient through the "
        "unconditional velocity, v = sg(v_u) + s (v_c - sg(v_u)), as if v_u were computed under no_grad (values, "
        "ratios and the KL's value are unchanged; the one batched pass stays). False (default, Flow-GRPO): the "
        "gradient also flows through v_u, scaled by (1 - s), i.e. -3.5 at s = 4.5 (Flow-GRPO's train_sd3.py "
        "`compute_log_prob` runs both halves in one batched call with grad and combines them with no detach). "
        "true needs guidance in training: it is refused with cfg_scale 1 or cfg_in_training false.",
    )
    cps_logprob: Literal["gaussian", "flow_grpo"] = Field(
        "gaussian",
        description="Log-prob convention of the `cps` sampler (rollouts/sde.py `cps_step_with_logprob`; the `sde` "
        "sampler is unaffected). `gaussian` (default): the full density log N(x'; mean, std^2), on the scale of the "
        "`sde` sampler's; the last step (sigma_next 0, std 0) scores 0. `flow_grpo`: Flow-GRPO's -(x' - mean)^2 "
        "(sd3_sde_with_logprob.py, sde_type 'cps'), whose log-ratio is 2 std^2 times the density's (the PPO ratio "
        "differs, so does the clipping) and whose last step keeps a gradient. Rollout and learner use the same one. "
        "The recipes sample with `sde` (rollouts/actors.py), so this matters only where the cps sampler is selected.",
    )

    @model_validator(mode="after")
    def _one_step_selection(self) -> "TrajectorySampling":
        if self.sde_window is not None and self.timestep_fraction is not None:
            raise ValueError(
                f"sde_window ({self.sde_window}) and timestep_fraction ({self.timestep_fraction}) are "
                "mutually exclusive: set one of them to null (sde_window: a window of consecutive "
                "steps; timestep_fraction: a fraction of the steps, see step_selection)")
        sel = self.step_selection
        if sel in ("random_subset", "flow_grpo") and self.sde_window is not None:
            raise ValueError(f"step_selection {sel!r} trains a fraction of the steps, sde_window ({self.sde_window}) a "
                             "window: set sde_window to null, or step_selection to 'window'")
        if sel in ("random_subset", "flow_grpo") and self.timestep_fraction is None:
            raise ValueError(f"step_selection {sel!r} needs timestep_fraction (Flow-GRPO: 0.99); set it, or "
                             "step_selection to 'all'")
        if sel == "window" and self.sde_window is None:
            raise ValueError("step_selection 'window' needs sde_window (Flow-GRPO-Fast: 2-3); set it, or "
                             "step_selection to 'all'")
        if sel == "all" and (self.sde_window is not None or self.timestep_fraction is not None):
            raise ValueError(f"step_selection 'all' trains every step: set sde_window ({self.sde_window}) and "
                             f"timestep_fraction ({self.timestep_fraction}) to null, or pick the selection they mean")
        if self.cfg_detach_uncond and (self.cfg_scale == 1.0 or not self.cfg_in_training):
            raise ValueError(
                f"cfg_detach_uncond=true detaches the unconditional velocity of guided training, but there is none: "
                f"cfg_scale={self.cfg_scale}, cfg_in_training={self.cfg_in_training}. Set cfg_detach_uncond to false, "
                "or cfg_scale > 1 (Flow-GRPO: 4.5) with cfg_in_training true")
        if self.window_range is not None:
            if self.sde_window is None:
                raise ValueError(f"window_range {self.window_range} bounds the SDE window, but sde_window is null "
                                 f"(step_selection {sel!r}): set window_range to null, or set sde_window")
            lo, hi = self.window_range
            if lo < 0 or min(hi, self.num_steps) - lo < self.sde_window:
                raise ValueError(f"window_range {self.window_range} cannot hold sde_window ({self.sde_window}) of "
                                 f"num_steps ({self.num_steps}): the whole window lies in [lo, hi), so "
                                 f"min(hi, num_steps) - lo must be at least sde_window")
        return self


class RolloutConfig(_Section):
    batch_size: int = Field(4, gt=0, description="Source images per step.")
    group_size: int = Field(8, gt=1, description="G: rollouts per image (ReaDe: 8; Flow-GRPO: 24). Must be >= 2 for a group baseline.")
    micro_batch_size: int | None = Field(None, gt=0, description="Rows (captions or trajectories) per model call in rollouts: caption generation, SDE trajectories, caption renders and VAE decodes run this many rows at a time, so rollout memory is bounded by it and not by batch_size x group_size. Results do not depend on it (per-row noise). None: all rows at once (tiny models). Flow-GRPO samples SD3.5 at 1024 px 8-16 per GPU; TRL generates per_device_train_batch_size at a time.")
    caption: CaptionSampling = Field(default_factory=CaptionSampling)
    trajectory: TrajectorySampling = Field(default_factory=TrajectorySampling)
    timeout_s: float = Field(
        1800.0, gt=0,
        description="Seconds the driver waits for one step's rollout (caption group, renders or trajectories). A "
        "rollout actor slower than this is taken for hung: it is "
        "killed, Ray restarts it and the step is retried with the last synced weights, as for an actor that died "
        "(`resources.max_restarts` times), then the run stops naming the actor and the step (exit 1). Rollouts "
        "inside the learner (`resources.colocate`) stop the run at once. Default 1800 s: a production step "
        "(SD3.5-large at 1024 px, groups of 24) takes minutes; the tiny recipe, seconds.",
    )


class PolicyOptim(_Section):
    lr: float = Field(gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    beta: float = Field(0.04, ge=0, description="KL coefficient beta (UAE eq. 2). 0 disables the reference pass.")
    epsilon: float = Field(0.2, gt=0, description="Clip range epsilon of the ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip range (DAPO's clip-higher); None: epsilon.")


class EncoderOptim(PolicyOptim):
    """The caption policy's optimisation, plus the TRL GRPOTrainer options of the token loss (TRL 1.16
    trl/trainer/grpo_config.py; defaults are TRL's unless said otherwise)."""

    drop_zero_variance: bool = Field(
        False,
        description="Drop the rows that carry no advantage signal (members of zero-variance groups, and rows "
        "without any reward) from the caption loss: their tokens leave the loss mask, the KL term and the "
        "denominators of `grpo.loss_agg`, and the kl / clip_frac / ratio statistics (DAPO's dynamic sampling, which "
        "drops such groups; this was the behaviour before TRL parity). False (default, TRL): they stay in the mask "
        "with advantage 0, so their KL still applies and their tokens count in every denominator and statistic.",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="Exclude captions that hit rollout.caption.max_new_tokens without EOS from the loss (their "
        "mask is zeroed, policy and KL terms alike). TRL: mask_truncated_completions, default false; DAPO "
        "recommends it (overlong filtering). The truncated fraction is logged as `caption/truncated_frac` either way.",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token",
        description="`token` (default, TRL): one ratio exp(logp - old_logp) per token. `sequence` (GSPO, Zheng et al. "
        "2025; TRL's implementation): one ratio per caption, exp of the masked mean of its tokens' log-ratios, "
        "clipped as one. GSPO's objective is per sequence: pair it with grpo.loss_agg `sequence_mean` (TRL "
        "loss_type `grpo`); with `token_mean` or `constant` each caption weighs by its length (TRL warns; allowed "
        "here). GSPO clips far tighter, about epsilon 3e-4 / epsilon_high 4e-4.",
    )
    top_entropy_quantile: float = Field(
        1.0, ge=0.0, le=1.0,
        description="rho of Wang et al. 2025 (\"Beyond the 80/20 Rule\"; TRL top_entropy_quantile, default 1.0): only "
        "the caption tokens whose entropy (of the policy's temperature-scaled distribution at that position, this "
        "pass) is at least the (1 - rho) quantile of the micro-batch's loss-mask tokens, gathered over the learner "
        "ranks, keep their policy-loss term; the others keep their KL term and still count in the denominators of "
        "grpo.loss_agg (TRL's get_high_entropy_mask on the micro-batch). 1.0: every token (default); 0.0: only the "
        "highest-entropy token(s); the paper recommends 0.2. The quantile is over the loss mask, so it skips "
        "truncated captions with mask_truncated_completions (as TRL) and dropped rows with drop_zero_variance.",
    )
    use_bias_correction_kl: bool | None = Field(
        None,
        description="Multiply the per-token KL by the importance ratio (differentiable: it changes the KL gradient "
        "even on-policy, where the ratio is 1), so the KL gradient is the unbiased reverse-KL one (DeepSeek-V3.2; "
        "TRL use_bias_correction_kl, default true). None (default): TRL's, i.e. on whenever beta > 0. false: the "
        "plain k-estimator gradient (the behaviour before TRL parity). true needs beta > 0.",
    )

    vllm_importance_sampling_correction: bool = Field(
        True,
        description="With rollout.caption.backend `vllm` or `vllm_server`: weight each caption token's policy loss by the "
        "importance weight between the learner's own log-probs (recomputed at the update's first pass, its pi_old) "
        "and vLLM's (rl/grpo.py `rollout_is_weights`), correcting the mismatch between the two engines (truncated "
        "IS, Yao et al. 2025). TRL vllm_importance_sampling_correction, default true. With it, pi_old is always the "
        "learner's first pass, also for a stale rollout, and the weight carries the rest (decoupled PPO). No effect "
        "with the hf backend (its log-probs are the learner's: weight exactly 1, none applied). false: vLLM's "
        "log-probs are pi_old for a stale rollout, as the hf backend's.",
    )
    vllm_importance_sampling_mode: Literal["sequence_mask", "sequence_truncate", "token_mask", "token_truncate"] = Field(
        "sequence_mask",
        description="How the weights are formed (TRL vllm_importance_sampling_mode; TRL 1.16 default "
        "`sequence_mask`). `token_truncate`: per-token ratio clipped to [clip_min, clip_max] (TIS). `token_mask`: "
        "per-token ratio, 0 outside [clip_min, clip_max]. `sequence_truncate`: one ratio per caption (exp of the sum "
        "of its tokens' log-ratios), clipped. `sequence_mask`: one ratio per caption, the caption dropped (0) "
        "outside the bounds (MIS).",
    )
    vllm_importance_sampling_clip_max: float | None = Field(
        3.0, gt=0,
        description="Upper bound C_max of the weights (TRL vllm_importance_sampling_clip_max, default 3.0; TIS "
        "papers use 2). `*_truncate`: clipped to it; `*_mask`: larger ratios weigh 0. None: no upper bound.",
    )
    vllm_importance_sampling_clip_min: float | None = Field(
        None, ge=0,
        description="Lower bound C_min (TRL vllm_importance_sampling_clip_min, default None: none). `*_truncate`: "
        "raised to it; `*_mask`: smaller ratios weigh 0.",
    )

    @model_validator(mode="after")
    def _bias_correction_needs_kl(self) -> "EncoderOptim":
        if self.use_bias_correction_kl and self.beta == 0:
            raise ValueError("use_bias_correction_kl=true corrects the KL term, but beta=0 has none: set "
                             "grpo.encoder.use_bias_correction_kl to null/false, or grpo.encoder.beta > 0")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"grpo.encoder.vllm_importance_sampling_clip_min ({lo}) must be below clip_max ({hi}): "
                             "lower clip_min or raise clip_max")
        if self.vllm_importance_sampling_mode.endswith("truncate") and lo is None and hi is None:
            raise ValueError(f"vllm_importance_sampling_mode {self.vllm_importance_sampling_mode!r} clips to "
                             "[clip_min, clip_max], but both are null: set grpo.encoder.vllm_importance_sampling_clip_max "
                             "(TRL: 3.0)")
        return self

    def bias_correction_kl(self) -> bool:
        """The effective use_bias_correction_kl (None: TRL's true, whenever beta > 0)."""
        return self.beta > 0 and self.use_bias_correction_kl is not False


class NFTConfig(_Section):
    """DiffusionNFT's objective (Zheng et al. 2025, arXiv 2509.16117; rl/objectives/nft.py), used with
    `grpo.decoder.algorithm: nft`. Defaults are NVlabs/DiffusionNFT's SD3 settings; each field cites
    the line (config/base.py, config/nft.py, scripts/train_nft_sd3.py at commit 24af555)."""

    beta: float = Field(
        1.0, gt=0,
        description="The implicit policies' step beta: v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - "
        "beta v_theta, and the policy loss is divided by beta (train_nft_sd3.py L934-L959). Default 1.0: config/nft.py "
        "L61 `config.beta = 1.0` (their OCR and multi-reward configs: 0.1, L77 / L137).")
    kl_beta: float = Field(
        1e-4, ge=0,
        description="Weight of the penalty mean((v_theta - v_ref)^2) to the adapter-disabled decoder "
        "(train_nft_sd3.py L966-L970). Default 1e-4: config/nft.py L24 `config.train.beta = 0.0001`. 0: no "
        "reference pass.")
    adv_clip_max: float = Field(
        5.0, gt=0,
        description="Advantages are clipped to +-this, mapped to r = clamp(A / adv_clip_max / 2 + 0.5, 0, 1), and the "
        "policy loss is multiplied by it (train_nft_sd3.py L910-L960). Default 5: config/base.py L84 "
        "`train.adv_clip_max = 5`. It applies after `grpo.adv_clip`.")
    timestep_fraction: float = Field(
        0.99, gt=0, le=1,
        description="Each sample is trained at K = max(1, int(timestep_fraction x num_steps)) distinct levels drawn "
        "without replacement from the rollout schedule's num_steps sigmas (a random permutation per sample, its first "
        "K; train_nft_sd3.py L569 and L810-L816). Default 0.99 (9 of 10): config/base.py L87.")
    old_decay_flat: int = Field(
        0, ge=0,
        description="Old-policy EMA: old <- d old + (1 - d) theta after every decoder update, d = 0 for the first "
        "`old_decay_flat` updates, then min((t - flat) x old_decay_rate, old_decay_max) at update t "
        "(train_nft_sd3.py `return_decay`, L169-L189, applied at L1034-L1039). Default: their decay_type 1 "
        "(config/nft.py L60): flat 0, rate 0.001, max 0.5 (decay_type 2, their OCR config: 75, 0.0075, 0.999).")
    old_decay_rate: float = Field(0.001, ge=0, description="See `old_decay_flat` (decay_type 1: 0.001, train_nft_sd3.py L176).")
    old_decay_max: float = Field(0.5, ge=0, lt=1, description="See `old_decay_flat` (decay_type 1: 0.5, train_nft_sd3.py L177).")
    rollout: Literal["ode", "sde"] = Field(
        "ode",
        description="How the decoder stage samples for NFT. `ode` (default): deterministic Euler ODE samples, each row "
        "from its own initial noise, no log-probs kept (DiffusionNFT config/nft.py L65 `sample.deterministic = True`; "
        "they integrate with a 2nd-order DPM solver, L66, we with Euler). `sde`: the recipe's Flow-GRPO rollouts "
        "(`rollout.trajectory`: shared noise per group, SDE steps); NFT reads their clean final latents only. With "
        "`ode` the trajectory-only options (sde_window, window_range, timestep_fraction, step_selection, "
        "cps_logprob flow_grpo) are refused; cfg_detach_uncond is refused with nft either way.")


class DecoderOptim(PolicyOptim):
    """The decoder policy's optimisation, plus the EMA that only the decoder side has."""

    algorithm: Literal["flow_grpo", "nft"] = Field(
        "flow_grpo",
        description="The decoder objective (rl/objectives/). `flow_grpo` (default): clipped GRPO on the log-probs of "
        "SDE trajectories, KL in closed form (Flow-GRPO; UAE eq. 4); uses beta, epsilon, epsilon_high, kl_scale, "
        "drop_zero_advantage. `nft`: DiffusionNFT (Zheng et al. 2025): a flow-matching loss on forward-noised clean "
        "rollout samples, contrasting the implicit positive and negative policies around an EMA old policy "
        "(`grpo.decoder.nft`); no log-probs, any sampler; those five fields are then unused. Deliberate "
        "differences from NVlabs/DiffusionNFT: the rollouts sample with the current weights (they sample with the "
        "old policy, train_nft_sd3.py L640; with their decay_type 1, d = 0.001 t, the old policy is within a "
        "fraction d of the last update of the current one, so the two differ little early on), and the conditional velocity is trained without "
        "guidance (they sample and train CFG-free too, config/nft.py L64).")
    nft: NFTConfig = Field(default_factory=NFTConfig, description="DiffusionNFT's settings (algorithm `nft` only).")

    kl_scale: Literal["transition", "flow_grpo"] = Field(
        "transition",
        description="The std s of the trajectory KL ||mu_theta - mu_ref||^2 / (2 s^2) (mean over latent dims, per "
        "step; rollouts/sde.py `kl_std`). `transition` (default, the tiny recipes): the transition std "
        "a sqrt(sigma / (1 - sigma)) sqrt(-dt), the true KL of the two step Gaussians. `flow_grpo`: Flow-GRPO's "
        "penalty, s = a sqrt(sigma / (1 - sigma)) without sqrt(-dt), i.e. the true KL times |dt| (smaller, so "
        "beta weighs less; beta 0.04 is tuned for it). The cps sampler has one std: both are the same there. "
        "unified_grpo.yaml: flow_grpo.",
    )
    advantage_scale: Literal["group", "batch", "batch_population", "none"] | None = Field(
        None,
        description="Advantage scaling of the decoder stage (rl/grpo.py), overriding `grpo.scale` there; None: "
        "`grpo.scale` with algorithm flow_grpo, `batch_population` with nft (DiffusionNFT config/base.py L57 "
        "`sample.global_std = True`). `batch_population`: group mean, population std (divide by n) of every reward in the batch "
        "+ 1e-4, Flow-GRPO's SD3 configs (sample.global_std: np.std of the gathered batch). `batch`: unbiased "
        "batch std. unified_grpo.yaml: batch_population.",
    )
    drop_zero_advantage: bool = Field(
        False,
        description="Drop trajectories whose advantage is exactly 0 from the decoder loss, policy and KL terms "
        "alike, and from the row count the loss is averaged over (Flow-GRPO's train_sd3.py filters them out of the "
        "batch; it pads back random ones to keep batches divisible, we do not). False (default): rows of zero-"
        "variance groups (valid False) weigh 0 but still count in the row mean. unified_grpo.yaml: true.",
    )
    @model_validator(mode="after")
    def _nft_advantage_scale(self) -> "DecoderOptim":
        # DiffusionNFT normalises by the batch's population std (config/base.py L57 global_std); set
        # here rather than at read time so that the saved recipe says what ran.
        if self.algorithm == "nft" and self.advantage_scale is None:
            object.__setattr__(self, "advantage_scale", "batch_population")
        return self

    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the decoder LoRA weights for evaluation and export (`Learner.ema_state()`), updated after every decoder optimiser step with decay min(ema_decay, (1 + t) / (10 + t)) at update t (Flow-GRPO: 0.9). None: off (default). Training and rollouts always use the raw weights.")


class GRPOConfig(_Section):
    """GRPO hyper-parameters shared by both policies (per-policy ones in `encoder` / `decoder`)."""

    scale: Literal["group", "batch", "batch_population", "none"] = Field("group", description="Advantage scaling: `group` std (unbiased; GRPO, UAE eq. 1), `batch` std (unbiased, over all rewards of the step), `batch_population` (population std of the batch, Flow-GRPO's global_std), or `none` (Dr. GRPO). The decoder stage may override it (`decoder.advantage_scale`).")
    adv_clip: float | None = Field(5.0, gt=0, description="Clip advantages to +-this (Flow-GRPO: 5).")
    loss_agg: Literal["token_mean", "sequence_mean", "constant"] = Field("sequence_mean", description="`sequence_mean`: 1/G sum 1/T_i sum_t (UAE eq. 2). `token_mean`: over all tokens (DAPO). `constant`: divide by G*max_len (Dr. GRPO).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Caption KL estimator (k3: unbiased, non-negative; GRPO).")
    num_iterations: int = Field(1, gt=0, description="Optimisation passes over each rollout batch (GRPO's mu).")
    reward_combine: Literal["sum_then_normalize", "normalize_then_sum", "normalize_then_sum_raw"] = Field(
        "sum_then_normalize",
        description="How several weighted rewards form one advantage (TRL: multi_objective_aggregation, default "
        "sum_then_normalize). `sum_then_normalize`: weighted sum of the rewards, then `scale`; a sample missing one "
        "reward's score (None, skip_sample) gets that reward's group mean in its sum, neutral as in the normalize "
        "modes (a deliberate difference from TRL, whose nansum counts it as 0, i.e. a low score). `normalize_then_sum` "
        "(TRL's, GDPO): each reward normalised in its group (unbiased group std + 1e-4, whatever `scale`), weighted "
        "sum, then standardised over the batch (mean, unbiased std + 1e-4). `normalize_then_sum_raw`: each reward "
        "normalised with `scale`, weighted sum, no batch standardisation (the behaviour before TRL parity). "
        "`adv_clip` applies after each.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    encoder: EncoderOptim = Field(default_factory=lambda: EncoderOptim(lr=1e-5, beta=0.04, epsilon=0.2))
    decoder: DecoderOptim = Field(default_factory=lambda: DecoderOptim(lr=3e-4, beta=0.04, epsilon=1e-4))


class ColdStartConfig(_Section):
    """Stage 1 (UAE eq. 3): minimise 1 - cos(f_I(x), f_I(x_rec)) through encoder, connector and decoder."""

    grad_steps: int = Field(1, gt=0, description="K: the last K denoising steps carry gradient; earlier ones run without.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward instead of storing them (torch.utils.checkpoint, use_reentrant=False): the decoder's transformer blocks in the K steps with gradient, and the encoder's language-model layers. Less memory, about one more forward of time.")
    lr: float = Field(1e-4, gt=0, description="Learning rate of all three parameter groups in stage 1.")
    connector_lr: float = Field(1e-3, gt=0, description="Learning rate of the connector (all stages that train it).")


class RewardSpec(_Section):
    name: str = Field(description="`clip` (reconstruction), a registered name, `module:function`, `path/to/file.py:function`, or an entry point of `unified_grpo.rewards`.")
    weight: float = Field(1.0, description="Weight in the combined reward.")


JUDGE_REWARDS = ("judge", "judge_offline")  # built-in rewards that read reference elements


class JudgeConfig(_Section):
    """The judged caption reward `judge` (ReaDe sec. 3.2.1 eq. 4; rewards/judge.py): a judge decides per
    reference element whether the caption supports, omits or contradicts it. Reference elements per
    image come from `references`."""

    backend: Literal["offline", "http", "verifiable"] = Field("offline", description="`http`: an LLM behind an OpenAI-compatible chat endpoint (`HTTPJudge`: vLLM in production, README 'Serving a judge'; `python -m rewards.judge_server` locally); ReaDe judges with Qwen3-30B-A3B-Instruct-2507. `offline`: all-MiniLM-L6-v2 sentence similarity on CPU (`OfflineJudge`; never answers 'contradicted', so R_contra is 0). `verifiable`: the generated shapes world only (data.source null, references elements): a deterministic parser reads the caption's kinds, colours, sizes, cells, count and background and checks them against the scene's ground truth (`VerifiableJudge`, rl/shapes/judge.py), so wrong facts and hallucinated shapes are 'contradicted' (R_contra = 1); not in ReaDe, whose judge is an LLM. Same eq. 4 weights.")
    base_url: str | None = Field(None, description="http: the endpoint up to the API version, e.g. http://127.0.0.1:8000/v1. Checked at start (GET /models) before anything trains: an unreachable judge ends the run with exit 2.")
    model: str | None = Field(None, description="http: the served model name (vllm serve's --served-model-name, else its model id).")
    api_key_env: str = Field("OPENAI_API_KEY", description="http: environment variable holding the API key (never written to the recipe, logs or checkpoints); unset: no Authorization header.")
    timeout: float = Field(60.0, gt=0, description="http: seconds for one whole request (HTTPJudge.timeout).")
    max_retries: int = Field(3, ge=0, description="http: retries of a failed request (HTTPJudge.max_retries).")
    max_concurrency: int = Field(16, gt=0, description="http: requests in flight at once.")
    threshold: float = Field(0.6, gt=0, le=1, description="offline: similarity from which an element counts as supported (rewards/judge.py OFFLINE_THRESHOLD, calibrated on the shapes world).")
    alpha: float = Field(1.0, description="Weight of R_user (ReaDe table 10: 1.0).")
    rho: float = Field(1.0, description="Weight of R_detail (ReaDe: 1.0).")
    gamma: float = Field(0.8, description="Weight of R_supp (ReaDe: 0.8).")
    lambda_: float = Field(0.7, alias="lambda", description="Weight of R_contra, subtracted (ReaDe: 0.7). Written `lambda` in a recipe.")
    references: Literal["elements", "column", "extract"] | None = Field(
        None,
        description="Where each image's reference elements ({user, detail, supplementary} lists, ReaDe's U, S, Z) come "
        "from. `elements`: the dataset's own `elements` (the shapes world; a folder's metadata.jsonl or a dataset "
        "column `elements`). `column`: the text column `column` holds them: a JSON object of the three lists, a JSON "
        "list (all `detail`), or one element per line / `;`. `extract`: the text column `column` holds a reference "
        "caption, and the judge extracts the elements from it (ReaDe's offline extraction, appendix D.2; "
        "rewards/judge.py EXTRACTION_PROMPT; the offline backend takes the caption's sentences as `detail`), cached per "
        "image under `cache_dir`. None: `elements` for the generated shapes world; with any other data source a judge "
        "reward without references is refused at load (it would score nothing).",
    )
    column: str | None = Field(None, description="The text column (a metadata.jsonl field, or a `datasets` string column) that `references: column | extract` read.")
    cache_dir: str | None = Field(None, description="Where extracted elements are cached: `<cache_dir>/judge-elements-<key>/`, one JSON per image, key = a hash of the judge (backend, model, prompt) and column. None: `<output.dir>/cache`.")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="after")
    def _complete(self) -> "JudgeConfig":
        if self.backend == "http" and (not self.base_url or not self.model):
            raise ValueError("backend http needs base_url (e.g. http://127.0.0.1:8000/v1) and model (the served name)")
        if self.backend == "verifiable" and self.references in ("column", "extract"):
            raise ValueError(f"backend verifiable checks captions against the shapes world's own elements, not "
                             f"references: {self.references}: set references: elements (or leave it unset)")
        if self.references in ("column", "extract") and not self.column:
            raise ValueError(f"references: {self.references} reads a text column: set column (e.g. text)")
        return self

    def key(self) -> dict[str, Any]:
        """What decides the extracted elements (hashed into the cache folder's name)."""
        model = {"http": self.model, "offline": "all-MiniLM-L6-v2"}.get(self.backend, self.backend)
        return {"backend": self.backend, "model": model,
                "column": self.column}


class RewardsConfig(_Section):
    functions: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="clip")], description="Reward functions and weights. Built in: `clip` (UAE's reconstruction reward) and `judge` (the judged caption reward configured in `judge`).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The `judge` reward's judge and reference elements.")
    on_error: Literal["fail", "skip_sample"] = Field("fail", description="A reward function that raises, returns bad values, calls sys.exit or overruns `timeout_s`: `fail` stops the run naming it and the step (exit 1); `skip_sample` drops the bad scores (None: left out of the advantages in every `grpo.reward_combine` mode, never counted as 0) and logs a warning.")
    need_renders: bool | None = Field(None, description="Render every caption with the frozen decoder in the encoder stage (kwargs `renders`). None: only when `clip` is among the functions; plugins that read `renders` need true.")
    timeout_s: float = Field(
        600.0, gt=0,
        description="Seconds one reward function (clip or a plugin) may take on one step's batch, in the reward actor. "
        "A slower call fails naming the function and the step, then `on_error` applies (`fail`: the run stops, exit 1; "
        "`skip_sample`: its scores become None; a call still running from an earlier step fails at once, so at "
        "most one is ever left behind). The driver itself waits at most (number of functions x timeout_s + 60 s) "
        "for a reward actor's batch, then stops naming the actor and step. Default 600 s: minutes for a remote "
        "judge (rewards.judge.HTTPJudge bounds each attempt to 60 s and retries); the CLIP reward takes seconds.",
    )
    import_timeout_s: float = Field(
        120.0, gt=0,
        description="Seconds the recipe check may spend importing one reward plugin (a `path.py:function`, a "
        "`module:function` or an entry point) before anything starts: a plugin still importing after it is refused "
        "with exit 2 naming it. A plugin that raises, exits (sys.exit, os._exit) or is killed at import is refused the "
        "same way. The imports run in a child process (rewards/import_check.py), never in the driver itself.",
    )

    def renders_needed(self) -> bool:
        return self.need_renders if self.need_renders is not None else any(f.name == "clip" for f in self.functions)

    def uses_judge(self) -> bool:
        return any(f.name in JUDGE_REWARDS for f in self.functions)

    def reference_source(self, data_source: str | None) -> str | None:
        """The effective `judge.references` (None: no judge reward)."""
        if not self.uses_judge():
            return None
        return self.judge.references or ("elements" if data_source is None else None)

    def check_references(self, data_source: str | None) -> None:
        """A judge reward needs reference elements for every image: refused here when none are configured.
        The verifiable judge knows the generated shapes world only: a judge reward with it is refused with any
        other data source (a recipe that drops the judge reward may keep the field)."""
        if self.uses_judge() and self.judge.backend == "verifiable" and data_source is not None:
            raise ValueError(f"rewards.judge.backend: verifiable checks captions against the generated shapes world's "
                             f"ground truth (data.source: null), but data.source is {data_source!r}: use backend "
                             "offline or http for other data")
        if self.uses_judge() and self.reference_source(data_source) is None:
            name = next(f.name for f in self.functions if f.name in JUDGE_REWARDS)
            raise ValueError(f"rewards.judge.references: the `{name}` reward needs reference elements per image, and "
                             f"data.source {data_source!r} has none by default: set rewards.judge.references to "
                             "`column` (a text column of elements) or `extract` (the judge extracts them from a "
                             "reference-caption column), with rewards.judge.column, or `elements` if the data carry them")


class RayConfig(_Section):
    """Where the Ray cluster is."""

    address: str = Field("local", description="`local`: start a Ray on 127.0.0.1 in this process (under `ray job submit`, join that job's cluster instead). `auto`: join the running cluster. Or a `ray://` / `host:port` address.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray (None: all).")
    connect_timeout_s: float = Field(
        25.0, gt=0, le=600,
        description="Seconds to reach the cluster at a `host:port` or `ray://` address: first a TCP connection to "
        "it, then ray.init, each bounded by this; an address that does not answer ends the run with exit 2 naming "
        "`ray.address` (Ray itself would keep retrying). Default 25 s: both steps within a minute.",
    )


class ResourcesConfig(_Section):
    """The actors of a run and where they go (DESIGN.md, data flow)."""

    colocate: bool = Field(False, description="`true`: rollouts run inside the learner process (rank 0), so a weight sync is a version bump; for small machines. `false`: separate rollout actors take LoRA weights after every update.")
    rollout_workers: int = Field(1, gt=0, description="Rollout actors (ignored when colocate). Steps go to them in turn.")
    reward_workers: int = Field(1, gt=0, description="Reward actors. Steps go to them in turn.")
    learner_workers: int = Field(1, gt=0, description="DeepSpeed world size: learner actors with ranks 0..N-1, each training its share of whole groups (rollout.batch_size must divide by it).")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per rollout and learner actor (0 on CPU); reward actors take half.")
    placement: Literal["PACK", "SPREAD", "none"] = Field("PACK", description="Where the actors go (rl/train.py). `PACK`: one Ray placement group for all actors, on as few nodes as possible. `SPREAD`: the learner ranks on distinct nodes (a STRICT_SPREAD group: one DeepSpeed rank per machine; refused at start when the cluster has fewer nodes able to hold one than `learner_workers`), the rollout and reward actors spread over the nodes (a SPREAD group). `none`: no placement group (Ray's default scheduling).")
    custom_resources: dict[Literal["learner", "rollout", "reward"], dict[str, float]] = Field(default_factory=dict, description="Extra Ray resources per actor role, added to its placement-group bundle (its actor options with `placement: none`), so that a role lands only on nodes started with them (`ray start --resources='{\"gpu_box\": 1}'`), e.g. `{learner: {gpu_box: 1}}`. Empty (default): CPUs/GPUs only.")
    max_restarts: int = Field(3, ge=0, description="Rollout and reward actors that die are restarted this many times; the step that lost one is retried with the last synced weights. A dead learner ends the run with the last checkpoint intact.")
    start_timeout_s: float = Field(
        1800.0, gt=0,
        description="Seconds every actor (learner ranks, rollout and reward actors) has to start, i.e. to be placed "
        "and build its models; one still starting after it ends the run naming it (exit 1). Default 1800 s: loading "
        "SD3.5-large and Qwen2.5-VL from a network disk takes minutes.",
    )
    async_rollouts: Literal[0, 1] = Field(0, description="1: rollouts (and rewards) of step t+1 are generated with the weights of step t while the learner trains step t (staleness at most one version, corrected by the importance ratio). 0: strictly on-policy.")


class LearnerConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage. Every stage gives the same updates within float tolerance (tests/rl/test_zero.py): a stage moves only its own parameters, a group not trained in a stage takes no optimizer step, the gradient norm is DeepSpeed's, checkpoints hold every rank's optimizer state. 2: the production recipe (optimizer states and gradients partitioned over learner ranks).")
    bf16: bool = Field(False, description="DeepSpeed bf16 mixed precision (fp32 master weights and optimizer states).")
    timeout_s: float = Field(
        3600.0, gt=0,
        description="Seconds the driver waits for the learner ranks to answer one call: a training step (every "
        "micro-batch of it), the state for a checkpoint, a weight load on resume. A rank still busy after it (a hung "
        "collective, a stuck device) ends the run with exit 1 naming the ranks, the call and the step, and the last "
        "complete checkpoint (a dead rank is reported at once, not after it). Default 3600 s: one step of "
        "SD3.5-large's decoder GRPO on many micro-batches takes minutes, never an hour.",
    )
    micro_batch_size: int | None = Field(None, gt=0, description="Rows per forward/backward in every learner stage (captions in the encoder stage, trajectories in the decoder stage, images in the cold start): gradients of the micro-batches are accumulated into one optimizer step per batch, equal to the full-batch step within float tolerance. Must divide each rank's rows. None: the whole batch at once (tiny models). TRL: per_device_train_batch_size; Flow-GRPO: train.batch_size.")
    activation_checkpointing: bool = Field(False, description="Recompute the encoder's language-model layers and the decoder's transformer blocks in backward instead of storing their activations (torch.utils.checkpoint, use_reentrant=False), in every stage. Less memory, about one more forward of time. TRL: gradient_checkpointing; Flow-GRPO: on for SD3.5.")
    logits_chunk: int = Field(1024, gt=0, description="Caption log-probs and entropies are computed over at most this many token positions at a time, so that no (rows x tokens x vocabulary) float32 logits exist at once (Qwen2.5-VL's vocabulary is 151,936: 1024 positions are 0.6 GB in float32).")


class OutputConfig(_Section):
    dir: str = Field("runs/unified-grpo", min_length=1, description="Output directory (metrics.jsonl, tensorboard/, checkpoints/, plots).")
    tensorboard: bool = Field(True, description="Write a TensorBoard log under `tensorboard/`.")
    progress: bool = Field(True, description="Show a progress bar on the console.")
    plot: bool = Field(True, description="Write `reward.png` (reward and caption length against step).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps under `checkpoints/step-NNNNNN/` (adapters, connector, optimizer, RNG, data and schedule position; rl/checkpoint.py). 0: only at the end.")
    keep_last: int = Field(2, gt=0, description="Complete checkpoints kept; an older one is deleted only after a newer one is complete.")
    wandb_project: str | None = Field(None, description="Also log metrics to this Weights & Biases project (needs `pip install wandb` and a login, or WANDB_MODE=offline). None: no wandb.")
    log_completions_every: int = Field(0, ge=0, description="Every N encoder-GRPO steps (those whose step number is a multiple of N), write the step's completions table: one row per caption with step, image id, caption, each reward function's score and the advantage, appended to `completions.jsonl` and shown as a TensorBoard text table (tag `completions`; a wandb table with wandb_project). 0 (default): never. TRL: log_completions (default false), a table every logging_steps; decoder steps are not tabled (their completions are images).")
    num_completions_to_log: int | None = Field(None, gt=0, description="Rows of each completions table: the step's first N captions (image-major, G per image). None (default): all of them. TRL's num_completions_to_print limits the console print only; here it limits the table.")
    resume: Literal["auto", "never"] = Field("never", description="`auto`: continue from the newest complete checkpoint in `dir` (half-written ones and ones holding non-finite tensors are skipped and reported; none: start at step 0); refused when the recipe's `models` differ from the checkpoint's. `never`: start at step 0, in a `dir` no earlier run used (one holding metrics.jsonl or checkpoints/ is refused unless `overwrite`). `python -m rl.train RECIPE --resume` sets `auto`.")
    overwrite: bool = Field(False, description="Start at step 0 in a `dir` an earlier run used: that run's directory is first renamed to `<dir>.old-<UTC timestamp>` (moved aside, never deleted). False (default): such a `dir` is refused. Exclusive with `resume: auto`. `python -m rl.train RECIPE --overwrite` sets it.")


# ----------------------------------------------------------------------------------------------
# pretrained shapes-world models (rl/shapes/pretrain.py) and evaluation (rl/eval.py)
# ----------------------------------------------------------------------------------------------
class ClipPretrain(_Section):
    """Contrastive training of the tiny CLIP's image tower against FULL captions."""

    steps: int = Field(200, gt=0, description="Optimiser steps (fresh scenes every step).")
    batch_size: int = Field(128, gt=1, description="Image-caption pairs per step (the contrastive negatives).")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate (warm-up, cosine decay).")
    eval_backbone: bool = Field(True, description="Also train a second, independently seeded CLIP on other scenes: an evaluation backbone (rl.eval `clip_b`) that RL never optimised against.")


class VaePretrain(_Section):
    """The decoder's AutoencoderKL trained as an autoencoder."""

    steps: int = Field(300, gt=0, description="Optimiser steps.")
    batch_size: int = Field(16, gt=0, description="Images per step.")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate.")
    foreground_weight: float = Field(9.0, ge=0, description="Extra loss weight of shape pixels (1 + this) over background ones: shapes cover a small part of an image.")
    latent_noise: float = Field(0.1, ge=0, description="Std of Gaussian noise added to latents before decoding in training (robustness to imperfect generated latents).")
    latent_weight: float = Field(1e-4, ge=0, description="Weight of an L2 penalty on the latents (keeps them bounded).")


class EncoderPretrain(_Section):
    """Supervised fine-tuning of the tiny Qwen2.5-VL on (image, caption) pairs."""

    steps: int = Field(2000, gt=0, description="Optimiser steps. 2000 (was 1000; issue 18), measured with vision_steps 1000 on 64 held-out scenes: greedy kind_accuracy 0.98 -> 1.00, repeated kinds in greedy captions 1.6% -> 0%, coverage of sampled detailed captions 0.70 -> 0.76, and the decoder trained on this encoder renders true FULL captions at independent-CLIP 0.50 -> 0.54 (one seed each; small gains). Costs ~180 s more CPU: the encoder then decoder chain is ~630 CPU-s, about 10.5 min on 2 quiet cores. The colours of sampled FULL captions stayed near chance (0.17 -> 0.15, done.json color_accuracy): more SFT steps do not teach colour binding.")
    batch_size: int = Field(32, gt=0, description="Images per step.")
    lr: float = Field(3e-3, gt=0, description="AdamW peak learning rate.")
    vision_hidden_size: int = Field(64, gt=0, description="Width of the tiny vision tower (saved with the weights in tiny_config.json).")
    vision_depth: int = Field(2, gt=0, description="Depth of the tiny vision tower (saved with the weights).")
    rope_theta: float = Field(5.0, gt=0, description="RoPE base of the tiny LM (saved with the weights). With 16-dim heads, M-RoPE gives the image rows and columns the lowest frequencies; at Qwen's 10000 they hardly rotate over 4 tokens, so the LM cannot tell image tokens apart by position and cannot pick out the first shape in reading order. A small base makes them rotate.")
    qk_init_std: float = Field(0.15, ge=0, description="Re-initialise the LM's query/key projections with this std before SFT (0: keep HF's 0.02). With 0.02 the attention of caption tokens stayed nearly uniform over the ~100 prompt and image tokens for hundreds of steps: the LM learned where shapes are (count, cells, sizes) but could not copy what they are (colour) from the shape's token; 0.15 halved the time to a given loss, 0.3 was worse.")
    vision_steps: int = Field(1000, ge=0, description="Steps of the vision warm-up before SFT (a stand-in for a pretrained ViT): a linear probe on every merged vision token learns the colour, kind and size of the shape under it. 0: none. 1000 (was 300; issue 18): after 300 steps the probe read the kind of only 57% of held-out tokens that show a shape (colour 99%, size 92%; done.json vision_kind_acc), and the SFT'd encoder's greedy captions named exactly the right kinds in 27% of held-out scenes (kind_accuracy, kind recall 0.59); after 1000 steps, with the same SFT: 99.9% and 98% (kind recall 0.99). The tower is frozen in SFT, so what it does not separate here the LM never sees. Costs ~90 s more CPU.")
    vision_batch_size: int = Field(64, gt=0, description="Images per vision warm-up step.")
    vision_lr: float = Field(3e-3, gt=0, description="Learning rate of the vision warm-up.")
    vision_lr_scale: float = Field(0.0, ge=0, description="The vision tower's learning rate as a fraction of `lr` (its merger into the LM learns at `lr`). At the full rate the tiny tower collapsed its patch features (colours lost); 0 freezes it (random features separate colours but hardly shapes).")
    detail_share: float = Field(0.2, ge=0, le=1, description="Probability that a training caption is the FULL one (every fact) rather than the SHORT one (kinds only). Small: the SFT'd encoder is terse under greedy decoding but samples detailed captions now and then, which encoder GRPO can then reinforce (UAE sec. 4.4). 0: RL has nothing to find; >= 0.5: the encoder is detailed before RL.")


class DecoderPretrain(_Section):
    """Flow-matching training of the DiT and the connector on FULL captions (UAE sec. 2.2's long-caption warm-up)."""

    steps: int = Field(1200, gt=0, description="Optimiser steps.")
    batch_size: int = Field(64, gt=0, description="Latents per step.")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate (transformer and connector).")
    pool_size: int = Field(4096, gt=0, description="Scenes encoded once by the VAE; batches are drawn from them.")
    num_layers: int = Field(4, gt=0, description="DiT depth.")
    num_heads: int = Field(4, gt=0, description="Attention heads (width = num_heads * head_dim).")
    head_dim: int = Field(16, gt=0, description="Width of one head.")
    patch_size: int = Field(2, gt=0, description="Latent patch side (1: one token per latent pixel).")
    joint_attention_dim: int = Field(64, gt=0, description="Width of the conditioning the connector produces.")


PRETRAIN_PROVIDERS: dict[str, str] = {"shapes": "rl.shapes.pretrain:prepare_recipe"}  # pretrain.provider names


class PretrainConfig(_Section):
    """Pretrained tiny models for the generated shapes world (`python -m rl.shapes.pretrain RECIPE`)."""

    enabled: bool = Field(False, description="Before training, build the pretrained shapes-world models that are missing from the cache (CLIP, VAE, encoder SFT, decoder + connector; rl/shapes/pretrain.py, through `provider`) and use them for every `models` path left unset. Needs data.source: null and tiny models.")
    cache_dir: str | None = Field(None, description="Cache root; each part is a sub-folder named by a hash of what it depends on. None: $UNIFIED_GRPO_CACHE, else ~/.cache/unified-grpo.")
    clip: ClipPretrain = Field(default_factory=ClipPretrain)
    vae: VaePretrain = Field(default_factory=VaePretrain)
    encoder: EncoderPretrain = Field(default_factory=EncoderPretrain)
    decoder: DecoderPretrain = Field(default_factory=DecoderPretrain)
    seed: int = Field(0, ge=0, description="Seed of the pretrained models (each part offsets it: CLIP +4, evaluation CLIP +1004, VAE +2, encoder +3, decoder +1), part of their cache keys. Apart from the recipe's `seed` on purpose: the RL seed varies the run (data order, sampling), never the models it starts from, so runs over several RL seeds (bench/learning_proof.py) share the shipped models. Until 2026-11-27 the recipe's seed was used (the same models for seed 0).")
    workers: int = Field(2, ge=1, description="Processes that train independent parts side by side (encoder then decoder in one; VAE and the CLIPs in the other). 1: one after the other in this process.")
    probe_scenes: int = Field(64, ge=2, description="Held-out scenes of the quality probes each part writes into its done.json (the encoder's kind accuracy, the decoder's renders of true captions; rl/shapes/pretrain.py encoder_probe, decoder_probe). Not part of the cache keys: it changes what is measured, not the weights. Tests use a few.")
    threads: int = Field(1, ge=1, description="torch threads per process. Tiny models are overhead-bound: on 2 cores, two 1-thread processes beat one 2-thread process, and a busy machine hurts multi-threaded runs most.")
    provider: str = Field("shapes", description="What `enabled` calls before any model is built, to fill the unset `models` paths (and `eval.backbones`): a registered name (`shapes`: rl/shapes/pretrain.py `prepare_recipe`, the shipped models or the cache) or `module:function` taking the recipe. The trainer imports it only when `enabled`; an unknown name is refused at load.")
    shipped: bool = Field(True, description="Use the shipped models (versioned safetensors in the package, rl/shapes/pretrained/, each checked against the sha256 in its manifest.json) when every part the recipe needs has the shipped part's key, i.e. the pretraining settings are the shipped ones (recipes/tiny.yaml's): no pretraining at run time, the same weights on every machine. A file whose sha256 differs is refused (exit 2, naming the file and the rebuild command); a missing one is rebuilt under the cache root. Other settings, or false: the cache (`cache_dir`), built where missing. Rebuild the shipped files: `python -m rl.shapes.pretrain recipes/tiny.yaml --ship`.")
    shipped_dir: str | None = Field(None, description="Folder of the shipped models and their manifest.json. None: the package's rl/shapes/pretrained/ (what `--ship` writes by default).")


class EvalConfig(_Section):
    """Unified-Bench (UAE sec. 3): caption, regenerate, compare (`python -m rl.eval unified-bench`)."""

    n: int = Field(64, gt=0, description="Held-out images scored by rl.eval.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the generated held-out images, 0 .. 2^32 - 1.")
    backbones: dict[str, str] = Field(default_factory=dict, description="Extra similarity backbones, name -> open_clip model name, `timm:<name>`, or a .safetensors of a tiny CLIP. The reward's CLIP is always scored (`clip`), and with pretraining the second shapes CLIP (`clip_b`). The unified score is their mean.")
    grid_images: int = Field(4, ge=0, description="Held-out images in the run's source | caption | reconstruction grids (grid_start.png, grid_end.png). 0: no grids.")


class WarmupConfig(_Section):
    """The `warmup` stage (`schedule.warmup_steps`): UAE sec. 2.2's decoder warm-up on long captions
    (rl/warmup.py). UAE trains the decoder on 700K images with captions of 250+ words written by
    InternVL-78B; here the frozen encoder (adapter off) writes them, greedily under UAE's caption prompt
    (rl/models/encoder.py UAE_CAPTION_PROMPT), so the connector learns to carry this encoder's own
    descriptions into the decoder before RL (UAE starts RL from a warmed-up decoder; a randomly
    initialised connector would condition SD3.5 on noise)."""

    max_new_tokens: int | None = Field(None, gt=0, description="Length limit of a warm-up caption in tokens. None: rollout.caption.max_new_tokens. At most rollout.caption.max_new_tokens (the decoder's fixed conditioning length is that + 1; a longer caption would be cut).")
    train_decoder_lora: bool = Field(False, description="Also train the decoder's LoRA (at `decoder_lr`) with the connector. False (default): the connector alone learns, the decoder stays as published (UAE warms the whole DiT; with a LoRA-only decoder in RL the connector is the part that must learn the encoder's language).")
    connector_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the connector in the warm-up.")
    decoder_lr: float = Field(1e-4, gt=0, description="Learning rate of the decoder LoRA in the warm-up (with train_decoder_lora).")
    cache_dir: str | None = Field(None, description="Where the warm-up captions are cached: `<cache_dir>/warmup-captions-<key>/`, one JSON per image, key = a hash of the encoder's identity (name, path, random_init, widths, dtype, image size, seed), the prompt and max_new_tokens; a caption is written once and read by every later step, epoch and run. None: `<output.dir>/cache`.")


class Recipe(_Section):
    """A whole Unified-GRPO run."""

    seed: int = Field(0, ge=0, le=SEED_MAX, description="Global seed (data order, rollouts, init), 0 .. 2^32 - 1 "
                      "(numpy's range).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: cuda when available.")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps in all (None: the whole schedule).")

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        t = self.rollout.trajectory
        if t.sde_window is not None and t.sde_window > t.num_steps:
            raise ValueError(f"rollout.trajectory.sde_window ({t.sde_window}) is larger than num_steps ({t.num_steps})")
        if self.models.decoder.image_size % 8:
            raise ValueError("models.decoder.image_size must be a multiple of 8")
        d = self.grpo.decoder
        if d.algorithm == "nft":
            if self.learner.zero_stage == 3:
                raise ValueError("grpo.decoder.algorithm nft swaps the old-policy LoRA into the decoder in place, which "
                                 "ZeRO-3's partitioned parameters do not allow: set learner.zero_stage to 0, 1 or 2")
            if t.cfg_detach_uncond:
                raise ValueError("rollout.trajectory.cfg_detach_uncond true detaches the unconditional half of guided "
                                 "training, but grpo.decoder.algorithm nft trains the conditional velocity alone: set "
                                 "cfg_detach_uncond to false")
            if d.nft.rollout == "ode":
                trajectory_only = {"sde_window": t.sde_window, "window_range": t.window_range,
                                   "timestep_fraction": t.timestep_fraction, "step_selection": t.step_selection}
                trajectory_only = {k: v for k, v in trajectory_only.items() if v is not None}
                if t.cps_logprob != "gaussian":
                    trajectory_only["cps_logprob"] = t.cps_logprob
                if trajectory_only:
                    given = ", ".join(f"rollout.trajectory.{k}={v!r}" for k, v in trajectory_only.items())
                    raise ValueError(
                        f"grpo.decoder.nft.rollout ode samples plain ODE trajectories, but {given} configure SDE "
                        "trajectory training: set them to null (cps_logprob: gaussian), or grpo.decoder.nft.rollout: "
                        "sde to train NFT on the recipe's SDE rollouts")
        c = self.rollout.caption
        if c.backend != "hf" and (c.top_k or c.min_p or c.repetition_penalty != 1.0):
            raise ValueError("rollout.caption.top_k / min_p / repetition_penalty are applied by the hf backend only: "
                             "unset them, or set rollout.caption.backend: hf")
        if self.rollout.caption.backend != "hf" and self.models.encoder.adapter.kind != "lora":
            raise ValueError(f"rollout.caption.backend: {c.backend} loads the encoder adapter as LoRA (a LoRA request, "
                             "or merged LoRA modules pushed to the server): models.encoder.adapter.kind must be lora")
        if c.backend == "vllm_server" and not self.resources.colocate and self.resources.rollout_workers > 1:
            raise ValueError("rollout.caption.backend: vllm_server serves one rollout worker (one NCCL weight-update "
                             f"group per server): set resources.rollout_workers to 1 (it is {self.resources.rollout_workers})")
        if self.rollout.batch_size % self.resources.learner_workers:
            raise ValueError(f"rollout.batch_size ({self.rollout.batch_size}) must divide by resources.learner_workers "
                             f"({self.resources.learner_workers}): each learner rank trains whole groups")
        if self.learner.micro_batch_size is not None:
            n = self.learner.micro_batch_size
            per_rank = self.rollout.batch_size // self.resources.learner_workers
            rows = {"encoder/decoder rows (batch_size x group_size per rank)": per_rank * self.rollout.group_size,
                    "cold-start images (batch_size per rank)": per_rank}
            for what, count in rows.items():
                if count % n:
                    raise ValueError(f"learner.micro_batch_size ({n}) must divide the {what} = {count}: "
                                     f"choose a divisor of {count}")
        if self.output.overwrite and self.output.resume == "auto":
            raise ValueError("output.overwrite moves the earlier run aside and output.resume: auto continues it: "
                             "pass one of --overwrite and --resume")
        if self.pretrain.enabled and self.data.source is not None:
            raise ValueError("pretrain.enabled builds models for the generated shapes world: set data.source: null, or pretrain.enabled: false")
        if self.data.source is None and self.published_models():
            raise ValueError(f"data.source: null generates the 32x32 shapes world, which is for tiny models only, but "
                             f"{', '.join(self.published_models())} load published weights: set data.source to an image "
                             "folder or a `datasets` name (or use tiny / random_init models)")
        w = self.warmup.max_new_tokens
        if w is not None and w > self.rollout.caption.max_new_tokens:
            raise ValueError(f"warmup.max_new_tokens ({w}) exceeds rollout.caption.max_new_tokens "
                             f"({self.rollout.caption.max_new_tokens}), the decoder's conditioning length - 1: "
                             "lower it, or raise rollout.caption.max_new_tokens")
        self.rewards.check_references(self.data.source)
        return self

    def published_models(self) -> list[str]:
        """The `models` fields that load published weights (not `tiny`, not `random_init`)."""
        m = self.models
        out = []
        if m.encoder.name != "tiny" and m.encoder.random_init is None:
            out.append(f"models.encoder.name ({m.encoder.name})")
        if m.decoder.name != "tiny" and m.decoder.random_init is None:
            out.append(f"models.decoder.name ({m.decoder.name})")
        if m.clip.model != "tiny" and m.clip.random_init is None and any(f.name == "clip" for f in self.rewards.functions):
            out.append(f"models.clip.model ({m.clip.model})")
        return out

    def stages(self) -> list[Stage]:
        """The stage of every step in order (before max_steps)."""
        out: list[Stage] = ["warmup"] * self.schedule.warmup_steps + ["cold_start"] * self.schedule.cold_start_steps
        for _ in range(self.schedule.cycles):
            for phase in self.schedule.phases:
                out += [phase.stage] * phase.steps
        return out[: self.max_steps] if self.max_steps else out


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for "a.b.c"; a number indexes a list (rewards.functions.0.weight)."""
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise RecipeError(f"--set {dotted!r}: empty field name; expected key.path=value, e.g. rollout.group_size=4")
    node: Any = tree
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise RecipeError(f"--set {dotted}: `{'.'.join(keys[:i])}` is a list of {len(node)}; "
                                  f"`{k}` is not an index into it (0 .. {len(node) - 1})")
            k = int(k)
            if last:
                node[k] = value
            else:
                node = node[k]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: `{'.'.join(keys[:i])}` is not a section")
        if last:
            node[k] = value
        else:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]


def _safe_load(text: str, what: str) -> Any:
    """yaml.safe_load with every way it can fail as a RecipeError naming `what`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{what} is not valid YAML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{what} is nested too deeply to be a recipe") from None


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` strings -> (path, YAML-parsed value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), _safe_load(raw, f"--set {item!r}: the value")))
    return out


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].replace("Value error, ", "")
        if path == "(top level)" and msg.split(":", 1)[0].replace(".", "").replace("_", "").isalnum():
            path, msg = msg.split(":", 1)[0], msg.split(":", 1)[1].strip()  # a recipe-wide check naming its field
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see rl/config.py for the fields)"
        elif e["type"] == "finite_number":
            msg = f"must be a finite number, got {e['input']!r}"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), output_dir: str | None = None,
                max_steps: int | None = None, check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError naming the field at fault."""
    path = Path(path)
    tree = _safe_load(_read_recipe_text(path), f"recipe {path}")
    if tree is None:
        raise RecipeError(f"recipe {path}: the recipe is empty (only comments or whitespace); start from "
                          "recipes/tiny.yaml")
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(list(overrides)):
        _set_path(tree, key, value)
    if output_dir is not None:
        _set_path(tree, "output.dir", output_dir)
    if max_steps is not None:
        tree["max_steps"] = max_steps
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(_format_error(e, str(path))) from None
    if check_files:
        check_recipe_files(recipe, base_dir=path.parent)
    return recipe


def _read_recipe_text(path: Path) -> str:
    """The recipe file as text: a readable file of UTF-8 YAML (a BOM is fine), below 1 MiB."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is {path.stat().st_size} bytes: a recipe is a short YAML file "
                              f"(at most {MAX_RECIPE_BYTES} bytes)")
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"recipe {path} cannot be read: {e.strerror or e}") from None
    bad = data.find(b"\x00")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = e.start if bad < 0 else min(bad, e.start)
    if bad >= 0:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {bad} is {data[bad:bad + 1]!r}: a binary file, "
                          "or UTF-16?); save it as UTF-8 YAML")
    return text


def _check_output_dir(out: str) -> None:
    """output.dir is, or can become, a folder: not a file, nor under one. (Whether it is writable
    is tried by the driver, which creates it, before Ray starts.)"""
    path = Path(out)
    if not out.strip():
        raise RecipeError("invalid recipe: output.dir is empty: name a folder, e.g. --output-dir runs/try1")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is under {p}, which is a file"
                raise RecipeError(f"invalid recipe: output.dir: {out} {what}, not a folder: pass --output-dir with "
                                  "a folder")
            return


def _check_plugins(recipe: Recipe, base_dir: Path | None) -> None:
    """Import every reward plugin once (`rewards.api.validate_specs`; a relative plugin file against
    `base_dir`, the recipe's folder, as the reward workers do), each under
    `rewards.import_timeout_s`, in a child process (rewards/import_check.py): a plugin that raises,
    calls sys.exit or os._exit, or sleeps at import is refused (exit 2) naming it, and the driver
    itself never runs a plugin's import."""
    from rewards.import_check import check_imports

    specs = [(index, spec.name) for index, spec in enumerate(recipe.rewards.functions)
             if spec.name not in ("clip", "judge")]
    failures = check_imports(specs, base_dir, recipe.rewards.import_timeout_s)
    if failures:
        index = min(failures)
        raise RecipeError(f"invalid recipe: rewards.functions.{index}.name: {failures[index]}")


def check_recipe_files(recipe: Recipe, base_dir: Path | None = None) -> None:
    """Cheap checks of everything the recipe points to: files, folders, reward plugins."""
    m = recipe.models
    for field, value in [
        ("models.encoder.path", m.encoder.path),
        ("models.decoder.path", m.decoder.path),
        ("models.connector.path", m.connector.path),
        ("models.clip.checkpoint", m.clip.checkpoint),
    ]:
        if value and not Path(value).exists():
            raise RecipeError(f"invalid recipe: {field}: file or folder not found: {value}")
    if recipe.data.source is not None:
        from rl.data import DataError, check_source

        try:
            check_source(recipe.data.source, recipe.data.image_column)
        except DataError as e:
            raise RecipeError(f"invalid recipe: data.source: {e}") from None
    else:
        from rl.data import DataError, load_generator

        try:
            load_generator(recipe.data.generator)
        except DataError as e:
            raise RecipeError(f"invalid recipe: {e}") from None
    if recipe.pretrain.enabled:
        from rl.named import UnknownName, resolve

        try:
            resolve(recipe.pretrain.provider, PRETRAIN_PROVIDERS, "pretrain.provider")
        except UnknownName as e:
            raise RecipeError(f"invalid recipe: {e}") from None
    _check_output_dir(recipe.output.dir)
    _check_plugins(recipe, base_dir)
    if recipe.output.wandb_project is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise RecipeError("invalid recipe: output.wandb_project: wandb is not installed (pip install wandb), "
                              "or set output.wandb_project: null")
    if recipe.rollout.caption.backend == "vllm":
        from rollouts.captions import vllm_available

        if not vllm_available():
            raise RecipeError("invalid recipe: rollout.caption.backend: `vllm` needs the `vllm` extra "
                              "(pip install 'unified-grpo[vllm]') and a CUDA GPU; use `hf` on this machine")
    if recipe.rollout.caption.backend == "vllm_server":
        from rollouts.captions import vllm_available

        if not vllm_available():  # TRL's VLLMClient refuses to build without vLLM; its NCCL group needs CUDA
            raise RecipeError("invalid recipe: rollout.caption.backend: `vllm_server` talks to the server through "
                              "TRL's VLLMClient, which needs the `vllm` extra (pip install 'unified-grpo[vllm]') "
                              "and a CUDA GPU on the rollout worker; use `hf` on this machine")
