"""Tests for rollouts/trajectories.py and the decoder side of the learner (issue 3).

What the decoder GRPO promises: stored log-probs are the Gaussian density of the sampled step;
the ratio is exactly 1 before the first update; only the chosen steps (window or random subset)
are stochastic and trained; classifier-free guidance is one batched pass equal to two separate
ones; the KL to the adapter-disabled reference is 0 at init and positive after an update; the
EMA follows its formula; evaluation renders with `eval_steps`. Tiny models, CPU, a few seconds each.
"""

import random

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

import rollouts.actors as actors
import rollouts.trajectories as trajectories
from rl.config import Recipe, RecipeError, load_recipe
from rl.ema import EMA, ema_decay_at, weights_swapped
from rl.learner import Learner
from rl.shapes import generate_shapes
from rollouts.sde import shifted_sigmas
from rollouts.trajectories import (
    Uncond,
    choose_steps,
    denoise,
    guided_velocity,
    initial_noise,
    render,
    sample_trajectories,
    step_logprobs,
)

NUM_STEPS, GROUP, A = 6, 3, 0.7


def small_recipe(**trajectory) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": GROUP, "caption": {"max_new_tokens": 8},
                    "trajectory": {"num_steps": NUM_STEPS, "eval_steps": 9, "render_steps": 4,
                                   "noise_level": A, **trajectory}},
        "grpo": {"decoder": {"lr": 1e-2, "beta": 0.04, "ema_decay": 0.5}},
    })


@pytest.fixture
def learner() -> Learner:
    """A fresh learner (its decoder LoRA has B = 0, so the policy equals the reference)."""
    return Learner(small_recipe())


def conditions(models, b: int = 2):
    """(cond (b, L, D), mask (b, L), pooled (b, P)) for b fixed captions, and the empty-caption Uncond."""
    ids = torch.randint(10, 60, (b, 5), generator=torch.Generator().manual_seed(0))
    ids[1, 3:] = models.encoder.pad_token_id  # a shorter second caption: padding is exercised
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    with torch.no_grad():
        cond, cmask, pooled = models.condition(ids, mask)
        empty = torch.zeros((1, 0), dtype=torch.long)
        uncond = Uncond(*models.condition(empty, empty))
    return cond, cmask, pooled, uncond


def distinct_advantages(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) % GROUP) - 1.0  # -1, 0, 1 in every group


# ----------------------------------------------------------------------------------------------
# which steps are stochastic and trained
# ----------------------------------------------------------------------------------------------
def test_choose_steps_window_fraction_and_all():
    rng = lambda s: random.Random(s)  # noqa: E731
    assert choose_steps(10, rng(0)) == list(range(10))
    # A window of 2 inside [3, 5) (Flow-GRPO-Fast: the range bounds the whole window): steps 3 and 4.
    assert choose_steps(10, rng(0), window=2, window_range=(3, 5)) == [3, 4]
    starts = {choose_steps(10, rng(s), window=3)[0] for s in range(200)}
    assert starts == set(range(8))  # every start where a window of 3 fits in 10 steps
    # timestep_fraction 0.3 of 10 steps: 3 distinct increasing steps, reproducible from the seed.
    steps = choose_steps(10, rng(5), timestep_fraction=0.3)
    assert len(steps) == 3 and steps == sorted(set(steps)) and steps == choose_steps(10, rng(5), timestep_fraction=0.3)
    assert len({tuple(choose_steps(10, rng(s), timestep_fraction=0.3)) for s in range(50)}) > 10
    assert len(choose_steps(10, rng(0), timestep_fraction=0.01)) == 1  # at least one step
    assert choose_steps(10, rng(0), timestep_fraction=1.0) == list(range(10))
    with pytest.raises(ValueError, match="mutually exclusive"):
        choose_steps(10, rng(0), window=2, timestep_fraction=0.5)


