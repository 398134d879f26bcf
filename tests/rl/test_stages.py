"""One step of each stage through the real DeepSpeed learner on the tiny models (no Ray here).

Checks what the algorithm promises: the ratio is exactly 1 on the first update after a rollout,
the reference policy is the base model, and each stage moves only the parameters it trains.
"""

import pytest
import torch

from rl import grpo
from rl.config import Recipe
from rl.learner import Learner
from rl.models.encoder import build_encoder
from rl.shapes import VOCABULARY, generate_shapes
from rollouts.actors import RolloutWorker, image_seed
from rollouts.captions import completion_logprobs


def small_recipe(zero: int = 0) -> Recipe:
    return Recipe.model_validate({
        "learner": {"zero_stage": zero},
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": 3, "caption": {"max_new_tokens": 8},
                    "trajectory": {"num_steps": 4, "render_steps": 4, "sde_window": 2}},
        "grpo": {"encoder": {"lr": 1e-2, "beta": 0.04}, "decoder": {"lr": 1e-2, "beta": 0.04}},
        "cold_start": {"lr": 1e-2, "grad_steps": 1},
    })


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0", "zero2"])
def setup(request):
    """The same checks at ZeRO-0 and at the production recipe's ZeRO-2 (every stage: test_zero.py)."""
    recipe = small_recipe(request.param)
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)  # colocated: same modules
    records = generate_shapes(2, seed=1)
    return recipe, learner, worker, [r.image for r in records], [r.image_id for r in records]


def snapshot(learner: Learner) -> dict[str, dict[str, torch.Tensor]]:
    return {g: {i: p.detach().clone() for i, p in enumerate(learner.models.parameters(g))}
            for g in ("encoder", "decoder", "connector")}


def moved(before, after) -> dict[str, bool]:
    return {g: any(not torch.equal(before[g][i], after[g][i]) for i in before[g]) for g in before}


def rewards_for(n: int, group_size: int) -> torch.Tensor:
    # Distinct rewards inside each group so every group carries signal.
    return torch.arange(n, dtype=torch.float32) % group_size


def test_cold_start_step_moves_all_three_groups(setup):
    recipe, learner, worker, images, ids = setup
    before = snapshot(learner)
    group = worker.cold_start_rollout(images, seed=0)
    stats = learner.train_cold_start(images, ids, group.completion_ids, group.completion_mask,
                                     [image_seed(i) for i in ids])
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert 0.0 <= stats["loss"] <= 2.0  # 1 - cos
    assert moved(before, snapshot(learner)) == {"encoder": True, "decoder": True, "connector": True}


def test_encoder_step_ratio_is_exactly_one_and_only_encoder_moves(setup):
    recipe, learner, worker, images, ids = setup
    worker.version = learner.version
    group, renders = worker.encoder_rollout(images, ids, seed=1)
    assert len(renders) == len(group.captions) == 2 * recipe.rollout.group_size
    adv = grpo.group_advantages(rewards_for(len(group.captions), recipe.rollout.group_size),
                                recipe.rollout.group_size)
    before = snapshot(learner)
    stats = learner.train_encoder(group, adv.advantages, adv.valid)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
    assert stats["stale_rollout"] == 0.0
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert moved(before, snapshot(learner)) == {"encoder": True, "decoder": False, "connector": False}


def test_decoder_step_ratio_is_exactly_one_and_only_decoder_moves(setup):
    recipe, learner, worker, images, ids = setup
    worker.version = learner.version
    traj, captions, renders = worker.decoder_rollout(images, seed=2)
    assert traj.latents.shape[1] == 2  # only the window's steps are stored
    adv = grpo.group_advantages(rewards_for(traj.log_probs.shape[0], recipe.rollout.group_size),
                                recipe.rollout.group_size)
    before = snapshot(learner)
    stats = learner.train_decoder(traj, adv.advantages, adv.valid)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert moved(before, snapshot(learner)) == {"encoder": False, "decoder": True, "connector": False}


def test_stale_rollout_uses_rollout_logprobs(setup):
    """A rollout made with older weights is corrected by the importance ratio (ratio != 1)."""
    recipe, learner, worker, images, ids = setup
    # async rollouts: the worker scores its captions (pi_old), the learner may get them a version late
    async_recipe = recipe.model_copy(update={"resources": recipe.resources.model_copy(update={"async_rollouts": 1})})
    worker = RolloutWorker(async_recipe, models=learner.models)
    assert worker.score_captions
    worker.version = learner.version - 1  # pretend the batch is one version old
    group, _ = worker.encoder_rollout(images, ids, seed=3)
    assert group.logprobs is not None
    # make the rollout log-probs differ from the current policy's
    group = group._replace(logprobs=group.logprobs - 0.1 * group.completion_mask)
    adv = grpo.group_advantages(rewards_for(len(group.captions), recipe.rollout.group_size),
                                recipe.rollout.group_size)
    stats = learner.train_encoder(group, adv.advantages, adv.valid)
    assert stats["stale_rollout"] == 1.0
    assert stats["ratio_mean"] > 1.0


def test_reference_logprobs_equal_the_base_model(setup):
    recipe, learner, worker, images, ids = setup
    # The encoder LoRA has been trained above, so adapter-on differs from the base.
    group = worker.captions(images, 2, seed=4)
    t = recipe.rollout.caption.temperature
    sup = learner.models.encoder.suppressed_ids
    with torch.no_grad():
        policy, _ = completion_logprobs(learner.models.encoder.model, group, t, sup)
        with learner.models.reference("encoder"):
            ref, _ = completion_logprobs(learner.models.encoder.model, group, t, sup)
        base = build_encoder("tiny", vocabulary=VOCABULARY, image_size=recipe.models.encoder.image_size,
                             seed=recipe.seed, hidden_size=recipe.models.encoder.hidden_size,
                             num_layers=recipe.models.encoder.num_layers)
        base_lp, _ = completion_logprobs(base.model, group, t, sup)
    assert torch.allclose(ref, base_lp, atol=1e-6, rtol=0)
    assert not torch.allclose(policy, base_lp, atol=1e-4)
