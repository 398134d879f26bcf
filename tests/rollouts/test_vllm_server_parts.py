"""The vLLM server backend's parts that run without vLLM, a GPU or a server (issue 16 item 3).

TRL's own code is the reference wherever it has the part: `VLLMGeneration._place_features` for the
image features, `VLLMClient.generate` / `_generate_from_features` / `parse_logprobs` for the request
body and the response (their HTTP post replaced by a recorder: no server runs here),
`VLLMGeneration._iter_named_params` for the merged LoRA weights and their names.
"""

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration

from rl.adapters import apply_adapter
from rl.config import Recipe, RecipeError, load_recipe
from rl.models.encoder import build_tiny_encoder
from rl.shapes import VOCABULARY, generate_shapes
from rollouts.captions import group_from_samples, vllm_available, vllm_sampling_kwargs
from rollouts.vllm_server import (client_generate_kwargs, image_token_runs, merged_lora_weights, place_image_features,
                                  samples_from_client_output, server_prompts, vllm_param_name)


@pytest.fixture(scope="module")
def encoder():
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    enc.model.eval()
    return enc


@pytest.fixture(scope="module")
def inputs(encoder):
    return encoder.prepare([r.image for r in generate_shapes(2, seed=3)])


def image_token(encoder) -> int:
    return encoder.model.config.image_token_id


# ------------------------------------------------------------------------------------------------
# prompts and image features
# ------------------------------------------------------------------------------------------------
def test_server_prompts_are_the_in_process_prompt_with_its_image_run_expanded(encoder, inputs):
    """The in-process engine gets prompt_text() with one <|image_pad|> that vLLM expands to the image's
    tokens; the server gets the processor's ids, already expanded, left padding dropped."""
    pad = encoder.pad_token_id
    ids = torch.cat([torch.full((2, 3), pad), inputs["input_ids"]], dim=1)  # extra left padding
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    prompts = server_prompts(ids, mask)
    text_ids = encoder.tokenizer(encoder.prompt_text(), add_special_tokens=False)["input_ids"]
    merge = encoder.processor.image_processor.merge_size
    for prompt, thw in zip(prompts, inputs["image_grid_thw"]):
        runs = image_token_runs(prompt, image_token(encoder))
        assert len(runs) == 1 and runs[0]["length"] == int(thw.prod()) // merge ** 2
        collapsed = prompt[:runs[0]["offset"] + 1] + prompt[runs[0]["offset"] + runs[0]["length"]:]
        assert collapsed == text_ids  # one placeholder: the in-process backend's prompt
    assert prompts == server_prompts(inputs["input_ids"], inputs["attention_mask"])


def test_image_features_are_placed_as_trl_places_them(encoder, inputs):
    prompt = server_prompts(inputs["input_ids"], inputs["attention_mask"])[0]
    run = image_token_runs(prompt, image_token(encoder))[0]
    served = {"mm_hashes": {"image": ["h0"]}, "mm_kwargs": {"image": ["..."]},
              "mm_placeholders": {"image": [{"offset": 1, "length": run["length"]}]}}  # a throwaway conversation's offset
    ours = place_image_features(served, prompt, image_token(encoder))
    trl_self = SimpleNamespace(processing_class=SimpleNamespace(image_token_id=image_token(encoder)))
    assert ours == VLLMGeneration._place_features(trl_self, served, prompt)
    assert ours["mm_placeholders"]["image"] == [run] and ours["mm_hashes"] == served["mm_hashes"]
    assert place_image_features(None, prompt, image_token(encoder)) is None
    resized = {**served, "mm_placeholders": {"image": [{"offset": 0, "length": run["length"] * 4}]}}
    with pytest.raises(ValueError, match="min_pixels"):  # TRL would accept it and misplace the image
        place_image_features(resized, prompt, image_token(encoder))