def test_recipe_refuses_window_and_fraction_together(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rollout: {trajectory: {sde_window: 2, timestep_fraction: 0.5}}\n")
    with pytest.raises(RecipeError, match="rollout.trajectory: sde_window .* timestep_fraction .* mutually exclusive"):
        load_recipe(path, check_files=False)
    path.write_text("rollout: {trajectory: {timestep_fraction: 0.5}}\n")
    assert load_recipe(path, check_files=False).rollout.trajectory.timestep_fraction == 0.5


def test_window_trains_exactly_the_window_and_the_rest_is_ode(learner, monkeypatch):
    models = learner.models
    cond, mask, pooled, _ = conditions(models)
    calls = []  # (step index by sigma, noise level) of every step taken
    real_step = trajectories.step_with_logprob

    def spy(kind, v, x, sigma, sigma_next, a, prev_sample=None, **kw):
        calls.append((float(sigma), a))
        return real_step(kind, v, x, sigma, sigma_next, a, prev_sample, **kw)

    monkeypatch.setattr(trajectories, "step_with_logprob", spy)
    traj = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A,
                               seed=7, sde_window=2, window_range=(2, 4))
    sigmas = shifted_sigmas(NUM_STEPS, models.decoder.shift)
    # Stored: the window's two steps and nothing else.
    assert traj.steps.tolist() == [2, 3]
    assert torch.equal(traj.sigmas, sigmas[[2, 3]]) and torch.equal(traj.sigmas_next, sigmas[[3, 4]])
    n = 2 * GROUP
    assert traj.latents.shape[:2] == traj.next_latents.shape[:2] == (n, 2) and traj.log_probs.shape == (n, 2)
    # Stochastic exactly at steps 2 and 3; every other step was an ODE step (noise level 0).
    noisy = [i for i, (_, a) in enumerate(calls) if a > 0]
    assert len(calls) == NUM_STEPS and noisy == [2, 3]
    # The stored transitions chain: x_3 stored at the window's second step is x' of its first.
    assert torch.equal(traj.latents[:, 1], traj.next_latents[:, 0])
    # Shared initial noise, ODE before the window: all G members of a group reach the same x_2
    # (up to float round-off: identical rows at different batch positions may differ in the last bit) ...
    x2 = traj.latents[:, 0].view(2, GROUP, *traj.latents.shape[2:])
    torch.testing.assert_close(x2[:, 1:], x2[:, :1].expand_as(x2[:, 1:]), rtol=1e-5, atol=1e-5)
    # ... and the window's noise spreads them.
    x3 = traj.next_latents[:, 0].view(2, GROUP, *traj.latents.shape[2:])
    assert not torch.allclose(x3[:, 0], x3[:, 1])


def test_different_sde_seeds_share_latents_before_the_window(learner):
    models = learner.models
    cond, mask, pooled, _ = conditions(models)
    noise = initial_noise(models.decoder, [1, 2], cond.device)
    runs = [denoise(models.decoder, noise, cond, mask, pooled, NUM_STEPS, noise_level=A, sde_steps=[3, 4],
                    generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    (x0_a, rec_a), (x0_b, rec_b) = runs
    assert sorted(rec_a) == [3, 4]  # only the window is recorded
    assert torch.equal(rec_a[3][0], rec_b[3][0])  # x_3: three ODE steps, bit-identical
    assert not torch.allclose(rec_a[3][1], rec_b[3][1])  # the SDE step differs with the seed
    assert not torch.allclose(x0_a, x0_b)


def test_timestep_fraction_rollout_stores_the_chosen_steps(learner):
    models = learner.models
    cond, mask, pooled, _ = conditions(models)
    traj = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A,
                               seed=11, timestep_fraction=0.5)
    expected = choose_steps(NUM_STEPS, random.Random(11), timestep_fraction=0.5)
    assert len(expected) == 3 and traj.steps.tolist() == expected
    sigmas = shifted_sigmas(NUM_STEPS, models.decoder.shift)
    assert torch.equal(traj.sigmas, sigmas[expected])
    assert torch.equal(traj.sigmas_next, sigmas[[j + 1 for j in expected]])


# ----------------------------------------------------------------------------------------------
# log-probs and the deterministic limit
# ----------------------------------------------------------------------------------------------
def test_stored_log_probs_are_the_float64_gaussian_density(learner):
    models = learner.models
    cond, mask, pooled, _ = conditions(models)
    traj = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A,
                               seed=3, sde_window=2, window_range=(0, 2))  # steps 0-1, includes sigma = 1
    assert traj.sigmas[0] == 1.0
    cond_n, mask_n, pooled_n = traj.cond, traj.cond_mask, traj.pooled
    for s in range(2):
        x, x_next = traj.latents[:, s], traj.next_latents[:, s]
        sigma, sigma_next = float(traj.sigmas[s]), float(traj.sigmas_next[s])
        with torch.no_grad():
            v = models.decoder.velocity(x, traj.sigmas[s].expand(len(x)), cond_n, pooled_n, mask_n).double()
        # Flow-GRPO's SDE step written out in float64; the sigma = 1 guard uses 1 - sigma_next.
        x64 = x.double()
        std_sigma = A * (sigma / (1 - (sigma_next if sigma == 1 else sigma))) ** 0.5
        mu = x64 + (sigma_next - sigma) * (v + std_sigma**2 / (2 * sigma) * (x64 + (1 - sigma) * v))
        std = std_sigma * (sigma - sigma_next) ** 0.5
        ref = Normal(mu, std).log_prob(x_next.double()).mean(dim=(1, 2, 3))
        assert torch.isfinite(traj.log_probs[:, s]).all()
        torch.testing.assert_close(traj.log_probs[:, s].double(), ref, rtol=1e-5, atol=1e-4)


