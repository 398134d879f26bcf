"""The adapters of rl/adapters.py, KAdapter first (thesis ch. 2 eq. 2.4: dW = sum_i A_i (kron) u_i v_i^T).

Layer-level checks use a bare nn.Linear; model-level checks build the tiny encoder and decoder
through `build_models` (kind kadapter, n=4, r=2) and compare with independently built base models.
"""

import copy

import pytest
import torch
from torch import nn

from rl import adapters
from rl.adapters import KAdapterBank, KAdapterLinear
from rl.config import AdapterConfig, Recipe
from rl.models.decoder import build_decoder
from rl.models.encoder import build_encoder
from rl.models.unified import build_models
from rl.shapes import VOCABULARY


def recipe(kind: str, **adapter) -> Recipe:
    a = {"kind": kind, "r": 2, "alpha": 4, **({"n": 4} if kind != "lora" else {}), **adapter}
    return Recipe.model_validate({"device": "cpu", "models": {"encoder": {"adapter": a}, "decoder": {"adapter": a}}})


def encoder_out(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 15).reshape(2, 6)  # any token ids; (B, T)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def decoder_out(decoder) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(decoder.latent_shape(2), generator=g)
    cond = torch.randn(2, 5, decoder.joint_attention_dim, generator=g)
    pooled = torch.randn(2, decoder.pooled_projection_dim, generator=g)
    return decoder.velocity(latents, torch.tensor([0.3, 0.8]), cond, pooled)


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Move every adapter tensor off its init (v = 0 there), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(module):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def kad():
    r = recipe("kadapter")
    m = build_models(r)
    base_enc = build_encoder("tiny", vocabulary=VOCABULARY, image_size=r.models.encoder.image_size, seed=r.seed,
                             hidden_size=r.models.encoder.hidden_size, num_layers=r.models.encoder.num_layers)
    base_dec = build_decoder("tiny", image_size=r.models.decoder.image_size, shift=r.models.decoder.shift,
                             seed=r.seed + 1)
    with torch.no_grad():
        base = {"encoder": encoder_out(base_enc.model), "decoder": decoder_out(base_dec)}
        init = {"encoder": encoder_out(m.encoder.model), "decoder": decoder_out(m.decoder)}
    randomise(m.encoder.model, 1)
    randomise(m.decoder.transformer, 2)
    return r, m, base, init


def outputs(m) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {"encoder": encoder_out(m.encoder.model), "decoder": decoder_out(m.decoder)}


# ----------------------------------------------------------------------------------------------
# one layer
# ----------------------------------------------------------------------------------------------
def test_delta_weight_is_the_kronecker_sum():
    torch.manual_seed(0)
    layer = KAdapterLinear(nn.Linear(24, 16), n=4, r=2, alpha=3.0, init="random", bank=KAdapterBank(4))
    A, u, v = layer.A, layer.kadapter_u, layer.kadapter_v  # (4, 4, 4), (4, 4, 2), (4, 6, 2)
    direct = sum(torch.kron(A[i], u[i] @ v[i].T) for i in range(4))  # eq. 2.4, (16, 24)
    assert torch.allclose(layer.delta_weight(), direct, atol=1e-6)
    # the forward pass (reshape trick, dW never built) adds scale * x dW^T to the base output
    x = torch.randn(3, 5, 24)
    expected = layer.base_layer(x) + (3.0 / 2) * x @ direct.T  # scale = alpha / r
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_rank_exceeds_lora_of_the_same_parameter_count():
    torch.manual_seed(0)
    d, n, r = 64, 4, 2
    layer = KAdapterLinear(nn.Linear(d, d), n=n, r=r, alpha=1.0, init="random").double()
    per_layer = layer.kadapter_u.numel() + layer.kadapter_v.numel()  # n * r * (d/n + d/n)
    lora_rank = per_layer // (2 * d)  # LoRA B (d, k) A (k, d) with the same count: k = r
    assert lora_rank == r
    lora_delta = torch.randn(d, lora_rank, dtype=torch.float64) @ torch.randn(lora_rank, d, dtype=torch.float64)
    assert torch.linalg.matrix_rank(lora_delta) == r
    # rank(sum_i A_i (kron) B_i) <= sum_i rank(A_i) rank(B_i) = n * n * r = 32, reached generically
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()) == n * n * r


def test_merge_unmerge_and_disable_on_a_layer():
    torch.manual_seed(0)
    layer = KAdapterLinear(nn.Linear(8, 8), n=2, r=1, alpha=1.0, init="random")
    x = torch.randn(4, 8)
    with torch.no_grad():
        base, adapted = layer.base_layer(x).clone(), layer(x)
        layer.merge()
        assert torch.allclose(layer(x), adapted, atol=1e-6)
        with adapters.disabled(layer):  # disabled while merged: dW is taken back out
            assert torch.allclose(layer(x), base, atol=1e-6)
        layer.unmerge()
        assert torch.allclose(layer.base_layer(x), base, atol=1e-6)


