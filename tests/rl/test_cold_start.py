"""Stage 1 (UAE eq. 3) through the real DeepSpeed learner on the tiny models (no Ray here).

What the cold start promises: gradient reaches the encoder LoRA, the connector and the decoder
LoRA and nothing else; the last K denoising steps carry gradient and the earlier ones do not;
activation checkpointing changes memory, not the gradient.
"""

import pytest
import torch

from rl.config import Recipe
from rl.learner import Learner
from rl.shapes import generate_shapes
from rollouts.actors import RolloutWorker, image_seed

RENDER_STEPS = 4


def cold_start_recipe(reader: str = "policy") -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}},
                   "connector": {"layers": "learned", "reader": reader}},
        "rollout": {"batch_size": 2, "group_size": 2, "caption": {"max_new_tokens": 8},
                    "trajectory": {"num_steps": RENDER_STEPS, "render_steps": RENDER_STEPS, "sde_window": 2}},
        "cold_start": {"lr": 1e-2, "grad_steps": 1},
    })


def build(recipe: Recipe):
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)
    records = generate_shapes(2, seed=1)
    images, ids = [r.image for r in records], [r.image_id for r in records]
    group = worker.cold_start_rollout(images, seed=0)
    args = (images, ids, group.completion_ids, group.completion_mask, [image_seed(i) for i in ids])
    return learner, args


@pytest.fixture(scope="module")
def setup():
    return build(cold_start_recipe())


def grads_of_one_step(learner: Learner, args) -> dict[str, torch.Tensor | None]:
    """Run train_cold_start with the optimiser step replaced by a grab of every .grad (so the
    weights do not move and the step can be repeated): {parameter name: grad or None}."""
    module = learner.engine.module
    grabbed: dict[str, torch.Tensor | None] = {}
    real_step = learner.engine.step

    def grab():
        for n, p in module.named_parameters():
            grabbed[n] = None if p.grad is None else p.grad.detach().clone()
            p.grad = None

    learner.engine.step = grab
    try:
        learner.train_cold_start(*args)
    finally:
        learner.engine.step = real_step
    return grabbed


def test_gradient_reaches_all_three_groups_and_nothing_frozen(setup):
    learner, args = setup
    grads = grads_of_one_step(learner, args)
    models = learner.models
    trainable = {id(p): g for g in ("encoder", "connector", "decoder") for p in models.parameters(g)}
    names = {id(p): n for n, p in learner.engine.module.named_parameters()}
    norm = {g: 0.0 for g in ("encoder", "connector", "decoder")}
    for n, p in learner.engine.module.named_parameters():
        if id(p) in trainable:
            assert grads[n] is not None, f"no gradient on trainable {n}"
            norm[trainable[id(p)]] += float(grads[n].pow(2).sum())
        else:  # vision tower, base weights of both models
            assert grads[n] is None or not grads[n].any(), f"gradient on frozen {n}"
    assert all(v > 0 for v in norm.values()), norm
    # Every connector tensor gets signal, and every LoRA B of both models. (LoRA B starts at zero
    # on both sides, so dL/dA = B^T dL/dy = 0 on the first step: A moves from the second step on.)
    for p in models.parameters("connector"):
        assert grads[names[id(p)]].abs().sum() > 0, names[id(p)]
    last = len(models.decoder.transformer.transformer_blocks) - 1
    # ... except the last SD3 block's text queries: that block is context_pre_only, its text-stream
    # output is dropped, so add_q_proj there is off the loss path by construction.
    dead = f"decoder.transformer_blocks.{last}.attn.add_q_proj."
    for n, p in learner.engine.module.named_parameters():
        if "lora_B" in n and not n.startswith(dead):
            assert grads[n].abs().sum() > 0, n
    # The vision tower is not even on the path (caption re-read as text): no gradient at all.
    assert all(g is None for n, g in grads.items() if "visual" in n)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_controls_how_many_denoising_steps_carry_gradient(setup, k):
    learner, args = setup
    learner.recipe.cold_start.grad_steps = k
    calls: list[bool] = []  # one entry per transformer forward: was autograd recording?
    handle = learner.models.decoder.transformer.register_forward_hook(
        lambda mod, inp, out: calls.append(torch.is_grad_enabled()))
    try:
        grads_of_one_step(learner, args)
    finally:
        handle.remove()
        learner.recipe.cold_start.grad_steps = 1
    assert len(calls) == RENDER_STEPS  # one forward per step (no CFG here)
    assert calls == [False] * (RENDER_STEPS - k) + [True] * k  # exactly the last K steps


def test_activation_checkpointing_same_gradient_recomputed_blocks(setup):
    learner, args = setup
    learner.recipe.cold_start.grad_steps = 2
    block = learner.models.decoder.transformer.transformer_blocks[0]
    layer = learner.models.encoder.model.get_base_model().model.language_model.layers[0]
    counts = {"block": 0, "layer": 0}
    # Pre-hooks on submodules: the recompute stops early (no post-hook) and HF checkpoints the
    # layer's forward, not its __call__ (no hook on the layer itself).
    hooks = [block.attn.register_forward_pre_hook(lambda *a: counts.__setitem__("block", counts["block"] + 1)),
             layer.self_attn.register_forward_pre_hook(lambda *a: counts.__setitem__("layer", counts["layer"] + 1))]
    try:
        plain = grads_of_one_step(learner, args)
        plain_counts = dict(counts)
        learner.recipe.cold_start.activation_checkpointing = True
        learner._stage = None  # re-enter the stage so the switch takes effect
        counts.update(block=0, layer=0)
        ckpt = grads_of_one_step(learner, args)
    finally:
        for h in hooks:
            h.remove()
        learner.recipe.cold_start.activation_checkpointing = False
        learner.recipe.cold_start.grad_steps = 1
        learner._stage = None
    # Without: one block forward per step, one encoder pass. With: the 2 grad steps' blocks and
    # the encoder layer run again in backward.
    assert plain_counts == {"block": RENDER_STEPS, "layer": 1}
    assert counts == {"block": RENDER_STEPS + 2, "layer": 2}
    for n, g in plain.items():
        if g is None:
            assert ckpt[n] is None, n
        else:
            assert torch.allclose(g, ckpt[n], rtol=1e-4, atol=1e-7), n
    learner._set_stage("cold_start")
    assert not learner.models.decoder.transformer.gradient_checkpointing


def test_base_reader_trains_connector_and_decoder_only():
    learner, args = build(cold_start_recipe(reader="base"))
    grads = grads_of_one_step(learner, args)
    names = {id(p): n for n, p in learner.engine.module.named_parameters()}
    norm = {g: sum(float(grads[names[id(p)]].pow(2).sum()) for p in learner.models.parameters(g)
                   if grads[names[id(p)]] is not None)
            for g in ("encoder", "connector", "decoder")}
    # The caption is sampled without gradient and re-read with the adapter off: nothing reaches
    # the encoder adapter, while the reconstruction loss still trains the other two groups.
    assert norm["encoder"] == 0.0 and norm["connector"] > 0 and norm["decoder"] > 0, norm
