"""Qwen2.5-VL sees exactly what its processor returns (issue 16, item 1).

The reference is the standard transformers path: `processor.apply_chat_template` on the caption
messages, `processor(text=..., images=...)`, then `model(**inputs)` / `model.generate(**inputs)`.
Our rollout (`generate_captions`) and learner (`completion_logprobs`) must match it. Dropping
`mm_token_type_ids` silently turns off Qwen2.5-VL's 3-D M-RoPE image positions (get_rope_index),
so the last test checks that our path equals the with-key reference and not the without-key one.

The tiny model's q/k projections are redrawn at std 0.6: at HF's 0.02 init attention is nearly
uniform and positions hardly matter (with/without the key: 0.004 apart in log-prob, same greedy
captions); at 0.6 the log-probs move by far more than float round-off and the greedy captions change.
"""

import pytest
import torch

from rl.models.encoder import build_tiny_encoder
from rl.shapes import VOCABULARY, generate_shapes
from rollouts.captions import (CaptionGroup, completion_logprobs, completion_mask, expand_inputs,
                               generate_captions, shard_group)

G = 2


@pytest.fixture(scope="module")
def encoder():
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in enc.model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.6)
    enc.model.eval()
    return enc


@pytest.fixture(scope="module")
def images(encoder):
    return encoder.resized([r.image for r in generate_shapes(2, seed=3)])


def processor_inputs(encoder, image) -> dict:
    """The standard path for one image: chat template with an image, then the processor."""
    chat = encoder.processor.apply_chat_template(encoder.messages(), add_generation_prompt=True, tokenize=False)
    return dict(encoder.processor(text=[chat], images=[image], return_tensors="pt"))


def with_caption(inputs: dict, caption: torch.Tensor, drop: tuple = ()) -> dict:
    """Prompt inputs (1, P) + caption ids (T,): the processor would type the caption tokens as text (0)."""
    t = caption.shape[0]
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], caption[None]], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, t, dtype=torch.long)], dim=1)
    out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, t, dtype=torch.long)], dim=1)
    return {k: v for k, v in out.items() if k not in drop}


def reference_logprobs(encoder, image, caption: torch.Tensor, drop: tuple = ()) -> torch.Tensor:
    """log_softmax of model(**processor(...)).logits at the caption positions, (T,) float64."""
    inputs = with_caption(processor_inputs(encoder, image), caption, drop)
    t = caption.shape[0]
    with torch.no_grad():
        logits = encoder.model(**inputs).logits[0, -(t + 1):-1].double()  # position P - 1 + i predicts token i
    return logits.log_softmax(-1).gather(-1, caption[:, None])[:, 0]


@pytest.fixture(scope="module")
def group(encoder, images):
    return generate_captions(encoder, images, G, max_new_tokens=8, seed=1)


def test_chat_template_renders_the_project_prompt(encoder):
    rendered = encoder.processor.apply_chat_template(encoder.messages(), add_generation_prompt=True, tokenize=False)
    assert rendered == encoder.prompt_text()


def test_prepare_keeps_every_key_the_processor_returns(encoder, images):
    inputs = encoder.prepare(images)
    raw = encoder.processor(text=[encoder.prompt_text()] * 2, images=images, return_tensors="pt", padding=True)
    assert set(inputs) == set(raw) and "mm_token_type_ids" in inputs
    for k in raw:
        assert torch.equal(inputs[k], raw[k]), k
    # 1 exactly on the image placeholders: the (32 / 4 / 2)^2 = 16 merged patches of each image
    image_id = encoder.model.config.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_id).long())
    assert inputs["mm_token_type_ids"].sum(dim=1).tolist() == [16, 16]


