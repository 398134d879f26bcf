"""On-policy encoder rollouts skip their scoring forward (issue 16, speed), as TRL's GRPOTrainer
skips old_per_token_logps: the learner's own first pass is pi_old.

- skipped and scored rollouts give the same captions, and the learner the same loss, gradient
  norm and updated weights, bit for bit;
- with grpo.num_iterations 2, training on the rollout's scored log-probs as pi_old (the stale path)
  matches the skip path within float round-off: the first pass runs on the rollout's weights;
- only async rollouts score; a stale group that skipped scoring is refused by the learner.
"""

import pytest
import torch

from rl import grpo
from rl.config import Recipe
from rl.learner import Learner
from rl.shapes import generate_shapes
from rollouts.actors import RolloutWorker, rollouts_may_be_stale


def recipe_for(num_iterations: int = 1, async_rollouts: int = 0) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu", "seed": 3,
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": 2, "micro_batch_size": 2, "caption": {"max_new_tokens": 8}},
        "grpo": {"encoder": {"lr": 1e-2, "beta": 0.04}, "num_iterations": num_iterations},
        "learner": {"micro_batch_size": 2},
        "resources": {"async_rollouts": async_rollouts},
    })


def encoder_params(learner: Learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.models.parameters("encoder")]


def step(recipe: Recipe, score: bool, stale_old_logp: bool = False):
    """A fresh learner (same seed, same weights) and its colocated worker: one encoder rollout and
    one update. stale_old_logp: mark the group one version old, so the learner takes the rollout's
    log-probs as pi_old (the path TRL takes with old_per_token_logps)."""
    torch.manual_seed(recipe.seed)
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)
    worker.version = learner.version
    records = generate_shapes(2, seed=5)
    images = [r.image for r in records]
    group = worker.captions(images, recipe.rollout.group_size, seed=11, score=score)
    if stale_old_logp:
        group = group._replace(version=learner.version - 1)
    rewards = torch.arange(len(group.captions), dtype=torch.float32) % recipe.rollout.group_size
    adv = grpo.group_advantages(rewards, recipe.rollout.group_size)
    stats = learner.train_encoder(group, adv.advantages, adv.valid)
    return group, stats, encoder_params(learner)


def test_skipped_scoring_trains_exactly_as_scored_on_policy():
    recipe = recipe_for()
    assert not rollouts_may_be_stale(recipe)
    scored, s_stats, s_params = step(recipe, score=True)
    skipped, k_stats, k_params = step(recipe, score=False)
    assert scored.logprobs is not None and skipped.logprobs is None
    assert torch.equal(scored.completion_ids, skipped.completion_ids)  # scoring draws no random numbers
    assert torch.equal(scored.completion_mask, skipped.completion_mask)
    assert s_stats["stale_rollout"] == k_stats["stale_rollout"] == 0.0
    for key in ("loss", "grad_norm", "kl", "ratio_mean", "clip_frac"):
        assert s_stats[key] == k_stats[key], key
    assert k_stats["grad_norm"] > 0
    assert all(torch.equal(a, b) for a, b in zip(s_params, k_params))


def test_first_pass_equals_rollout_scores_over_iterations():
    """TRL scores with num_iterations > 1 because its later micro-batches follow optimizer steps; ours
    run all of iteration 0 before the first step, so the first pass is the rollout's pi_old."""
    recipe = recipe_for(num_iterations=2)
    assert not rollouts_may_be_stale(recipe)
    _, old_stats, old_params = step(recipe, score=True, stale_old_logp=True)  # pi_old = rollout scores
    _, new_stats, new_params = step(recipe, score=False)  # pi_old = first pass
    assert old_stats["stale_rollout"] == 1.0 and new_stats["stale_rollout"] == 0.0
    assert new_stats["ratio_mean"] == 1.0
    assert old_stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert old_stats["loss"] == pytest.approx(new_stats["loss"], abs=1e-6)
    for a, b in zip(old_params, new_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_async_rollouts_score_and_a_stale_unscored_group_is_refused():
    recipe = recipe_for(async_rollouts=1)
    assert rollouts_may_be_stale(recipe)
    torch.manual_seed(recipe.seed)
    learner = Learner(recipe_for())
    worker = RolloutWorker(recipe, models=learner.models)
    records = generate_shapes(2, seed=5)
    images, ids = [r.image for r in records], [r.image_id for r in records]
    group, renders = worker.encoder_rollout(images, ids, seed=1, render=False)
    assert renders is None and group.logprobs is not None and torch.isfinite(group.logprobs).all()
    # every other rollout never reads log-probs: not scored
    assert worker.cold_start_rollout(images, seed=0).logprobs is None
    unscored = group._replace(logprobs=None, version=learner.version - 1)
    adv = grpo.group_advantages(torch.arange(4.0) % 2, 2)
    with pytest.raises(RuntimeError, match="without its log-probs"):
        learner.train_encoder(unscored, adv.advantages, adv.valid)