def test_ode_render_is_diffusers_euler_sampling(learner):
    """noise_level 0 everywhere = FlowMatchEulerDiscreteScheduler's own loop on the same model."""
    models = learner.models
    cond, mask, pooled, _ = conditions(models)
    ours = render(models.decoder, cond, mask, pooled, NUM_STEPS, seeds=[4, 5])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=models.decoder.shift)
    scheduler.set_timesteps(NUM_STEPS)
    x = initial_noise(models.decoder, [4, 5], cond.device)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            v = models.decoder.velocity(x, scheduler.sigmas[i].expand(2), cond, pooled, mask)
            x = scheduler.step(v, t, x).prev_sample
        theirs = models.decoder.decode(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# classifier-free guidance
# ----------------------------------------------------------------------------------------------
def test_cfg_batched_pass_equals_two_separate_passes(learner):
    models = learner.models
    dec = models.decoder
    cond, mask, pooled, uncond = conditions(models)
    x = torch.randn(2, *dec.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.8])
    forwards = []
    hook = dec.transformer.register_forward_hook(lambda m, args, kw_out=None: forwards.append(1))
    try:
        with torch.no_grad():
            v, v_c = guided_velocity(dec, x, sigma, cond, mask, pooled, uncond, cfg_scale=4.0)
            assert len(forwards) == 1  # one transformer call over 2N rows
            # Two separate passes; the empty caption has the captions' fixed length already
            # (Models.condition: <|im_start|>, then masked zeros).
            assert uncond.cond.shape[1] == cond.shape[1] and int(uncond.mask.sum()) == 1
            u_cond, u_mask = uncond.cond.expand(2, -1, -1), uncond.mask.expand(2, -1)
            v_c_alone = dec.velocity(x, sigma, cond, pooled, mask)
            v_u_alone = dec.velocity(x, sigma, u_cond, uncond.pooled.expand(2, -1), u_mask)
            v1, v1_c = guided_velocity(dec, x, sigma, cond, mask, pooled, uncond, cfg_scale=1.0)
    finally:
        hook.remove()
    torch.testing.assert_close(v_c, v_c_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_u_alone + 4.0 * (v_c_alone - v_u_alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v, v_c)  # guidance did something
    assert v1 is v1_c and torch.equal(v1, v_c_alone)  # scale 1: the plain conditional pass


def test_cfg_rollout_log_probs_match_the_trained_policy(learner):
    models = learner.models
    cond, mask, pooled, uncond = conditions(models)
    kw = dict(num_steps=NUM_STEPS, noise_level=A, seed=5, sde_window=2, uncond=uncond, cfg_scale=3.0)
    guided = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, cfg_in_training=True, **kw)
    cond_only = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, cfg_in_training=False, **kw)
    # Same samples either way (the rollout always follows the guided velocity) ...
    assert torch.equal(guided.next_latents, cond_only.next_latents) and guided.uncond is not None
    with torch.no_grad():
        lp_guided, _, _ = step_logprobs(models.decoder, guided, A, cfg_scale=3.0)
        lp_cond, _, _ = step_logprobs(models.decoder, cond_only, A, cfg_scale=1.0)
    # ... scored under the policy the learner trains: bit for bit when it is the same batched pass.
    assert torch.equal(lp_guided, guided.log_probs)
    torch.testing.assert_close(lp_cond, cond_only.log_probs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided.log_probs, cond_only.log_probs)


