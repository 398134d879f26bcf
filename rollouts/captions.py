"""Caption groups: G captions per image from the encoder policy, with their token log-probs.

Two functions carry stage 2 (UAE sec. 2.3): `generate_captions` samples a `CaptionGroup` (the
rollout), and `completion_logprobs` computes per-token log-probs of those captions under the
current (or reference) policy. The rollout's log-probs ARE `completion_logprobs` of its captions
(one extra forward after generation, as TRL's old_per_token_logps), so the ratio pi/pi_old compares
like with like: same temperature, same suppressed tokens, same code. That forward runs only when the
rollout may be stale by the time the learner trains on it (async rollouts); on-policy the learner's
own first pass is pi_old and the rollout skips it (`score=False`), as TRL does.

Memory is bounded by a micro-batch (shared/DESIGN.md, "Scale"): generation runs `micro_batch_size`
rows per call, and log-probs never form (rows x tokens x vocabulary) logits, only `chunk` positions'
worth at a time (Qwen2.5-VL's vocabulary is 151,936: 1024 positions are 0.6 GB in float32).

The vision tower runs once per image, never once per caption copy: a group's G rows share their
image's embeddings (`image_features`, passed to Qwen2.5-VL as `mm_encoder_outputs`), in generation,
in the rollout's log-probs and in the learner (`ImageFeatures` keeps a frozen tower's output for a
whole update: reference pass, micro-batches and iterations).

Backends: `hf` (transformers generate's sampling, here: `lean_generate` or `generate` itself), `vllm` (`VLLMCaptioner`, GPU only, used when the
`vllm` extra is installed; LoRA weights reach it as LoRA requests) and `vllm_server`
(`rollouts.vllm_server`, a separate server as TRL's server mode, sharing this module's sampling
parameters and `group_from_samples`).
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPooling
from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

from rl.grpo import shard_rows
from rl.models.encoder import Encoder


class CaptionGroup(NamedTuple):
    """A batch of B images with G sampled captions each (N = B * G rows, image-major)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded chat prompt with the image placeholder
    prompt_mask: torch.Tensor  # (B, P)
    pixel_values: torch.Tensor  # (sum of patches over B, D) the processor's flattened patches
    image_grid_thw: torch.Tensor  # (B, 3)
    completion_ids: torch.Tensor  # (N, T) right-padded caption tokens, EOS included
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    # (N, T) log-probs of the sampled tokens under the rollout policy; None when the rollout skipped
    # scoring them (`generate_captions(score=False)`: on-policy, the learner's own first pass is pi_old)
    logprobs: torch.Tensor | None
    captions: list[str]  # (N,) decoded text
    group_size: int
    version: int  # weight version of the policy that sampled them
    # (B, P) the processor's modality of each prompt token: 0 text, 1 image. Qwen2.5-VL computes the
    # image tokens' 3-D M-RoPE positions (get_rope_index) only when it is passed; None (groups built
    # by hand) leaves it out, so every token gets a 1-D text position.
    mm_token_type_ids: torch.Tensor | None = None
    # Which engine sampled the captions and wrote `logprobs`: "hf" (`generate_captions`: the learner's
    # own computation, so no correction) or "vllm" (`VLLMCaptioner`: another engine's numerics, which
    # the learner corrects with `grpo.rollout_is_weights`).
    sampler: str = "hf"


def vllm_available() -> bool:
    """True when the `vllm` extra is installed and a CUDA GPU is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def completion_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, T) mask that is 1 up to and including the first `eos_id` of each row."""
    is_eos = ids == eos_id
    # Number of EOS strictly before each position: 0 means "still inside the caption".
    before = torch.cumsum(is_eos, dim=1) - is_eos.long()
    return (before == 0).long()


