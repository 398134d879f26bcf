"""The warm-up stage (UAE sec. 2.2, rl/warmup.py) through the real DeepSpeed learner on the tiny
models, its caption cache, and the recipe rules around it (data.source null, warmup fields)."""

import pytest
import torch

from rl.config import Recipe, RecipeError, load_recipe
from rl.learner import Learner
from rl.shapes import generate_shapes
from rl.warmup import CaptionCache, cache_dir, caption_key, cached_captions, warmup_noise
from rollouts.actors import RolloutWorker

TINY = "recipes/tiny.yaml"


def warmup_recipe(tmp_path, **warmup) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 4, "group_size": 2, "caption": {"max_new_tokens": 8}},
        "schedule": {"warmup_steps": 2, "cold_start_steps": 0, "phases": [{"stage": "encoder", "steps": 1}]},
        "warmup": {"connector_lr": 1e-2, "decoder_lr": 1e-2, "cache_dir": str(tmp_path), **warmup},
        "output": {"dir": str(tmp_path / "run")},
    })


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warmup")
    recipe = warmup_recipe(tmp, train_decoder_lora=True)
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)
    records = generate_shapes(4, seed=3)
    images, ids = [r.image for r in records], [r.image_id for r in records]
    captions = worker.warmup_captions(images, seed=0)
    return recipe, learner, images, ids, captions


def grads(learner: Learner, images, captions, seeds) -> dict[str, torch.Tensor]:
    """train_warmup's accumulated gradient, with the optimizer step replaced by a grab."""
    module, grabbed = learner.engine.module, {}
    real = learner.engine.step

    def grab():
        for n, p in module.named_parameters():
            if p.grad is not None:
                grabbed[n] = p.grad.detach().clone()
                p.grad = None

    learner.engine.step = grab
    try:
        stats = learner.train_warmup(images, captions, seeds)
    finally:
        learner.engine.step = real
    return grabbed, stats


def test_stage_order_and_fields():
    r = load_recipe(TINY, ["pretrain.enabled=false", "schedule.warmup_steps=2"])
    assert r.stages()[:3] == ["warmup", "warmup", "cold_start"]
    with pytest.raises(RecipeError, match="warmup.max_new_tokens"):
        load_recipe(TINY, ["pretrain.enabled=false", "warmup.max_new_tokens=49"])  # caption max_new_tokens 48


def test_data_source_null_only_with_tiny_models():
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, ["pretrain.enabled=false", "models.encoder.name=Qwen/Qwen2.5-VL-3B-Instruct"])
    assert "data.source" in str(e.value) and "models.encoder.name" in str(e.value)
    # random weights of the published architecture: the dry run's shapes world is fine
    r = load_recipe("recipes/unified_grpo_dryrun.yaml")
    assert r.data.source is None and r.stages()[0] == "warmup"


def test_micro_batches_give_the_full_batch_gradient_and_only_connector_and_decoder_lora_train(setup):
    recipe, learner, images, ids, captions = setup
    seeds = list(range(len(images)))
    full, stats = grads(learner, images, captions, seeds)
    recipe.learner.micro_batch_size = 1
    try:
        micro, stats_micro = grads(learner, images, captions, seeds)
    finally:
        recipe.learner.micro_batch_size = None
    assert stats["loss"] == pytest.approx(stats_micro["loss"], rel=1e-5)
    assert stats["losses"] == pytest.approx(stats_micro["losses"], rel=1e-5)
    assert set(full) == set(micro)
    assert any(n.startswith("connector.") for n in full) and any("lora" in n for n in full if n.startswith("decoder."))
    assert not any(n.startswith("encoder.") for n in full), "the encoder is frozen in the warm-up"
    for n in full:
        assert torch.allclose(full[n], micro[n], rtol=1e-4, atol=1e-6 * (1 + full[n].abs().max())), n
    before = learner.trainable_state()
    learner.train_warmup(images, captions, seeds)
    after = learner.trainable_state()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"connector", "decoder"}


def test_the_decoder_lora_stays_put_unless_asked(tmp_path):
    recipe = warmup_recipe(tmp_path)  # train_decoder_lora false
    learner = Learner(recipe)
    records = generate_shapes(4, seed=5)
    before = learner.trainable_state()
    learner.train_warmup([r.image for r in records], [r.captions["full"] for r in records], [1, 2, 3, 4])
    after = learner.trainable_state()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"connector"}


def test_noise_is_per_image_and_the_warmup_captions_are_greedy_and_frozen(setup):
    recipe, learner, images, ids, captions = setup
    u, eps = warmup_noise([7, 8], (4, 2, 2))
    u1, eps1 = warmup_noise([8], (4, 2, 2))
    assert torch.equal(u[1:], u1) and torch.equal(eps[1:], eps1)
    worker = RolloutWorker(recipe, models=learner.models)
    assert worker.warmup_captions(images, seed=123) == captions  # greedy: the seed does not matter


def test_caption_cache_captions_each_image_once(tmp_path):
    cache = CaptionCache(tmp_path / "c")
    calls = []

    def caption(images):
        calls.append(list(images))
        return [f"a caption of {x}" for x in images]

    out, new = cached_captions(cache, ["a", "b"], ["A", "B"], caption)
    assert out == ["a caption of A", "a caption of B"] and new == 2
    out, new = cached_captions(cache, ["b", "c", "a"], ["B", "C", "A"], caption)
    assert out == ["a caption of B", "a caption of C", "a caption of A"] and new == 1
    assert calls == [["A", "B"], ["C"]] and len(cache) == 3


def test_cache_key_follows_the_encoder_identity(tmp_path):
    a = warmup_recipe(tmp_path)
    b = warmup_recipe(tmp_path)
    assert caption_key(a) == caption_key(b) and cache_dir(a) == cache_dir(b)
    b.models.encoder.num_layers = 3
    assert caption_key(a) != caption_key(b)
    c = warmup_recipe(tmp_path, max_new_tokens=4)
    assert caption_key(a) != caption_key(c)
    a.models.encoder.adapter.r = 16  # the adapter is off when captioning: same captions
    assert caption_key(a) == caption_key(warmup_recipe(tmp_path))


@pytest.mark.parametrize("zero", [3])
def test_the_warmup_step_is_the_same_at_every_zero_stage(tmp_path, zero):
    """Two warm-up steps at ZeRO 0 and at ZeRO `zero` (fp32, micro-batches of 2) end with the same
    connector and decoder LoRA (1e-5)."""
    records = generate_shapes(4, seed=7)
    images, captions = [r.image for r in records], [r.captions["full"] for r in records]
    out = []
    for stage in (0, zero):
        r = warmup_recipe(tmp_path, train_decoder_lora=True)
        r.learner.zero_stage, r.learner.micro_batch_size = stage, 2
        torch.manual_seed(0)
        learner = Learner(r)
        for step in range(2):
            learner.train_warmup(images, captions, [10 * step + i for i in range(4)])
        out.append({k: v.float() for k, v in learner.trainable_state().items()})
    assert out[0].keys() == out[1].keys()
    for k in out[0]:
        assert torch.allclose(out[0][k], out[1][k], atol=1e-5, rtol=1e-4), k