def test_n_must_divide_the_layer_dims_and_the_error_names_the_module():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(12, 10))
    cfg = AdapterConfig(kind="kadapter", n=4, r=1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"models.encoder.adapter.n=4 must divide.*'q_proj'.*d_out=10"):
        adapters.apply_adapter(model, cfg, "encoder")


def test_init_must_fit_the_kind():
    with pytest.raises(ValueError, match="init='random' is for kind 'kadapter'"):
        AdapterConfig(kind="lora", init="random")


# ----------------------------------------------------------------------------------------------
# the tiny models, through build_models
# ----------------------------------------------------------------------------------------------
def test_zero_init_equals_the_base_model(kad):
    _, _, base, init = kad
    for policy in ("encoder", "decoder"):
        assert torch.allclose(init[policy], base[policy], atol=1e-6), policy


def test_disabling_gives_the_base_model(kad):
    _, m, base, _ = kad
    out = outputs(m)
    with torch.no_grad(), m.reference("encoder"), m.reference("decoder"):
        ref = outputs(m)
    for policy in ("encoder", "decoder"):
        assert not torch.allclose(out[policy], base[policy], atol=1e-4), policy  # the adapter is live
        assert torch.allclose(ref[policy], base[policy], atol=1e-6), policy


def test_merging_gives_the_unmerged_outputs(kad):
    _, m, _, _ = kad
    before = outputs(m)
    adapters.merge(m.encoder.model)
    adapters.merge(m.decoder.transformer)
    try:
        merged = outputs(m)
    finally:
        adapters.unmerge(m.encoder.model)
        adapters.unmerge(m.decoder.transformer)
    for policy in ("encoder", "decoder"):
        assert torch.allclose(merged[policy], before[policy], atol=1e-5), policy
    # merge_into_base: a plain model (base class, base parameter names), same outputs
    plain = adapters.merge_into_base(copy.deepcopy(m.decoder.transformer))
    assert not any(isinstance(x, KAdapterLinear) for x in plain.modules())
    assert not any("kadapter" in k or "base_layer" in k for k in plain.state_dict())
    dec = copy.copy(m.decoder)
    dec.transformer = plain
    with torch.no_grad():
        assert torch.allclose(decoder_out(dec), before["decoder"], atol=1e-5)


@pytest.mark.parametrize("policy", ["encoder", "decoder"])
def test_shared_A_gets_gradients_from_every_adapted_layer(kad, policy):
    _, m, _, _ = kad
    model = m.encoder.model if policy == "encoder" else m.decoder.transformer
    layers = [x for x in model.modules() if isinstance(x, KAdapterLinear)]
    assert len(layers) == (8 if policy == "encoder" else 15)  # 2 LM layers x 4; 2 SD3 blocks x 8 - 1
    bank = model.kadapter_bank.A
    assert all(layer.A is bank for layer in layers)
    assert sum(p is bank for p in m.parameters(policy)) == 1  # one tensor for the optimizer

    def grad_of_A(only: KAdapterLinear | None) -> torch.Tensor:
        # with every other layer's u zeroed, A's gradient can only come from `only`
        saved = [layer.kadapter_u.detach().clone() for layer in layers]
        with torch.no_grad():
            for layer in layers:
                if only is not None and layer is not only:
                    layer.kadapter_u.zero_()
        bank.grad = None
        out = encoder_out(model) if policy == "encoder" else decoder_out(m.decoder)
        out.pow(2).mean().backward()
        with torch.no_grad():
            for layer, u in zip(layers, saved):
                layer.kadapter_u.copy_(u)
        grad = bank.grad.clone()
        for p in m.parameters(policy):
            p.grad = None
        return grad

    assert grad_of_A(None).abs().sum() > 0
    # A layer whose output never reaches the loss cannot send A a gradient: SD3's last block is
    # context_pre_only, so its context queries (add_q_proj) are computed and dropped. (A LoRA there
    # is dead weight too; Flow-GRPO's target list has it.) Every other layer must contribute.
    names = {id(x): n for n, x in model.named_modules()}
    dead = {names[id(layer)] for layer in layers if grad_of_A(layer).abs().sum() == 0}
    assert dead == (set() if policy == "encoder" else {"transformer_blocks.1.attn.add_q_proj"})


def test_trainable_state_round_trip(kad):
    r, m, _, _ = kad
    state = m.trainable_state()
    assert sum(k.endswith("kadapter_bank.A") for k in state) == 2  # one bank per policy, listed once
    fresh = build_models(r)
    assert not torch.allclose(outputs(fresh)["encoder"], outputs(m)["encoder"], atol=1e-4)
    fresh.load_trainable_state(state)
    for policy, out in outputs(fresh).items():
        assert torch.allclose(out, outputs(m)[policy], atol=1e-5), policy  # merge/unmerge above: W +- 1 ulp


