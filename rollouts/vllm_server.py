"""Caption rollouts on a separate vLLM server, as TRL's `vllm_mode="server"` (TRL 1.16).

Generation runs on other GPUs or nodes (`trl vllm-serve --model BASE --enable-scale-out`, i.e. vLLM's
OpenAI server in dev mode with the NCCL weight-transfer engine and processed log-probs); the rollout
worker talks to it with TRL's own `VLLMClient` and pushes the encoder's LoRA after every weight sync.

What TRL's GRPOTrainer does there, and what this module does with our `CaptionGroup` inputs:
- prompts: TRL sends token ids plus the server's image features (`VLLMClient.image_features`, then
  `_place_features` re-points them at the runs of image tokens in the trainer's own ids). Here the
  ids are the processor's prompt for each image (`server_prompts`: the group's left-padded
  prompt_ids without padding, its <|image_pad|> run expanded by the processor, so the engine samples
  on exactly the learner's prompt) and `place_image_features` re-points the features, refusing a run
  whose length differs from the server's (a server-side resize the learner would not see).
- sampling: the same SamplingParams as the in-process engine (`captions.vllm_sampling_kwargs`:
  blocked ids through logit_bias, temperature, EOS stop, the sampled token's log-prob), split into
  VLLMClient.generate's arguments and its `generation_kwargs` (`client_generate_kwargs`); the server
  returns processed log-probs (after bias and temperature, `--logprobs-mode processed_logprobs`,
  which `trl vllm-serve` sets), as the in-process engine.
- results: VLLMClient.generate's output (prompt-major, n per prompt) becomes each image's G
  (token ids, log-probs) pairs (`samples_from_client_output`, the sampled token's log-prob read by id),
  then the same `captions.group_from_samples` as the in-process engine: sampler "vllm", so the
  learner applies the truncated IS correction as for the in-process engine.
- weights: TRL merges the PEFT adapter (merge_adapter), walks every parameter and pushes it under
  its checkpoint name (`base_model.model.` and `.base_layer` dropped, `lora_*` skipped). Here only the
  modules that carry a LoRA change, so only their merged weights W + scale B A are pushed
  (`merged_lora_weights`, same names as TRL's, computed without touching the live model); the rest
  of the server's weights are the base checkpoint it loaded, which the worker never modifies. vLLM's
  Qwen2.5-VL maps those checkpoint names itself (its hf_to_vllm_mapper: model.language_model. ->
  language_model.model., model.visual. -> visual., lm_head. -> language_model.lm_head.).

Only the pure parts run without CUDA (they are tested); `VLLMServerCaptioner` needs vLLM installed
(TRL's client refuses to build without it) and a CUDA device on the rollout worker (NCCL).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from rl.models.encoder import Encoder
from rollouts.captions import CaptionGroup, _check_prompt_keys, group_from_samples, vllm_sampling_kwargs

# VLLMClient.generate's own keyword arguments; every other SamplingParams field goes through its
# `generation_kwargs` (passed as-is in the request body).
CLIENT_SAMPLING_ARGS = ("n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "max_tokens", "logprobs")


def server_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """One token-id prompt per image from the processor's left-padded (B, P) ids and mask: the
    positions the mask keeps, i.e. the chat prompt with its expanded <|image_pad|> run."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]


def image_token_runs(prompt_ids: Sequence[int], image_token_id: int) -> list[dict[str, int]]:
    """The runs of consecutive `image_token_id` in a prompt, as vLLM placeholders {offset, length}."""
    runs, i = [], 0
    while i < len(prompt_ids):
        if prompt_ids[i] != image_token_id:
            i += 1
            continue
        start = i
        while i < len(prompt_ids) and prompt_ids[i] == image_token_id:
            i += 1
        runs.append({"offset": start, "length": i - start})
    return runs


def place_image_features(features: dict | None, prompt_ids: Sequence[int], image_token_id: int) -> dict | None:
    """The server's features for one prompt's images (`VLLMClient.image_features`), pointed at the
    image-token runs of `prompt_ids` (TRL's `_place_features`). Unlike TRL, each run must be as long
    as the server's placeholder: a different length means the server resized the image differently
    from the processor the learner uses, and its captions would not be of the learner's prompt."""
    if features is None:
        return None
    runs = image_token_runs(prompt_ids, image_token_id)
    served = features["mm_placeholders"]["image"]
    if len(runs) != len(served):
        raise ValueError(f"the prompt has {len(runs)} runs of image tokens but the vLLM server processed "
                         f"{len(served)} images: one run per image is needed")
    for run, srv in zip(runs, served):
        if int(srv["length"]) != run["length"]:
            raise ValueError(f"the vLLM server made {srv['length']} image tokens of an image the encoder's processor "
                             f"makes {run['length']} of: start the server with the encoder's processor settings "
                             "(min_pixels / max_pixels), the images are sent already resized (Encoder.resized)")
    return {**features, "mm_placeholders": {**features["mm_placeholders"], "image": runs}}