@torch.no_grad()
def generate_captions(encoder: Encoder, images: Sequence[Image.Image], group_size: int, *,
                      max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                      seed: int = 0, version: int = 0, greedy: bool = False,
                      micro_batch_size: int | None = None, logits_chunk: int = 1024, score: bool = True,
                      loop: str = "lean") -> CaptionGroup:
    """Sample G captions per image (UAE sec. 2.3, stage 2 rollouts) as HF generate samples them
    (`lean_generate`, or `model.generate` itself with loop "hf").

    B images -> N = B * G rows, image-major. `micro_batch_size` rows per model call: each generate
    call takes max(1, micro_batch_size // G) images x G samples (None: all B images in one call).
    The calls' completions are right-padded to a common T (pad id, mask 0).

    The vision tower runs once per image of a call (`image_features`); generate() gets the embeddings
    (`mm_encoder_outputs`, repeated for the G samples) and computes only the last position's logits
    at each step (logits_to_keep=1), none of which are kept.

    Log-probs (N, T) are computed after each generate call by `completion_logprobs` under no_grad,
    on the same rows and image embeddings, `logits_chunk` positions at a time: exactly the learner's
    computation, so the first importance ratio is 1 up to float round-off. This costs one forward
    over prompt + caption (TRL's old_per_token_logps does the same) instead of keeping generate's
    (N, V) logits for each of the T steps. Greedy decoding scores at temperature 1.

    `score=False` skips that forward and returns `logprobs=None`: for rollouts the learner trains on
    with the weights that sampled them (same version), where its own first pass is pi_old, as TRL's
    GRPOTrainer skips old_per_token_logps when training is on-policy (`RolloutWorker.score_captions`
    decides; the learner refuses an unscored group that has gone stale). The captions are the same
    either way (scoring draws nothing from the random stream).

    The sampled captions depend on `micro_batch_size` through the global random stream (seeded once
    from `seed`), not their distribution.

    `loop` "lean" (`lean_generate`: generate's own preparation, sampling and stopping, in a plain
    per-token loop; the same tokens) or "hf" (`model.generate`).

    Sampling filters as TRL's GRPOConfig: top_k (None or 0: off; TRL default 0), min_p (None: off,
    TRL's default), repetition_penalty (1.0: off, TRL's default). Like TRL, the log-probs are of the
    temperature-scaled distribution without these filters.
    """
    if loop not in ("lean", "hf"):
        raise ValueError(f"generate_captions: loop {loop!r} is neither 'lean' nor 'hf' (rollout.caption.generate_loop)")
    model = encoder.model
    device = next(model.parameters()).device
    inputs = encoder.prepare(images)  # all images at once: one left-padded prompt length P for the group
    _check_prompt_keys(inputs)
    b, g = inputs["input_ids"].shape[0], group_size
    images_per_call = b if micro_batch_size is None else max(1, micro_batch_size // g)
    patches = torch.split(inputs["pixel_values"], inputs["image_grid_thw"].prod(dim=1).tolist(), dim=0)
    prompt_len = inputs["input_ids"].shape[1]
    score_temperature = 1.0 if greedy else temperature
    torch.manual_seed(seed)  # generate() samples from the global generator
    pieces = []  # (ids (n_k, T_k), mask (n_k, T_k), log-probs (n_k, T_k)) per call
    for lo in range(0, b, images_per_call):
        hi = min(lo + images_per_call, b)
        # Everything the processor returned, these images' share of it, with the vision tower's output
        # for each image (computed once here, as generate() would) in place of the pixels: generate()
        # repeats prompts and embeddings for the G samples and extends mm_token_type_ids with 0 (text).
        call = {k: v[lo:hi].to(device) for k, v in inputs.items() if k != "pixel_values"}
        feats = image_features(model, torch.cat(patches[lo:hi], dim=0), inputs["image_grid_thw"][lo:hi])
        settings = dict(
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None,
            top_k=top_k if (top_k and not greedy) else None,
            min_p=min_p if not greedy else None,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens,
            num_return_sequences=g,
            eos_token_id=encoder.eos_token_id,
            pad_token_id=encoder.pad_token_id,
            suppress_tokens=encoder.suppressed_ids,
        )
        embeds = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
        if loop == "lean":
            ids = lean_generate(model, call, embeds, **settings).cpu()  # (n_k, T_k)
        else:
            ids = model.generate(**call, mm_encoder_outputs=embeds, **settings)[:, prompt_len:].cpu()
        # ids (n_k, T_k), T_k: this call's longest caption
        mask = completion_mask(ids, encoder.eos_token_id)
        logp = None
        if score:  # pi_old of these rows, scored like the learner, on the same image embeddings (no second
            # vision pass); the RNG is untouched, so the next call samples as if this were not here.
            part = CaptionGroup(
                prompt_ids=inputs["input_ids"][lo:hi], prompt_mask=inputs["attention_mask"][lo:hi],
                pixel_values=torch.cat(patches[lo:hi], dim=0), image_grid_thw=inputs["image_grid_thw"][lo:hi],
                completion_ids=ids, completion_mask=mask, logprobs=None, captions=[""] * ids.shape[0],
                group_size=g, version=version,
                mm_token_type_ids=None if "mm_token_type_ids" not in inputs else inputs["mm_token_type_ids"][lo:hi])
            logp = completion_logprobs(model, part, score_temperature, encoder.suppressed_ids, chunk=logits_chunk,
                                       features=ImageFeatures.of(list(feats)))[0].cpu()
        pieces.append((ids, mask, logp))
        del feats
    # A row without EOS ran to max_new_tokens, so only finished rows get the padding: mask 0, log-prob 0.
    t = max(p.shape[1] for p, _, _ in pieces)
    ids = torch.cat([F.pad(i, (0, t - i.shape[1]), value=encoder.pad_token_id) for i, _, _ in pieces])  # (N, T)
    mask = torch.cat([F.pad(m, (0, t - m.shape[1]), value=0) for _, m, _ in pieces])  # (N, T)
    logprobs = torch.cat([F.pad(lp, (0, t - lp.shape[1]), value=0.0) for _, _, lp in pieces]) if score else None  # (N, T)
    return CaptionGroup(
        prompt_ids=inputs["input_ids"],
        prompt_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        completion_ids=ids,
        completion_mask=mask,
        logprobs=logprobs,
        captions=encoder.decode(ids, mask),
        group_size=g,
        version=version,
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
    )


@torch.no_grad()
def lean_generate(model: torch.nn.Module, call: dict[str, torch.Tensor], mm_encoder_outputs: dict, *,
                  num_return_sequences: int, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                  **settings) -> torch.Tensor:
    """The tokens `model.generate(**call, mm_encoder_outputs=..., num_return_sequences=G, ...)` samples
    after the prompt, (b * G, T) with T the longest caption, from a plain per-token loop.

    transformers 5.23's `GenerationMixin.generate` / `_sample` for a decoder-only model with a
    DynamicCache (the CPU path, `StopCheck`), with the same steps in the same order, so the same random
    draws give the same tokens: generate's own helpers build the generation config, the 3-D M-RoPE
    positions (`_prepare_position_ids_for_generation`, before expansion; an all-ones mask then
    dropped), the expansion to G copies (`_expand_inputs_for_generation`) and the logits processors
    (`_get_logits_processor`: repetition penalty, suppressed tokens, temperature, top-k, top-p, min-p,
    in its order). Then one prefill forward and one forward per token, each with the last token, its
    position (the previous one + 1 in every M-RoPE row, as `_update_model_kwargs_for_generation`) and
    the KV cache, keeping the last position's logits only. The prefill runs on the b prompts, not
    their b * G copies: its KV cache and logits are then repeated G times, which are the values
    generate computes G times (the test checks the tokens stay generate's); softmax and `torch.multinomial` (argmax
    when greedy); finished rows get `pad_token_id`; stop when every row has emitted `eos_token_id`
    or after `max_new_tokens`.

    What it leaves out is generate's per-token machinery (`prepare_inputs_for_generation`, kwargs
    updates, stopping-criteria lists, output bookkeeping, a signature lookup per logits processor),
    a large part of a small model's sampling time.
    `rollout.caption.generate_loop: hf` keeps `model.generate`, which a model sharded by ZeRO-3 or
    FSDP over several ranks (generate's synced_gpus) also gets from here."""
    from transformers import DynamicCache
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.distributed.utils import _get_torch_distributed_world_size
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: layers stay adapted
    if (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(base)) and _get_torch_distributed_world_size() > 1:
        # generate's synced_gpus: every rank keeps stepping until all have finished (sharded weights are
        # gathered collectively); this loop stops per rank, so leave such models to generate itself.
        return model.generate(**call, mm_encoder_outputs=mm_encoder_outputs, num_return_sequences=num_return_sequences,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              **settings)[:, call["input_ids"].shape[1]:]
    config, _ = base._prepare_generation_config(
        None, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, **settings)
    prompt = call["input_ids"]  # (b, P)
    device = prompt.device
    base._prepare_special_tokens(config, True, device=device)
    kwargs = {k: v for k, v in call.items() if k != "input_ids"}
    kwargs["mm_encoder_outputs"] = mm_encoder_outputs
    kwargs["position_ids"] = base._prepare_position_ids_for_generation(prompt, kwargs)  # (4, b, P)
    if (kwargs["attention_mask"] == 1).all():  # no padding: generate drops the mask
        kwargs["attention_mask"] = None
    g = max(config.num_beams, config.num_return_sequences)
    cache = DynamicCache(config=base.config.get_text_config(decoder=True))
    # The prompt once per image: a group's G copies share it, so the prefill runs on the b prompts and
    # its KV cache and last logits are repeated G times (generate prefills all b * G copies).
    out = base(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True, **kwargs)
    cache.batch_repeat_interleave(g)
    logits = out.logits[:, -1].repeat_interleave(g, dim=0)  # (n, V)
    del out
    kwargs = {k: v for k, v in kwargs.items() if k != "mm_encoder_outputs"}  # prefill only (generate mutates it)
    ids, kwargs = base._expand_inputs_for_generation(expand_size=g, input_ids=prompt, **kwargs)  # (n, P)
    processors = base._get_logits_processor(generation_config=config, input_ids_seq_length=ids.shape[1],
                                            encoder_input_ids=prompt, device=device, model_kwargs=kwargs)
    # LogitsProcessorList.__call__ reads every processor's signature at every token; read them once
    # here (none of these takes more than (input_ids, scores)) and call them in the same order.
    for proc in processors:
        if len(inspect.signature(proc.__call__).parameters) > 2:
            raise NotImplementedError(f"lean_generate: {type(proc).__name__} needs extra arguments; use "
                                      "rollout.caption.generate_loop: hf")
    max_length = ids.shape[1] + config.max_new_tokens
    pad, eos = config._pad_token_tensor.to(device), config._eos_token_tensor.to(device)
    positions, mask = kwargs["position_ids"], kwargs["attention_mask"]
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=device)
    prompt_len = ids.shape[1]
    while True:
        logits = logits.to(copy=True, dtype=torch.float32, device=device)  # (n, V)
        scores = logits
        for proc in processors:
            scores = proc(ids, scores)
        if config.do_sample:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # (n,)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~torch.isin(tokens, eos)
        if ids.shape[1] >= max_length or unfinished.max() == 0:
            break
        positions = positions[..., -1:] + 1  # (4, n, 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        logits = base(input_ids=tokens[:, None], position_ids=positions, attention_mask=mask, past_key_values=cache,
                      use_cache=True, logits_to_keep=1, return_dict=True).logits[:, -1]
    return ids[:, prompt_len:]