def test_per_layer_slow_weights_when_not_shared():
    cfg = AdapterConfig(kind="kadapter", n=2, r=1, shared=False, target_modules=["a", "b"])
    model = nn.Sequential()
    model.add_module("a", nn.Linear(4, 4))
    model.add_module("b", nn.Linear(4, 4))
    adapters.apply_adapter(model, cfg, "decoder")
    names = [n for n, _ in adapters.named_adapter_parameters(model)]
    assert sorted(n for n in names if n.endswith("kadapter_A")) == ["a.kadapter_A", "b.kadapter_A"]
    assert not hasattr(model, "kadapter_bank")


def test_lokr_builds_starts_at_the_base_and_trains():
    r = recipe("lokr")
    m = build_models(r)
    for policy in ("encoder", "decoder"):
        params = m.parameters(policy)
        assert params and all("lokr_" in n for n in m.trainable_state() if n.startswith(policy))
        model = m.encoder.model if policy == "encoder" else m.decoder.transformer
        before = [p.detach().clone() for p in params]
        with torch.no_grad():
            out0 = encoder_out(model) if policy == "encoder" else decoder_out(m.decoder)
            with m.reference(policy):
                ref = encoder_out(model) if policy == "encoder" else decoder_out(m.decoder)
        assert torch.allclose(out0, ref, atol=1e-6)  # w2 = 0 at init: dW = 0
        opt = torch.optim.SGD(params, lr=1.0)
        for _ in range(2):  # the first step moves w2 only; then everything
            out = encoder_out(model) if policy == "encoder" else decoder_out(m.decoder)
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        assert any(not torch.equal(a, b) for a, b in zip(before, params))
        with torch.no_grad():
            out1 = encoder_out(model) if policy == "encoder" else decoder_out(m.decoder)
            with m.reference(policy):
                ref1 = encoder_out(model) if policy == "encoder" else decoder_out(m.decoder)
        assert not torch.allclose(out1, out0, atol=1e-6)
        assert torch.allclose(ref1, ref, atol=1e-6)


def test_kadapter_export_is_a_plain_merged_model(tmp_path):
    """kadapter leaves the stack merged: the folders load with from_pretrained and give the
    adapted model's outputs (issue 10: export)."""
    from diffusers import SD3Transformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from rl.config import Recipe
    from rl.export import _export_merged_decoder, _export_merged_encoder
    from rl.models.unified import build_models

    recipe = Recipe.model_validate({"device": "cpu", "models": {
        "encoder": {"adapter": {"kind": "kadapter", "r": 2, "n": 4, "init": "random"}},
        "decoder": {"adapter": {"kind": "kadapter", "r": 2, "n": 4, "init": "random"}}}})
    models = build_models(recipe, torch.device("cpu"))
    ids = torch.randint(10, 40, (2, 5))
    x = torch.randn(models.decoder.latent_shape(2))
    with torch.no_grad():
        cond, mask, pooled = models.condition(ids, torch.ones_like(ids))
        want_dec = models.decoder.velocity(x, torch.full((2,), 0.5), cond, pooled, mask)
        want_enc = models.encoder.model(input_ids=ids).logits
        with models.reference("decoder"):
            base_dec = models.decoder.velocity(x, torch.full((2,), 0.5), cond, pooled, mask)
    assert not torch.allclose(want_dec, base_dec, atol=1e-5)  # the adapter is not a no-op
    _export_merged_encoder(models, str(tmp_path / "encoder"), recipe.rollout.caption.max_new_tokens)
    _export_merged_decoder(models, str(tmp_path / "decoder"))
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "encoder"))
    dec = SD3Transformer2DModel.from_pretrained(str(tmp_path / "decoder"), subfolder="transformer")
    with torch.no_grad():
        got_enc = enc(input_ids=ids).logits
        got_dec = dec(hidden_states=x, timestep=torch.full((2,), 500.0), encoder_hidden_states=cond * mask.unsqueeze(-1),
                      pooled_projections=pooled, return_dict=False)[0]
    assert torch.allclose(got_enc, want_enc, atol=1e-4)
    assert torch.allclose(got_dec, want_dec, atol=1e-4)


def test_peft_switch_is_peft_disable_adapter():
    """`disabled` on a peft LoRA encoder (its cached tuner layers) gives what peft's own
    disable_adapter gives: the base model's outputs inside, the adapted ones after, and the same
    layer flags and requires_grad on the way out, also when called again (the cache) and nested."""
    m = build_models(recipe("lora"))
    model = m.encoder.model
    randomise(model, 3)
    with torch.no_grad():
        adapted = encoder_out(model)
        with model.disable_adapter():
            peft_base = encoder_out(model)
        peft_after = {n: p.requires_grad for n, p in model.named_parameters()}
        for _ in range(2):
            with adapters.disabled(model):
                assert model._adapters_disabled
                ours = encoder_out(model)
                with adapters.disabled(model):  # nested: still the base, and still off when it ends
                    assert torch.equal(encoder_out(model), peft_base)
                assert torch.equal(encoder_out(model), peft_base)
            assert not model._adapters_disabled
            assert torch.equal(ours, peft_base) and not torch.allclose(ours, adapted, atol=1e-4)
            assert torch.equal(encoder_out(model), adapted)
            assert {n: p.requires_grad for n, p in model.named_parameters()} == peft_after