def test_completion_logprobs_equal_the_processor_forward(encoder, images, group):
    assert group.mm_token_type_ids is not None
    with torch.no_grad():
        ours, _ = completion_logprobs(encoder.model, group, 1.0)  # no suppression: the plain model's softmax
    for r in range(group.completion_ids.shape[0]):
        keep = group.completion_mask[r].bool()
        caption = group.completion_ids[r][keep]
        ref = reference_logprobs(encoder, images[r // G], caption)
        torch.testing.assert_close(ours[r][keep].double(), ref, rtol=0, atol=1e-5)


def test_greedy_captions_equal_model_generate(encoder, images):
    ours = generate_captions(encoder, images, 1, max_new_tokens=10, greedy=True)
    kwargs = dict(do_sample=False, max_new_tokens=10, eos_token_id=encoder.eos_token_id,
                  pad_token_id=encoder.pad_token_id, suppress_tokens=encoder.suppressed_ids)
    without_key_differs = False
    for i, image in enumerate(images):
        inputs = processor_inputs(encoder, image)
        with torch.no_grad():
            ids = encoder.model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:]
            plain = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
            without = encoder.model.generate(**plain, **kwargs)[0, inputs["input_ids"].shape[1]:]
        t = ids.shape[0]
        assert torch.equal(ours.completion_ids[i, :t], ids)
        assert (ours.completion_mask[i, t:] == 0).all()
        assert ours.captions[i] == encoder.decode(ids[None], completion_mask(ids[None], encoder.eos_token_id))[0]
        without_key_differs |= not torch.equal(without, ids)
    assert without_key_differs  # so a rollout that drops mm_token_type_ids fails this test


def test_dropping_mm_token_type_ids_changes_the_logprobs(encoder, images, group):
    """Fails if mm_token_type_ids is lost anywhere between the processor and the forward."""
    with torch.no_grad():
        ours, _ = completion_logprobs(encoder.model, group, 1.0)
    caption = group.completion_ids[0][group.completion_mask[0].bool()]
    with_key = reference_logprobs(encoder, images[0], caption)
    without = reference_logprobs(encoder, images[0], caption, drop=("mm_token_type_ids",))
    assert (with_key - without).abs().max() > 1e-2  # positions matter in this model
    mine = ours[0][: caption.shape[0]].double()
    torch.testing.assert_close(mine, with_key, rtol=0, atol=1e-5)
    assert (mine - without).abs().max() > 1e-2


def test_expand_inputs_and_shard_group_carry_mm_token_type_ids():
    # Two images, prompt P = 3 (token 1 is the image's), G = 2 rows each, T = 2 caption tokens.
    grid = torch.tensor([[1, 2, 2], [1, 2, 2]])
    group = CaptionGroup(
        prompt_ids=torch.tensor([[10, 6, 11], [12, 6, 13]]), prompt_mask=torch.ones(2, 3, dtype=torch.long),
        pixel_values=torch.cat([torch.full((4, 3), 1.0), torch.full((4, 3), 2.0)]), image_grid_thw=grid,
        completion_ids=torch.arange(8).view(4, 2), completion_mask=torch.ones(4, 2, dtype=torch.long),
        logprobs=torch.zeros(4, 2), captions=[""] * 4, group_size=2, version=0,
        mm_token_type_ids=torch.tensor([[0, 1, 0], [0, 1, 0]]),
    )
    out = expand_inputs(group, torch.device("cpu"), rows=slice(1, 3))  # a's second row, b's first
    assert torch.equal(out["mm_token_type_ids"], torch.tensor([[0, 1, 0, 0, 0]] * 2))  # caption tokens: text
    shard = shard_group(group, rank=1, world_size=2)  # image b and its rows
    assert torch.equal(shard.mm_token_type_ids, torch.tensor([[0, 1, 0]]))
    assert torch.equal(shard.prompt_ids, torch.tensor([[12, 6, 13]]))
    # A hand-built group without the key leaves it out (1-D text positions), as before.
    assert "mm_token_type_ids" not in expand_inputs(group._replace(mm_token_type_ids=None), torch.device("cpu"))