# The processor outputs a CaptionGroup carries (Qwen2.5-VL with images; mm_token_type_ids is absent
# from processors that do not return it). A new key would have to be carried too, never dropped.
PROMPT_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}


def _check_prompt_keys(inputs: dict) -> None:
    unknown = set(inputs) - PROMPT_KEYS
    if unknown:
        raise ValueError(f"the processor returned {sorted(unknown)}, which CaptionGroup does not carry: add "
                         f"them to CaptionGroup, expand_inputs and shard_group rather than drop them")


def _row_indices(group: CaptionGroup, rows: slice | None) -> torch.Tensor:
    """Indices (n,) of the rows `rows` of the group's N = B * G rows (None: all)."""
    n = group.completion_ids.shape[0]
    return torch.arange(n) if rows is None else torch.arange(n)[rows]


def expand_inputs(group: CaptionGroup, device: torch.device, rows: slice | None = None,
                  pixels: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for the rows `rows` (None: all N = B * G): each row's prompt and its image's
    patches (row r belongs to image r // G; an image's patches are its image_grid_thw.prod()
    consecutive rows of pixel_values). Only the images those rows need are read. This is the
    per-copy input (the vision tower would run once per row); `pixels=False` leaves pixel_values
    out, for `completion_logprobs`, which passes each image's embeddings once instead.

    mm_token_type_ids (n, P + T): the prompt's, then 0 (text) for the caption tokens, as the
    processor would type prompt + caption and as generate() extends it."""
    idx = _row_indices(group, rows)
    image_of = idx // group.group_size  # (n,)
    ids = torch.cat([group.prompt_ids[image_of], group.completion_ids[idx]], dim=1)
    mask = torch.cat([group.prompt_mask[image_of], group.completion_mask[idx]], dim=1)
    out = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "image_grid_thw": group.image_grid_thw[image_of].to(device),
    }
    if pixels:
        chunks = torch.split(group.pixel_values, group.image_grid_thw.prod(dim=1).tolist(), dim=0)
        out["pixel_values"] = torch.cat([chunks[i] for i in image_of.tolist()], dim=0).to(device)
    if group.mm_token_type_ids is not None:
        types = group.mm_token_type_ids[image_of]  # (n, P)
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros(idx.shape[0], ids.shape[1] - types.shape[1])],
                                             dim=1).to(device)
    else:
        warnings.warn("CaptionGroup without mm_token_type_ids: Qwen2.5-VL gives its image tokens 1-D positions "
                      "instead of M-RoPE's 3-D ones, unlike generate_captions; build the group with "
                      "mm_token_type_ids=encoder.prepare(images)['mm_token_type_ids']", stacklevel=2)
    return out


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                   ) -> tuple[torch.Tensor, ...]:
    """The vision tower's output (merged patches in the LM's width) for each of k images: k tensors
    (tokens_i, H), tokens_i = image_grid_thw[i].prod() / merge^2, one per image placeholder token.

    pixel_values (sum of patches, D) and image_grid_thw (k, 3) as the processor returns them.
    Qwen2.5-VL's own `get_image_features`, the call its forward makes on pixel_values; gradient as
    the context (the tower is frozen under the default adapter targets)."""
    body, _ = _body_and_head(model)
    device = next(model.parameters()).device
    out = body.get_image_features(pixel_values.to(device), image_grid_thw.to(device), return_dict=True)
    return tuple(out.pooler_output)


def vision_trainable(model: torch.nn.Module) -> bool:
    """True when a parameter of the vision tower requires grad (an adapter target list that reaches
    `visual.*`, e.g. a bare `down_proj`; the default targets the language model only)."""
    body, _ = _body_and_head(model)
    return any(p.requires_grad for p in body.visual.parameters())


class ImageFeatures:
    """The vision tower's output for a group's images, each computed once on first use (under
    no_grad) and reused by every later forward over those images.

    For a frozen tower only (`vision_trainable` false): the reference pass (adapter disabled) and the
    policy passes then see the same embeddings, and no gradient flows into the tower anyway, so
    reusing them is exact. With a trainable tower `completion_logprobs` is given none and computes its
    rows' images per call, with gradient (still once per image, not per caption copy).

    Memory: at most the group's B images, (sum of tokens_i, H) in the model's dtype: with Qwen's
    2x2 merge that is tokens / 4 x 2048 values per image against the patches x 1176 of the
    pixel_values the group already holds (0.44x).
    """

    def __init__(self, model: torch.nn.Module | None, group: CaptionGroup | None):
        self.model, self.group = model, group
        self.cache: dict[int, torch.Tensor] = {}
        self._positions: torch.Tensor | None = None  # (3, N, P + T), `positions`

    def positions(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Qwen2.5-VL's M-RoPE position ids (3, n, P + T) of the group's rows `rows` (n,), computed
        once for all N rows (`get_rope_index`, row by row, as the forward would compute them for
        any subset of rows) and sliced: the forward's own computation ran once per pass before.
        None where the forward computes none itself (no group or no mm_token_type_ids)."""
        if self.group is None or self.group.mm_token_type_ids is None:
            return None
        if self._positions is None:
            body, _ = _body_and_head(self.model)
            full = expand_inputs(self.group, device, None, pixels=False)
            self._positions, _ = body.get_rope_index(full["input_ids"], full["mm_token_type_ids"],
                                                     image_grid_thw=full["image_grid_thw"],
                                                     attention_mask=full["attention_mask"])
        return self._positions[:, rows.to(self._positions.device)]

    @classmethod
    def of(cls, features: Sequence[torch.Tensor]) -> "ImageFeatures":
        """Already computed embeddings of images 0..k-1 (nothing left to compute)."""
        out = cls(None, None)
        out.cache = dict(enumerate(features))
        return out

    def __call__(self, images: Sequence[int]) -> list[torch.Tensor]:
        """Embeddings (tokens_i, H) of the group's images `images` (indices into its B images)."""
        missing = sorted(set(images) - set(self.cache))
        if missing:
            if self.group is None:
                raise KeyError(f"no embeddings for images {missing}")
            chunks = torch.split(self.group.pixel_values, self.group.image_grid_thw.prod(dim=1).tolist(), dim=0)
            with torch.no_grad():
                feats = image_features(self.model, torch.cat([chunks[i] for i in missing], dim=0),
                                       self.group.image_grid_thw[missing])
            self.cache.update((i, f.detach()) for i, f in zip(missing, feats))
        return [self.cache[i] for i in images]


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(Qwen2_5_VLModel, lm_head) of a Qwen2_5_VLForConditionalGeneration, peft-wrapped or not.

    peft and KAdapter put their layers inside the wrapped model's own modules, so calling the inner
    model directly still runs the adapter, and `adapters.disabled` (peft's disable_adapter, or the
    KAdapter flags) still turns it off. lm_head carries no adapter (the targets are the LM's
    attention projections) but is called as a module all the same (hooks, ZeRO-3 gathering)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