# ----------------------------------------------------------------------------------------------
# the learner: ratio, KL, EMA
# ----------------------------------------------------------------------------------------------
def test_ratio_is_exactly_one_before_the_first_update_and_kl_is_zero_then_positive(learner):
    models = learner.models
    cond, mask, pooled, _ = conditions(models)
    n = 2 * GROUP
    adv, valid = distinct_advantages(n), torch.ones(n, dtype=torch.bool)
    sample = lambda seed: sample_trajectories(  # noqa: E731
        models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A, seed=seed,
        sde_window=2, version=learner.version)
    traj = sample(0)
    # The learner's recomputation reproduces the stored log-probs bit for bit ...
    with torch.no_grad():
        lp, _, _ = step_logprobs(models.decoder, traj, A)
    assert torch.equal(lp, traj.log_probs)
    # ... so even when it must use the stored ones (a rollout marked stale), r = exp(0) = 1 exactly.
    stats = learner.train_decoder(traj._replace(version=learner.version - 1), adv, valid)
    assert stats["ratio_mean"] == stats["ratio_max"] == stats["ratio_min"] == 1.0
    # LoRA B = 0 at init: the policy's mean IS the reference's, the KL is exactly 0.
    assert stats["kl"] == 0.0
    # After one update: a fresh rollout again has ratio exactly 1 on its first pass; the KL is > 0.
    stats = learner.train_decoder(sample(1), adv, valid)
    assert stats["stale_rollout"] == 0.0
    assert stats["ratio_mean"] == stats["ratio_max"] == stats["ratio_min"] == 1.0
    assert stats["kl"] > 0.0


def test_ema_math():
    # decay_t = min(decay, (1 + t) / (10 + t)): 0.1, 2/11, 0.25, ... capped at decay.
    assert ema_decay_at(0.9, 0) == 0.1 and ema_decay_at(0.9, 1) == 2 / 11 and ema_decay_at(0.2, 5) == 0.2
    ema = EMA({"w": torch.tensor([0.0, 10.0])}, decay=0.2)
    assert ema.update({"w": torch.tensor([1.0, 0.0])}) == 0.1
    # ema = 0.1 * [0, 10] + 0.9 * [1, 0] = [0.9, 1.0]
    torch.testing.assert_close(ema.state()["w"], torch.tensor([0.9, 1.0]))
    assert ema.update({"w": torch.tensor([2.0, 2.0])}) == pytest.approx(2 / 11)
    # ema = 2/11 * [0.9, 1] + 9/11 * [2, 2] = [1.8, 1.8181...]
    torch.testing.assert_close(ema.state()["w"], torch.tensor([(1.8 + 18) / 11, 20 / 11]))
    assert ema.num_updates == 2
    with pytest.raises(KeyError):
        ema.update({"other": torch.zeros(2)})


def test_learner_ema_follows_decoder_updates_and_swaps_for_eval(learner):
    models = learner.models
    cond, mask, pooled, _ = conditions(models)
    n = 2 * GROUP
    before = {k: v for k, v in learner.trainable_state().items() if k.startswith("decoder.")}
    assert learner.ema_state().keys() == before.keys()
    traj = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A,
                               seed=0, sde_window=2, version=learner.version)
    learner.train_decoder(traj, distinct_advantages(n), torch.ones(n, dtype=torch.bool))
    after = {k: v for k, v in learner.trainable_state().items() if k.startswith("decoder.")}
    ema = learner.ema_state()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved  # the update changed the LoRA ...
    for k in before:  # ... and the EMA took its first step, decay min(0.5, 1/10) = 0.1
        torch.testing.assert_close(ema[k], 0.1 * before[k] + 0.9 * after[k])
    # Evaluation can swap the EMA in and get the live weights back afterwards.
    with weights_swapped(models, ema):
        assert all(torch.equal(models.trainable_state()[k], ema[k]) for k in ema)
    assert all(torch.equal(models.trainable_state()[k], after[k]) for k in after)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def test_eval_render_uses_eval_steps(learner, monkeypatch):
    recipe = learner.recipe
    worker = actors.RolloutWorker(recipe, models=learner.models)
    seen = []
    real_render = actors.render

    def spy(decoder, cond, mask, pooled, num_steps, seeds, **kw):
        seen.append(num_steps)
        return real_render(decoder, cond, mask, pooled, num_steps, seeds, **kw)

    monkeypatch.setattr(actors, "render", spy)
    records = generate_shapes(2, seed=1)
    captions, renders = worker.eval_render([r.image for r in records], [r.image_id for r in records], seed=0)
    assert seen == [recipe.rollout.trajectory.eval_steps] == [9]
    assert len(captions) == len(renders) == 2 and renders[0].size == (32, 32)
    # Caption renders for rewards keep the cheaper render_steps.
    worker.render_captions(torch.tensor([[20, 21]]), torch.ones(1, 2, dtype=torch.long), seeds=[0])
    assert seen[-1] == recipe.rollout.trajectory.render_steps == 4