def client_generate_kwargs(sampling: dict[str, Any]) -> dict[str, Any]:
    """`vllm_sampling_kwargs` (SamplingParams fields) as VLLMClient.generate arguments: its own
    parameters as such, the rest (seed, logit_bias, stop_token_ids) in `generation_kwargs`."""
    out = {k: v for k, v in sampling.items() if k in CLIENT_SAMPLING_ARGS}
    extra = {k: v for k, v in sampling.items() if k not in CLIENT_SAMPLING_ARGS}
    if extra:
        out["generation_kwargs"] = extra
    return out


def samples_from_client_output(output: dict[str, Any], group_size: int) -> list[list[tuple[list[int], list[float]]]]:
    """VLLMClient.generate's output for B prompts with n = G (completion_ids prompt-major, logprobs and
    logprob_token_ids (B * G, T, k) sorted by probability) -> per image, G (token ids, log-probs) pairs,
    each log-prob the sampled token's, found by id (with logprobs=0 it is the only entry)."""
    ids, lps, lp_ids = output["completion_ids"], output["logprobs"], output["logprob_token_ids"]
    if lps is None:
        raise ValueError("the vLLM server returned no log-probs: the request must ask for logprobs=0")
    if len(ids) % group_size:
        raise ValueError(f"the vLLM server returned {len(ids)} completions, not a multiple of group_size {group_size}")
    rows = []
    for tokens, pos_lps, pos_ids in zip(ids, lps, lp_ids):
        rows.append((list(tokens), [float(lp[ids_t.index(t)]) for t, lp, ids_t in zip(tokens, pos_lps, pos_ids)]))
    return [rows[i:i + group_size] for i in range(0, len(rows), group_size)]


def vllm_param_name(name: str, adapter_prefix: str = "lora_") -> str | None:
    """A peft-wrapped encoder parameter's checkpoint name, as TRL's `_iter_named_params` maps it
    (None: an adapter tensor, which vLLM does not have once merged)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if adapter_prefix in name or "original_module" in name:
        return None
    return name.replace("modules_to_save.default.", "")


@torch.no_grad()
def merged_lora_weights(model: torch.nn.Module, adapter: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, merged weight W + scale B A) of every LoRA-carrying module of a peft model,
    the live model untouched (peft's own get_delta_weight, what merge_adapter adds). Other weights are
    the base checkpoint's, which the server already holds."""
    from peft.tuners.lora import LoraLayer

    for mod_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            weight = module.get_base_layer().weight
            name = vllm_param_name(f"{mod_name}.base_layer.weight", model.prefix if hasattr(model, "prefix") else "lora_")
            yield name, (weight + module.get_delta_weight(adapter).to(weight.dtype)).detach()


class VLLMServerCaptioner:
    """Caption rollouts on a vLLM server (`rollout.caption.backend: vllm_server`).

    Connects at construction (waiting up to `vllm_server_timeout` s for the server) and joins its
    NCCL weight-transfer group on `device` (CUDA; TRL's init_communicator). `push_weights` after
    every weight sync, `caption_group` for each rollout."""

    def __init__(self, caption_cfg, device: torch.device | str | int = 0):
        from trl.generation.vllm_client import VLLMClient  # raises ImportError without vLLM

        c = caption_cfg
        self.client = VLLMClient(base_url=c.vllm_server_base_url, host=c.vllm_server_host,
                                 server_port=c.vllm_server_port, group_port=c.vllm_group_port,
                                 connection_timeout=c.vllm_server_timeout)
        self.client.init_communicator(device=device)
        self.version = 0

    def push_weights(self, model: torch.nn.Module, version: int) -> None:
        """The encoder's merged LoRA modules to the server, then its prefix cache reset (TRL's sync_weights)."""
        weights = list(merged_lora_weights(model))
        metadata = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in weights]
        self.client.update_named_params(metadata, iter(weights))
        self.client.reset_prefix_cache()
        self.version = version

    def caption_group(self, encoder: Encoder, images: Sequence[Image.Image], group_size: int, *,
                      max_new_tokens: int, temperature: float, top_p: float, seed: int, version: int) -> CaptionGroup:
        """The same `CaptionGroup` as `VLLMCaptioner.caption_group`, sampled by the server."""
        images = encoder.resized(images)
        inputs = encoder.prepare(images)
        _check_prompt_keys(inputs)
        prompts = server_prompts(inputs["input_ids"], inputs["attention_mask"])
        image_token = encoder.model.config.image_token_id
        features = [place_image_features(f, p, image_token)
                    for f, p in zip(self.client.image_features([[im] for im in images]), prompts)]
        sampling = vllm_sampling_kwargs(group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed, blocked_ids=encoder.suppressed_ids,
                                        eos_id=encoder.eos_token_id)
        out = self.client.generate(prompts=prompts, features=features, **client_generate_kwargs(sampling))
        return group_from_samples(encoder, inputs, samples_from_client_output(out, group_size), group_size, version)