# ------------------------------------------------------------------------------------------------
# the request and the response, through TRL's client code
# ------------------------------------------------------------------------------------------------
def test_request_and_response_through_trl_client(encoder, inputs):
    g, eos = 2, encoder.eos_token_id
    sampling = vllm_sampling_kwargs(g, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=4,
                                    blocked_ids=encoder.suppressed_ids, eos_id=eos)
    prompts = server_prompts(inputs["input_ids"], inputs["attention_mask"])
    features = [{"mm_hashes": {"image": [f"h{k}"]}, "mm_placeholders": {"image": image_token_runs(p, image_token(encoder))}}
                for k, p in enumerate(prompts)]
    sampled = {0: [[7, 8, eos], [9, eos]], 1: [[7, 7, 7, 7, 7], [eos]]}  # per prompt, G completions
    posted, other = [], max(9, eos) + 1  # a token never sampled here

    def post(url, json=None):  # noqa: A002 - TRL's keyword
        posted.append((url, json))
        k = int(json["features"]["mm_hashes"]["image"][0][1:])  # the prompts' ids are alike: told by image
        # vLLM's answer: each sampled token with its processed log-prob, a more likely one listed too
        return {"choices": [{"token_ids": ids, "logprobs": {"content": [
            {"token": f"token_id:{t}", "logprob": -0.5 - 0.1 * i,
             "top_logprobs": [{"token": f"token_id:{other}", "logprob": -0.01}]} for i, t in enumerate(ids)]}}
            for ids in sampled[k]]}

    client = SimpleNamespace(base_url="http://gen:8000", model="base", _post=post)
    client._generate_from_features = lambda *a, **kw: VLLMClient._generate_from_features(client, *a, **kw)
    out = VLLMClient.generate(client, prompts=prompts, features=features, **client_generate_kwargs(sampling))
    assert len(posted) == 2 and all(url == "http://gen:8000/inference/v1/generate" for url, _ in posted)
    body = posted[0][1]
    json.dumps(body)  # the body travels as JSON
    params = body["sampling_params"]
    for key, value in sampling.items():  # every SamplingParams field of the in-process engine, as is
        assert params[key] == value, key
    assert (params["top_k"], params["min_p"], params["repetition_penalty"]) == (0, 0.0, 1.0)  # off, as ours
    assert sorted((b["token_ids"], b["features"]["mm_hashes"]["image"][0]) for _, b in posted) == \
        [(prompts[0], "h0"), (prompts[1], "h1")]  # each prompt with its own image's features

    samples = samples_from_client_output(out, g)
    assert [[ids for ids, _ in per] for per in samples] == [sampled[0], sampled[1]]
    assert samples[0][0][1] == pytest.approx([-0.5, -0.6, -0.7])  # the sampled token's, not the top one's
    group = group_from_samples(encoder, inputs, samples, g, version=3)
    assert group.sampler == "vllm" and group.completion_ids.shape == (4, 5)
    assert torch.equal(group.logprobs[1], torch.tensor([-0.5, -0.6, 0.0, 0.0, 0.0]))  # padding 0
    with pytest.raises(ValueError, match="multiple of group_size"):
        samples_from_client_output(out, 3)


# ------------------------------------------------------------------------------------------------
# the merged LoRA weights pushed to the server
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_encoder():
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    torch.manual_seed(0)
    model = apply_adapter(enc.model, Recipe.model_validate({}).models.encoder.adapter, "encoder")
    with torch.no_grad():  # a trained LoRA: B is zero at init, merging would change nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.eval()
    return enc, model


def test_merged_lora_weights_equal_trls_merged_parameters(peft_encoder):
    _, model = peft_encoder
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = dict(merged_lora_weights(model))
    # the live model untouched (TRL's merge_adapter + unmerge_adapter leave float round-off in the base)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    trl_self = SimpleNamespace(model=model, _dist=SimpleNamespace(gather_params=lambda params: nullcontext(),
                                                                  is_fsdp=False))
    trl_self._fix_param_name_to_vllm = lambda name, extra_prefixes=None: VLLMGeneration._fix_param_name_to_vllm(
        trl_self, name, extra_prefixes)
    trl = {n: t.clone() for n, t in VLLMGeneration._iter_named_params(trl_self)}  # merge, walk, unmerge
    assert ours and set(ours) < set(trl)  # only the LoRA modules, under TRL's names
    assert all(n.startswith("model.language_model.layers.") and n.endswith("_proj.weight") for n in ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, trl[name], rtol=0, atol=1e-6)
        assert not torch.equal(tensor, model.get_parameter(f"base_model.model.{name[:-len('.weight')]}.base_layer.weight"))
    assert vllm_param_name("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") is None


def test_base_with_the_pushed_weights_is_the_adapted_model(peft_encoder, inputs):
    """The server holds the base checkpoint and loads the pushed tensors by checkpoint name: that model
    is the learner's policy. Every name is one of the checkpoint's, and lands in vLLM's Qwen2.5-VL
    modules under its hf_to_vllm_mapper prefixes."""
    enc, model = peft_encoder
    base = build_tiny_encoder(VOCABULARY, image_size=32, seed=0).model.eval()  # what the server loaded
    pushed = dict(merged_lora_weights(model))
    assert set(pushed) <= set(base.state_dict())
    vllm_prefixes = ("model.language_model.", "model.visual.", "lm_head.")  # vLLM Qwen2_5_VL hf_to_vllm_mapper
    assert all(n.startswith(vllm_prefixes) for n in pushed)
    _, unexpected = base.load_state_dict(pushed, strict=False)
    assert not unexpected
    with torch.no_grad():
        want = model(**inputs).logits
        got = base(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------
def test_server_fields_default_to_trl():
    c = Recipe.model_validate({}).rollout.caption
    assert (c.vllm_server_base_url, c.vllm_server_host, c.vllm_server_port, c.vllm_server_timeout,
            c.vllm_group_port) == (None, "0.0.0.0", 8000, 240.0, 51216)  # TRL 1.16 GRPOConfig defaults


def test_server_backend_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="rollout_workers"):
        Recipe.model_validate({"rollout": {"caption": {"backend": "vllm_server"}},
                               "resources": {"rollout_workers": 2}})
    with pytest.raises(ValueError, match="adapter.kind must be lora"):
        Recipe.model_validate({"rollout": {"caption": {"backend": "vllm_server"}},
                               "models": {"encoder": {"adapter": {"kind": "lokr"}}}})
    if vllm_available():
        pytest.skip("vLLM is usable here, so the recipe is accepted")
    path = tmp_path / "recipe.yaml"
    path.write_text("rollout:\n  caption:\n    backend: vllm_server\n    vllm_server_host: 10.0.0.2\n")
    with pytest.raises(RecipeError, match=r"rollout\.caption\.backend.*vllm_server") as err:
        load_recipe(path)
    assert "VLLMClient" in str(err.value) and "hf" in str(err.value)
