"""Caption groups: G captions per image from the encoder policy, with their token log-probs.

Two functions carry stage 2 (UAE sec. 2.3): `generate_captions` samples a `CaptionGroup` (the
rollout), and `completion_logprobs` recomputes per-token log-probs of those captions under the
current (or reference) policy (the learner). Both scale logits by the same temperature, so the
ratio pi/pi_old compares like with like.

Backends: `hf` (transformers generate, here) and `vllm` (`VLLMCaptioner`, GPU only, used when the
`vllm` extra is installed; LoRA weights reach it as LoRA requests).
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple, Sequence

import torch
from PIL import Image

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
    logprobs: torch.Tensor  # (N, T) log-probs of the sampled tokens under the rollout policy
    captions: list[str]  # (N,) decoded text
    group_size: int
    version: int  # weight version of the policy that sampled them


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
                      seed: int = 0, version: int = 0, greedy: bool = False) -> CaptionGroup:
    """Sample G captions per image (UAE sec. 2.3, stage 2 rollouts) with HF generate."""
    model = encoder.model
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encoder.prepare(images).items()}
    torch.manual_seed(seed)  # generate() samples from the global generator
    out = model.generate(
        **inputs,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        num_return_sequences=group_size,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=encoder.eos_token_id,
        pad_token_id=encoder.pad_token_id,
        suppress_tokens=encoder.suppressed_ids,
    )
    prompt_len = inputs["input_ids"].shape[1]
    ids = out.sequences[:, prompt_len:]  # (N, T)
    mask = completion_mask(ids, encoder.eos_token_id)
    logits = torch.stack(out.logits, dim=1).float()  # (N, T, V) raw, before warpers
    logits[..., encoder.suppressed_ids] = float("-inf")
    logprobs = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
    # masked_fill, not `* mask`: padding may be a suppressed token with log-prob -inf.
    logprobs = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).masked_fill(mask == 0, 0.0)
    return CaptionGroup(
        prompt_ids=inputs["input_ids"].cpu(),
        prompt_mask=inputs["attention_mask"].cpu(),
        pixel_values=inputs["pixel_values"].cpu(),
        image_grid_thw=inputs["image_grid_thw"].cpu(),
        completion_ids=ids.cpu(),
        completion_mask=mask.cpu(),
        logprobs=logprobs.cpu(),
        captions=encoder.decode(ids, mask),
        group_size=group_size,
        version=version,
    )


def expand_inputs(group: CaptionGroup, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for all N = B * G rows: each image's prompt and patches repeated G times."""
    g = group.group_size
    patches_per_image = group.image_grid_thw.prod(dim=1).tolist()
    chunks = torch.split(group.pixel_values, patches_per_image, dim=0)
    pixel_values = torch.cat([c for c in chunks for _ in range(g)], dim=0)
    ids = torch.cat([group.prompt_ids.repeat_interleave(g, 0), group.completion_ids], dim=1)
    mask = torch.cat([group.prompt_mask.repeat_interleave(g, 0), group.completion_mask], dim=1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": pixel_values.to(device),
        "image_grid_thw": group.image_grid_thw.repeat_interleave(g, 0).to(device),
    }


def completion_logprobs(model: torch.nn.Module, group: CaptionGroup, temperature: float,
                        suppressed_ids: Sequence[int] = (), with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (N, T) of the group's captions under `model` (grad if enabled).

    One forward pass over prompt + caption; only the last T + 1 positions' logits are formed.
    Returns (logprobs, entropy (N, T) or None).
    """
    device = next(model.parameters()).device
    inputs = expand_inputs(group, device)
    t = group.completion_ids.shape[1]
    logits = model(**inputs, logits_to_keep=t + 1).logits[:, :-1].float()  # (N, T, V)
    if suppressed_ids:
        logits[..., list(suppressed_ids)] = float("-inf")  # as generate's suppress_tokens
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    ids = group.completion_ids.to(device)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(group.completion_mask.to(device) == 0, 0.0)  # padding: 0, never -inf
    entropy = None
    if with_entropy:
        p = logp_all.exp()
        entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1).detach()
    return logp, entropy


class VLLMCaptioner:
    """Caption rollouts with vLLM (GPU). LoRA weights arrive as LoRA requests, never a full copy.

    Used when `rollout.caption.backend: vllm`; `rl.config` refuses that value where vLLM is absent.
    The log-probs vLLM returns are the rollout engine's; the learner corrects the mismatch with its
    own log-probs through the importance ratio.
    """

    def __init__(self, model_name: str, max_lora_rank: int = 64, gpu_memory_utilization: float = 0.3):
        if not vllm_available():
            raise RuntimeError("the vllm backend needs `pip install 'unified-grpo[vllm]'` and a CUDA GPU")
        from vllm import LLM

        self.llm = LLM(model=model_name, enable_lora=True, max_lora_rank=max_lora_rank,
                       gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt={"image": 1})
        self.lora_path: str | None = None
        self.version = 0

    def load_lora(self, adapter_dir: str, version: int) -> None:
        """Point the engine at a saved peft adapter folder (written by the learner after an update)."""
        self.lora_path, self.version = adapter_dir, version

    def generate(self, prompts: list[str], images: list[Image.Image], group_size: int, *,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[list[tuple[list[int], list[float]]]]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                logprobs=0, seed=seed)
        lora = LoRARequest(f"policy-v{self.version}", self.version + 1, self.lora_path) if self.lora_path else None
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        outs = self.llm.generate(requests, params, lora_request=lora)
        result = []
        for o in outs:
            result.append([(list(c.token_ids), [next(iter(lp.values())).logprob for lp in c.logprobs]) for c in o.outputs])
        return result

    def caption_group(self, encoder: Encoder, images: Sequence[Image.Image], group_size: int, *,
                      max_new_tokens: int, temperature: float, top_p: float, seed: int, version: int) -> CaptionGroup:
        """The same `CaptionGroup` as `generate_captions`, sampled by vLLM: prompt tensors from the
        encoder's processor (the learner re-reads them), tokens and log-probs from the engine."""
        images = encoder.resized(images)  # once, for both the processor and the engine
        inputs = encoder.prepare(images)
        outs = self.generate([encoder.prompt_text()] * len(images), list(images), group_size,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
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
        logprobs=group.logprobs[rows], captions=[group.captions[r] for r in rows],
    )