# Suppressed tokens get the most negative finite float32, not -inf: exp() still makes their
# probability exactly 0 (so logsumexp and the selected log-probs are those of -inf), but TRL's
# entropy sums p * log p, where -inf would give 0 * -inf = NaN.
_SUPPRESSED = torch.finfo(torch.float32).min


def _chunk_logprobs(lm_head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, temperature: float,
                    suppressed: torch.Tensor | None, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: hidden (M, H), ids (M,) -> (log p(ids) (M,), entropy (M,) or None), float32.

        z = lm_head(h) / temperature,  z[suppressed] = -big,  log p(y) = z_y - logsumexp(z)
        H = -sum_v p_v log p_v (detached: a statistic, never a loss term here)
    """
    logits = lm_head(hidden).float() / temperature  # (M, V): the only vocabulary-wide tensor
    if suppressed is not None:
        logits.index_fill_(-1, suppressed, _SUPPRESSED)  # as generate's suppress_tokens
    # TRL's functions loop over the first dimension (one logsumexp per element, "to reduce peak
    # memory"); given (M, V) that is M small calls, whose Python overhead was most of a tiny model's
    # scoring time. As (1, M, V) the chunk is one element, as one of TRL's (T, V) sequences is: one
    # logsumexp over the chunk, whose (M, V) temporary `chunk` bounds as it bounds the logits.
    logits, ids = logits.unsqueeze(0), ids.unsqueeze(0)  # (1, M, V), (1, M)
    if with_entropy:
        logp, entropy = selective_log_softmax_and_entropy(logits, ids, entropy_requires_grad=False)
        return logp.squeeze(0), entropy.squeeze(0)
    return selective_log_softmax(logits, ids).squeeze(0), None


def completion_logprobs(model: torch.nn.Module, group: CaptionGroup, temperature: float,
                        suppressed_ids: Sequence[int] = (), with_entropy: bool = False,
                        rows: slice | None = None, chunk: int = 1024, features: ImageFeatures | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (n, T) of the captions of rows `rows` (None: all N) under `model` (grad
    if enabled), and their entropies (n, T) (detached) when `with_entropy`, else None.

        log pi(y_t | x, y_<t) = z_t[y_t] - logsumexp(z_t),  z_t = lm_head(h_t) / temperature

    1) the vision tower once per image of those rows (`features`: a frozen tower's cached output,
       and the group's M-RoPE positions computed once; None: computed here, with gradient as the context), each image's embeddings repeated for its
       caption copies (Qwen2.5-VL's `mm_encoder_outputs`, what its forward builds from pixel_values);
       one forward of the language model over prompt + caption for those rows, to hidden states;
       the last T + 1 positions are the ones that predict the caption (the very last is dropped);
    2) the (n * T) positions, flattened row-major, are scored `chunk` at a time: lm_head, float32,
       temperature, suppressed ids, log-softmax of the chosen token (TRL's selective_log_softmax),
       so at most (chunk, V) logits exist at once. With autograd on and more than one chunk, each
       chunk runs under torch.utils.checkpoint: backward keeps the hidden states only and recomputes
       one chunk's logits at a time (a single chunk keeps its logits: the same bound, no recomputation).
    Padding positions (completion_mask 0) get log-prob 0, never -inf; their entropy is left as computed.
    """
    device = next(model.parameters()).device
    body, lm_head = _body_and_head(model)
    idx = _row_indices(group, rows)
    ids = group.completion_ids[idx].to(device)  # (n, T)
    n, t = ids.shape
    images, copy_of = torch.unique(idx // group.group_size, return_inverse=True)  # (k,), (n,): row -> image
    if features is not None:
        per_image = features(images.tolist())
    else:
        chunks = torch.split(group.pixel_values, group.image_grid_thw.prod(dim=1).tolist(), dim=0)
        per_image = image_features(model, torch.cat([chunks[i] for i in images.tolist()], dim=0),
                                   group.image_grid_thw[images])
    embeds = BaseModelOutputWithPooling(pooler_output=[per_image[j] for j in copy_of.tolist()])  # one per row
    positions = features.positions(idx, device) if features is not None else None  # None: the forward's own
    hidden = body(**expand_inputs(group, device, rows, pixels=False), position_ids=positions,
                  mm_encoder_outputs={"image": embeds}, use_cache=False).last_hidden_state  # (n, P + T, H)
    hidden = hidden[:, -(t + 1):-1].reshape(n * t, -1)  # position P - 1 + i predicts caption token i
    flat_ids = ids.reshape(n * t)
    suppressed = torch.tensor(list(suppressed_ids), dtype=torch.long, device=device) if suppressed_ids else None
    logps, entropies = [hidden.new_zeros(0, dtype=torch.float32)], [hidden.new_zeros(0, dtype=torch.float32)]
    # One chunk (n * t <= chunk) is not checkpointed: autograd then keeps its (M, V) logits, the one
    # chunk's worth that the forward holds anyway, and backward skips recomputing them.
    recompute = torch.is_grad_enabled() and n * t > chunk
    for lo in range(0, n * t, chunk):
        args = (lm_head, hidden[lo:lo + chunk], flat_ids[lo:lo + chunk], temperature, suppressed, with_entropy)
        if recompute:
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        if with_entropy:
            entropies.append(entropy)
    logp = torch.cat(logps).view(n, t)
    logp = logp.masked_fill(group.completion_mask[idx].to(device) == 0, 0.0)  # padding: 0, never -inf
    return logp, torch.cat(entropies).view(n, t).detach() if with_entropy else None


# vLLM's SamplingParams.logit_bias is added to the logits before temperature, so it blocks a token
# the way the learner's fill does: exp(-1e4 / T) is exactly 0 in float32 for any T <= 1e2, and its
# processed log-prob stays finite. logit_bias is one of V1's built-in logits processors (a few ids,
# where allowed_token_ids would list the other ~152k; bad_words takes strings, not ids).
BLOCKED_LOGIT_BIAS = -1.0e4


def vllm_engine_kwargs(model_name: str, max_lora_rank: int = 64, gpu_memory_utilization: float = 0.3) -> dict:
    """Keyword arguments of `vllm.LLM` for caption rollouts.

    logprobs_mode "processed_logprobs" (vLLM >= 0.10.2; TRL 1.16 sets it too): the returned log-probs
    are of the distribution vLLM samples from, after the logit bias (blocked tokens) and the
    temperature, which is what the learner computes (`completion_logprobs`: z / T, blocked ids
    filled). The default raw_logprobs are before both, so the importance weights would be biased.
    vLLM's processed log-probs also come after top_p (renormalised over the nucleus), the learner's
    do not: with top_p < 1 the weights carry that difference too (TRL has the same)."""
    return dict(model=model_name, enable_lora=True, max_lora_rank=max_lora_rank,
                gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt={"image": 1},
                logprobs_mode="processed_logprobs")


def vllm_sampling_kwargs(group_size: int, *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                         blocked_ids: Sequence[int] = (), eos_id: int | None = None) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for one caption group, as `generate_captions`
    samples: G samples per prompt (n), the same temperature / top_p / length, the encoder's
    suppressed ids blocked through `logit_bias` (`BLOCKED_LOGIT_BIAS`), the caption ending at the
    encoder's EOS (stop_token_ids; it stays in the tokens), and the sampled token's log-prob only
    (logprobs=0)."""
    kwargs = dict(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                  seed=seed)
    if blocked_ids:
        kwargs["logit_bias"] = {int(i): BLOCKED_LOGIT_BIAS for i in blocked_ids}
    if eos_id is not None:
        kwargs["stop_token_ids"] = [int(eos_id)]
    return kwargs


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict]) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position {token id: Logprob} dicts (with
    logprobs=0 the sampled token's entry, possibly among others: read it by id, not by position)."""
    return [float(lp[t].logprob) for t, lp in zip(token_ids, logprobs)]


class VLLMCaptioner:
    """Caption rollouts with vLLM (GPU). LoRA weights arrive as LoRA requests, never a full copy.

    Used when `rollout.caption.backend: vllm`; `rl.config` refuses that value where vLLM is absent.
    It samples the same distribution as `generate_captions` (`vllm_sampling_kwargs`: blocked ids,
    temperature) and returns its log-probs (`vllm_engine_kwargs`: processed log-probs); its groups
    say sampler "vllm", and the learner weighs their tokens by `grpo.rollout_is_weights` (its own
    log-probs against these).
    """

    def __init__(self, model_name: str, max_lora_rank: int = 64, gpu_memory_utilization: float = 0.3):
        if not vllm_available():
            raise RuntimeError("the vllm backend needs `pip install 'unified-grpo[vllm]'` and a CUDA GPU")
        from vllm import LLM

        self.llm = LLM(**vllm_engine_kwargs(model_name, max_lora_rank, gpu_memory_utilization))
        self.lora_path: str | None = None
        self.version = 0

    def load_lora(self, adapter_dir: str, version: int) -> None:
        """Point the engine at a saved peft adapter folder (written by the learner after an update)."""
        self.lora_path, self.version = adapter_dir, version

    def generate(self, prompts: list[str], images: list[Image.Image], group_size: int, *,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int, blocked_ids: Sequence[int] = (),
                 eos_id: int | None = None) -> list[list[tuple[list[int], list[float]]]]:
        """For each prompt (its text must hold the image placeholder,
        <|vision_start|><|image_pad|><|vision_end|>, as `Encoder.prompt_text()`), G (token ids,
        log-probs) pairs."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(**vllm_sampling_kwargs(group_size, max_new_tokens=max_new_tokens,
                                                       temperature=temperature, top_p=top_p, seed=seed,
                                                       blocked_ids=blocked_ids, eos_id=eos_id))
        lora = LoRARequest(f"policy-v{self.version}", self.version + 1, self.lora_path) if self.lora_path else None
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        outs = self.llm.generate(requests, params, lora_request=lora)
        return [[(list(c.token_ids), sampled_logprobs(c.token_ids, c.logprobs)) for c in o.outputs] for o in outs]

    def caption_group(self, encoder: Encoder, images: Sequence[Image.Image], group_size: int, *,
                      max_new_tokens: int, temperature: float, top_p: float, seed: int, version: int) -> CaptionGroup:
        """The same `CaptionGroup` as `generate_captions`, sampled by vLLM: prompt tensors from the
        encoder's processor (the learner re-reads them), tokens and log-probs from the engine."""
        images = encoder.resized(images)  # once, for both the processor and the engine
        inputs = encoder.prepare(images)
        _check_prompt_keys(inputs)
        outs = self.generate([encoder.prompt_text()] * len(images), list(images), group_size,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             blocked_ids=encoder.suppressed_ids, eos_id=encoder.eos_token_id)
        return group_from_samples(encoder, inputs, outs, group_size, version)


def group_from_samples(encoder: Encoder, inputs: dict, outs: list[list[tuple[list[int], list[float]]]],
                       group_size: int, version: int) -> CaptionGroup:
    """A `CaptionGroup` (sampler "vllm") from the processor's inputs for B images and each image's
    G (token ids, log-probs) from the engine: right-padded like `generate_captions`' groups, log-probs
    0 on padding."""
    rows = [c for per_image in outs for c in per_image]  # image-major, as generate_captions
    t = max(1, max(len(ids) for ids, _ in rows))
    ids = torch.full((len(rows), t), encoder.pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(len(rows), t)
    for i, (tok, lp) in enumerate(rows):
        ids[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
        logprobs[i, : len(lp)] = torch.tensor(lp)
    mask = completion_mask(ids, encoder.eos_token_id)
    return CaptionGroup(
        prompt_ids=inputs["input_ids"], prompt_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
        completion_ids=ids, completion_mask=mask, logprobs=logprobs.masked_fill(mask == 0, 0.0),
        captions=encoder.decode(ids, mask), group_size=group_size, version=version,
        mm_token_type_ids=inputs.get("mm_token_type_ids"), sampler="vllm",
    )


def shard_group(group: CaptionGroup, rank: int, world_size: int) -> CaptionGroup:
    """The images (and their G captions) that learner rank `rank` of `world_size` trains on:
    images rank, rank + world_size, ... Whole groups stay together, so each rank's loss is the
    mean over its groups and DeepSpeed's gradient average is the mean over all of them."""
    if world_size == 1:
        return group
    g = group.group_size
    images = shard_rows(group.prompt_ids.shape[0], 1, rank, world_size).tolist()
    rows = shard_rows(len(group.captions), g, rank, world_size).tolist()
    chunks = torch.split(group.pixel_values, group.image_grid_thw.prod(dim=1).tolist(), dim=0)
    return group._replace(
        prompt_ids=group.prompt_ids[images], prompt_mask=group.prompt_mask[images],
        pixel_values=torch.cat([chunks[i] for i in images], dim=0), image_grid_thw=group.image_grid_thw[images],
        completion_ids=group.completion_ids[rows], completion_mask=group.completion_mask[rows],
        logprobs=None if group.logprobs is None else group.logprobs[rows], captions=[group.captions[r] for r in rows],
        mm_token_type_ids=None if group.mm_token_type_ids is None else group.mm_token_type_ids[images],
    )
