"""The vision tower once per image, not once per caption copy (issue #16 item 4).

A group holds G captions of each image. `generate_captions`, `completion_logprobs` and
`Learner.train_encoder` give Qwen2.5-VL each image's embeddings once (`mm_encoder_outputs`) and
repeat them for its copies; the reference here is the per-copy path, the full model's forward on
`expand_inputs` (pixel_values repeated G times, as before), and plain `model.generate` on the
processor's pixel_values. Log-probs and gradients must agree to float round-off, sampled captions
exactly. A hook on the vision tower counts the patches it reads.
"""
from __future__ import annotations

import pytest
import torch

from rl.config import Recipe
from rl.learner import Learner
from rl.models.encoder import build_tiny_encoder
from rl.shapes import VOCABULARY, generate_shapes
from rollouts.captions import (ImageFeatures, completion_logprobs, expand_inputs, generate_captions,
                               vision_trainable)

G, B = 3, 2
T = 0.7


@pytest.fixture(scope="module")
def encoder():
    return build_tiny_encoder(VOCABULARY, image_size=32, seed=0)


@pytest.fixture(scope="module")
def images(encoder):
    return encoder.resized([r.image for r in generate_shapes(B, seed=5)])


@pytest.fixture(scope="module")
def group(encoder, images):
    return generate_captions(encoder, images, G, max_new_tokens=8, temperature=T, seed=2)


class PatchCounter:
    """Rows of pixel patches read by the vision tower, per call."""

    def __init__(self, model):
        self.calls: list[int] = []
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft-wrapped or not
        self.handle = base.model.visual.register_forward_hook(lambda m, args, out: self.calls.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def per_copy_logprobs(encoder, group, temperature):
    """The per-copy path: the whole model on every row's own pixels, full logits, log-softmax."""
    t = group.completion_ids.shape[1]
    logits = encoder.model(**expand_inputs(group, torch.device("cpu"))).logits[:, -(t + 1):-1].float()
    logits[..., encoder.suppressed_ids] = torch.finfo(torch.float32).min
    logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, group.completion_ids[..., None])[..., 0]
    return logp.masked_fill(group.completion_mask == 0, 0.0)


