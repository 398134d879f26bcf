"""The connector (GRAN-TED sec. 2.1 eq. 1, sec. 3.5 eqs. 3-4) and where its dimensions come from."""

import pytest
import torch
import torch.nn.functional as F

from rl.config import Recipe, load_recipe
from rl.models import unified
from rl.models.connector import Connector

H, D, P, L, B, T = 8, 6, 5, 3, 2, 4


def hidden_states(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # embeddings h_0, then layers h_1..h_L with growing norm, as in pre-norm LLMs
    return [torch.randn(B, T, H, generator=g) * (1 + i) + i for i in range(L + 1)]


def make(layers: str, **kw) -> Connector:
    torch.manual_seed(0)  # same projector weights in every mode
    return Connector(hidden_size=H, cond_dim=D, pooled_dim=P, num_layers=L, layers=layers, **kw)


def test_last_is_proj_of_last_hidden_state():
    hs = hidden_states()
    c = make("last")
    cond, pooled = c(hs)
    assert torch.allclose(cond, c.proj(hs[-1]))
    assert cond.shape == (B, T, D) and pooled.shape == (B, P)


def test_norm_avg_equals_direct_computation():
    hs = hidden_states()
    c = make("norm_avg")
    # eq. 1: (1/L) sum_{i=1..L} LayerNorm(h_i), parameter-free, embeddings h_0 left out
    direct = sum(F.layer_norm(h, (H,)) for h in hs[1:]) / L
    cond, _ = c(hs)
    assert torch.allclose(cond, c.proj(direct), atol=1e-6)
    assert not any(n.startswith("norm") for n, _ in c.named_parameters())  # no affine


def test_learned_with_uniform_logits_equals_norm_avg_and_weights_follow_softmax():
    hs = hidden_states()
    learned, norm_avg = make("learned"), make("norm_avg")
    assert torch.allclose(learned(hs)[0], norm_avg(hs)[0], atol=1e-6)
    with torch.no_grad():
        learned.layer_logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    alpha = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0)  # eq. 3
    direct = sum(a * F.layer_norm(h, (H,)) for a, h in zip(alpha, hs[1:]))  # eq. 4
    assert torch.allclose(learned(hs)[0], learned.proj(direct), atol=1e-6)
    assert torch.allclose(learned.layer_weights(), alpha)


def test_pooled_modes():
    hs = hidden_states()
    zeros = make("last", pooled="zeros")
    assert not zeros(hs)[1].any() and "pooled" not in dict(zeros.named_parameters())
    learned = make("last", pooled="learned")
    assert "pooled" in dict(learned.named_parameters())
    mean = make("last", pooled="mean")
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = mean.pooled_proj(torch.stack([hs[-1][0, :2].mean(0), hs[-1][1].mean(0)]))
    assert torch.allclose(mean(hs, mask)[1], expected, atol=1e-6)


def test_wrong_number_of_hidden_states_names_the_fix():
    with pytest.raises(ValueError, match="output_hidden_states"):
        make("norm_avg")(hidden_states()[1:])


def test_learned_weights_freeze_after_steps_through_the_learner():
    from rl.learner import Learner
    from rl.shapes import generate_shapes
    from rollouts.actors import RolloutWorker, image_seed

    recipe = Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 2, "alpha": 4}}, "decoder": {"adapter": {"r": 2, "alpha": 4}},
                   "connector": {"layers": "learned", "freeze_after_steps": 2}},
        "rollout": {"batch_size": 1, "group_size": 2, "caption": {"max_new_tokens": 4},
                    "trajectory": {"num_steps": 2, "render_steps": 2, "sde_window": 1}},
        "cold_start": {"lr": 1e-2, "connector_lr": 5e-2, "grad_steps": 1},
    })
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)
    records = generate_shapes(1, seed=2)
    images, ids = [r.image for r in records], [r.image_id for r in records]
    group = worker.cold_start_rollout(images, seed=0)
    logits = learner.models.connector.layer_logits
    history = [logits.detach().clone()]
    for _ in range(4):
        learner.train_cold_start(images, ids, group.completion_ids, group.completion_mask, [image_seed(i) for i in ids])
        history.append(logits.detach().clone())
        if len(history) == 4:  # a stage switch turns requires_grad back on: the freeze must survive it
            learner._set_stage("encoder")
    changed = [not torch.equal(a, b) for a, b in zip(history, history[1:])]
    assert changed == [True, True, False, False]
    assert not logits.requires_grad and int(learner.models.connector.steps_done) == 4


def test_dims_come_from_the_model_configs_not_the_recipe(monkeypatch):
    """The production recipe (Qwen2.5-VL-3B -> SD3.5) types no widths: build_models reads the
    encoder's hidden size and layer count and the decoder's joint-attention and pooled widths
    from the loaded configs. Stand-in builders return tiny models of odd sizes under hub names."""
    from rl.models.decoder import build_decoder
    from rl.models.encoder import build_encoder

    def fake_encoder(name, **kw):
        assert "hidden_size" not in kw and "num_layers" not in kw, "typed-in dims passed for a hub model"
        return build_encoder("tiny", vocabulary=kw["vocabulary"], image_size=32, hidden_size=48, num_layers=3)

    def fake_decoder(name, **kw):
        return build_decoder("tiny", image_size=32, joint_attention_dim=24)

    monkeypatch.setattr(unified, "build_encoder", fake_encoder)
    monkeypatch.setattr(unified, "build_decoder", fake_decoder)
    recipe = load_recipe("recipes/unified_grpo.yaml", ["device=cpu"])
    assert recipe.models.encoder.name == "Qwen/Qwen2.5-VL-3B-Instruct"
    models = unified.build_models(recipe, torch.device("cpu"))
    c = models.connector
    assert c.proj[0].in_features == 48 and c.num_layers == 3  # encoder config, not recipe's 64 / 2
    assert c.proj[-1].out_features == 24 == models.decoder.joint_attention_dim
    assert c.proj[0].out_features == int(24 * recipe.models.connector.mlp_ratio)


@pytest.mark.parametrize("reader", ["policy", "base"])
def test_reader_decides_whether_the_encoder_adapter_shapes_the_conditioning(reader):
    recipe = Recipe.model_validate({
        "device": "cpu", "models": {"encoder": {"adapter": {"r": 2, "alpha": 4}}, "connector": {"reader": reader}},
    })
    models = unified.build_models(recipe)
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = models.condition(ids, mask)[0]
        for n, p in models.encoder.model.named_parameters():
            if "lora_B" in n:  # move the caption policy as encoder GRPO would
                p.add_(0.5)
        after = models.condition(ids, mask)[0]
        with models.reference("encoder"):
            base = models.condition(ids, mask)[0]
    assert torch.equal(before, base)  # B = 0 at start: both readers agree
    if reader == "base":
        assert torch.equal(after, base)
    else:
        assert not torch.allclose(after, base, atol=1e-4)
