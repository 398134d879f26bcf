"""`lean_generate` (rollouts/captions.py) against transformers' own `generate`, on the tiny random
Qwen2.5-VL with a moved LoRA adapter (the peft model the rollouts sample from): the same tokens, greedy
and sampled from the same seed (the prefill on the b prompts, once per image), with every sampling filter the caption config has, an early EOS (a
frequent token as EOS, so rows finish at different steps and get padding) and a left-padded prompt
(the attention-mask path)."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from rl import adapters
from rl.config import Recipe
from rl.models.unified import build_models
from rl.shapes import generate_shapes
from rollouts.captions import generate_captions, image_features, lean_generate


@pytest.fixture(scope="module")
def encoder():
    recipe = Recipe.model_validate({"device": "cpu", "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}}})
    enc = build_models(recipe).encoder
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters.adapter_parameters(enc.model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    enc.model.eval()
    return enc


@pytest.fixture(scope="module")
def inputs(encoder):
    images = [r.image for r in generate_shapes(2, seed=3)]
    call = encoder.prepare(images)
    feats = image_features(encoder.model, call.pop("pixel_values"), call["image_grid_thw"])
    return call, feats


def image_outputs(feats):
    """A fresh mm_encoder_outputs: generate expands the one it is given in place."""
    return {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}


def both(encoder, call, feats, seed, **settings):
    settings.setdefault("num_return_sequences", 3 if settings.get("do_sample") else 1)  # greedy: HF allows 1
    settings = dict(max_new_tokens=10, pad_token_id=encoder.pad_token_id,
                    suppress_tokens=encoder.suppressed_ids, **settings)
    settings.setdefault("eos_token_id", encoder.eos_token_id)
    torch.manual_seed(seed)
    hf = encoder.model.generate(**call, mm_encoder_outputs=image_outputs(feats), **settings)[:, call["input_ids"].shape[1]:]
    torch.manual_seed(seed)
    lean = lean_generate(encoder.model, call, image_outputs(feats), **settings)
    return hf, lean


@pytest.mark.parametrize("settings", [
    dict(do_sample=False),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, temperature=1.3, top_k=7, top_p=0.8, min_p=0.02, repetition_penalty=1.3),
], ids=["greedy", "sampled", "filters"])
def test_lean_generate_gives_generates_tokens(encoder, inputs, settings):
    call, embeds = inputs
    hf, lean = both(encoder, call, embeds, seed=5, **settings)
    assert hf.shape == (2 * (3 if settings["do_sample"] else 1), 10)
    assert torch.equal(lean, hf)


def test_early_eos_and_padded_prompt(encoder, inputs):
    call, embeds = inputs
    # A frequent token as EOS: rows stop at different steps, the loop ends before max_new_tokens
    hf, _ = both(encoder, call, embeds, seed=1, do_sample=True)
    eos = int(torch.mode(hf.flatten()).values)
    hf, lean = both(encoder, call, embeds, seed=1, do_sample=True, eos_token_id=eos)
    assert torch.equal(lean, hf)
    assert (hf == encoder.pad_token_id).any() and (hf == eos).any()
    # Left padding: the mask is kept and extended, positions come from it
    pad = {"input_ids": torch.tensor([[encoder.pad_token_id], [hf[0, 0]]]), "attention_mask": torch.tensor([[0], [1]])}
    padded = {k: torch.cat([pad[k], v], dim=1) if k in pad else v for k, v in call.items()}
    if "mm_token_type_ids" in call:
        padded["mm_token_type_ids"] = torch.cat([torch.zeros_like(pad["input_ids"]), call["mm_token_type_ids"]], dim=1)
    hf, lean = both(encoder, padded, embeds, seed=2, do_sample=True, temperature=0.9)
    assert torch.equal(lean, hf)


def test_generate_captions_loops_agree(encoder):
    images = [r.image for r in generate_shapes(2, seed=4)]
    kw = dict(max_new_tokens=8, temperature=0.8, seed=3, score=False)
    a = generate_captions(encoder, images, 2, loop="lean", **kw)
    b = generate_captions(encoder, images, 2, loop="hf", **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.captions == b.captions