def test_logprobs_equal_the_per_copy_path_and_read_each_image_once(encoder, group):
    patches = group.image_grid_thw.prod(dim=1)
    with torch.no_grad():
        ref = per_copy_logprobs(encoder, group, T)
        with PatchCounter(encoder.model) as count:
            ours, _ = completion_logprobs(encoder.model, group, T, encoder.suppressed_ids, chunk=5)
        assert count.calls == [int(patches.sum())]  # B images, not B * G copies
        cached = ImageFeatures(encoder.model, group)
        with PatchCounter(encoder.model) as count:
            first = completion_logprobs(encoder.model, group, T, encoder.suppressed_ids, rows=slice(0, 4),
                                        features=cached)[0]
            second = completion_logprobs(encoder.model, group, T, encoder.suppressed_ids, rows=slice(2, 6),
                                         features=cached)[0]
        # rows 0-3 need images 0 and 1; rows 2-5 find both cached
        assert count.calls == [int(patches.sum())]
    assert (group.completion_mask.sum(1) > 1).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(first, ref[:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(second, ref[2:], rtol=0, atol=1e-5)
    # the rollout's own log-probs come from the same embeddings
    torch.testing.assert_close(group.logprobs, ref, rtol=0, atol=1e-5)


def test_gradient_through_a_trainable_tower_equals_the_per_copy_path(encoder, group):
    # A target list reaching the vision tower (here: its merger made trainable) keeps the per-row
    # gradient: the shared embeddings are repeated, so their gradient sums over the copies.
    model = encoder.model
    merger = list(model.model.visual.merger.parameters())
    lm = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert vision_trainable(model)  # a bare model: everything trainable
    model.requires_grad_(False)
    assert not vision_trainable(model)
    model.model.visual.merger.requires_grad_(True)
    lm.requires_grad_(True)
    try:
        assert vision_trainable(model)
        grads = []
        for fn in (lambda: per_copy_logprobs(encoder, group, T),
                   lambda: completion_logprobs(model, group, T, encoder.suppressed_ids, chunk=4)[0]):
            model.zero_grad(set_to_none=True)
            (fn() * torch.linspace(-1, 1, group.completion_ids.numel()).view_as(group.logprobs)).sum().backward()
            grads.append([p.grad.clone() for p in [*merger, lm]])
    finally:
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    for ref, ours in zip(*grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("micro_batch_size", [None, G])
def test_generation_reads_each_image_once_and_samples_as_model_generate(encoder, images, micro_batch_size):
    with PatchCounter(encoder.model) as count:
        ours = generate_captions(encoder, images, G, max_new_tokens=8, temperature=T, seed=4,
                                 micro_batch_size=micro_batch_size)
    inputs = encoder.prepare(images)
    per_image = inputs["image_grid_thw"].prod(dim=1).tolist()
    # one vision pass per generate call, covering its images; the log-probs reuse it
    assert count.calls == ([sum(per_image)] if micro_batch_size is None else per_image)
    # the same draws as generate() on the processor's pixel_values, call by call
    torch.manual_seed(4)
    patches = torch.split(inputs["pixel_values"], per_image)
    calls = [range(B)] if micro_batch_size is None else [[i] for i in range(B)]
    rows = []
    with torch.no_grad():
        for imgs in calls:
            call = {k: v[list(imgs)] for k, v in inputs.items() if k != "pixel_values"}
            out = encoder.model.generate(**call, pixel_values=torch.cat([patches[i] for i in imgs]), do_sample=True,
                                         temperature=T, top_p=1.0, top_k=None, min_p=None,
                                         repetition_penalty=1.0, max_new_tokens=8, num_return_sequences=G,
                                         eos_token_id=encoder.eos_token_id, pad_token_id=encoder.pad_token_id,
                                         suppress_tokens=encoder.suppressed_ids)
            rows += out[:, inputs["input_ids"].shape[1]:].tolist()
    for r, ids in enumerate(rows):
        n = int(ours.completion_mask[r].sum())
        assert ours.completion_ids[r, :n].tolist() == ids[:n]


def test_learner_reads_each_image_once_per_update():
    recipe = Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": B, "group_size": G, "caption": {"max_new_tokens": 6}},
        "learner": {"micro_batch_size": 2},
        "grpo": {"encoder": {"lr": 1e-3, "beta": 0.04}, "num_iterations": 2},
    })
    learner = Learner(recipe)
    enc = learner.models.encoder
    group = generate_captions(enc, [r.image for r in generate_shapes(B, seed=6)], G, max_new_tokens=6, seed=1)
    adv = torch.linspace(-1, 1, B * G)
    with PatchCounter(enc.model) as count:
        stats = learner.train_encoder(group, adv, torch.ones(B * G, dtype=torch.bool))
    # reference pass + 2 iterations x 3 micro-batches of 2 rows: the per-copy path read 3 x B x G images
    assert sum(count.calls) == int(group.image_grid_thw.prod(dim=1).sum())
    assert stats["version"] == 2 and torch.isfinite(torch.tensor(stats["loss"]))


def test_rollout_never_forms_prompt_wide_vocabulary_logits(encoder, images):
    # generate() asks for the last position's logits only (logits_to_keep=1: the prompt's P positions
    # never reach lm_head); the scoring pass runs lm_head on at most logits_chunk caption positions.
    shapes = []
    handle = encoder.model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        group = generate_captions(encoder, images, G, max_new_tokens=8, temperature=T, seed=4, logits_chunk=5)
    finally:
        handle.remove()
    vocab = encoder.model.config.text_config.vocab_size
    steps = [s for s in shapes if len(s) == 3]  # generation: (rows, 1, V)
    scoring = [s for s in shapes if len(s) == 2]  # scoring: (<= chunk, V)
    assert steps and all(s[1] == 1 and s[2] == vocab for s in steps)
    assert scoring and all(s[0] <= 5 for s in scoring)
    assert sum(s[0] for s in scoring) == group.completion_ids.numel()


def test_cached_positions_give_the_forwards_own_logprobs():
    """ImageFeatures computes the group's M-RoPE positions once (get_rope_index over all N rows) and
    slices them per micro-batch: the log-probs of any rows equal the forward's own computation."""
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    enc.model.eval()
    group = generate_captions(enc, [r.image for r in generate_shapes(B, seed=6)], G, max_new_tokens=6, seed=1,
                              score=False)
    feats = ImageFeatures(enc.model, group)
    body = enc.model.model
    calls = []
    real = body.get_rope_index
    body.get_rope_index = lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
    try:
        with torch.no_grad():
            for rows in (slice(0, 2), slice(2, 5), None):
                cached, _ = completion_logprobs(enc.model, group, T, enc.suppressed_ids, rows=rows, features=feats)
                own, _ = completion_logprobs(enc.model, group, T, enc.suppressed_ids, rows=rows)
                assert torch.equal(cached, own)
    finally:
        del body.get_rope_index
    n = B * G
    assert calls == [n, 2, 3, n]  # cached: once for all N rows; the forward's own: once per call
