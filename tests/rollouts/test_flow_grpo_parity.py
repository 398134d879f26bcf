"""Parity with Flow-GRPO (Liu et al. 2025, github.com/yifan123/flow_grpo) in the settings the
production recipe takes from it (issue 15, item 1): the KL penalty's scale, the trained steps,
batch-std advantages and the dropping of zero-advantage samples.

Flow-GRPO's formulas are re-derived here in float64 from its code (flow_grpo/diffusers_patch/
sd3_sde_with_logprob.py, flow_grpo/stat_tracking.py, scripts/train_sd3.py), never imported, and
compared with our pieces on identical tensors.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from rl import grpo
from rl.config import RecipeError, load_recipe
from rollouts.sde import gaussian_kl_same_std, kl_std, sde_step_with_logprob, shifted_sigmas
from rollouts.trajectories import choose_steps, choose_window, stochastic_steps

A, STEPS = 0.7, 10


# ----------------------------------------------------------------------------------------------
# Flow-GRPO, written out in float64
# ----------------------------------------------------------------------------------------------
def flow_grpo_step_mean_std(x, v, sigma, sigma_next, sigma_max, a):
    """sd3_sde_with_logprob: (prev_sample_mean, std_dev_t); std_dev_t has no sqrt(-dt)."""
    dt = sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t


def flow_grpo_kl(mean, mean_ref, std_dev_t):
    """train_sd3.py: ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2), per sample."""
    return ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)


def flow_grpo_advantages(rewards: np.ndarray, prompts: list[str], clip: float) -> np.ndarray:
    """PerPromptStatTracker with global_std (its SD3 configs): per-prompt mean, np.std (population)
    of the whole batch + 1e-4; then clamped to +-adv_clip_max in the loss."""
    adv = np.empty_like(rewards)
    prompts_arr = np.array(prompts)
    std = np.std(rewards) + 1e-4
    for p in set(prompts):
        sel = prompts_arr == p
        adv[sel] = (rewards[sel] - np.mean(rewards[sel])) / std
    return np.clip(adv, -clip, clip)


def flow_grpo_loss(logp, old_logp, adv, kl, beta, clip_range):
    """train_sd3.py after `samples = samples[advantages.abs().sum(1) != 0]`: per trained timestep j,
    mean over samples of max(-A r, -A clip(r)) + beta mean(kl); the accumulation over the T
    timesteps averages them (gradient_accumulation_steps counts the timesteps)."""
    keep = adv != 0
    logp, old_logp, adv, kl = logp[keep], old_logp[keep], adv[keep], kl[keep]
    total = 0.0
    for j in range(logp.shape[1]):
        ratio = torch.exp(logp[:, j] - old_logp[:, j])
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        total = total + torch.mean(torch.maximum(unclipped, clipped)) + beta * torch.mean(kl[:, j])
    return total / logp.shape[1]


# ----------------------------------------------------------------------------------------------
# KL scale
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("j", [0, 4, STEPS - 1])  # sigma = 1 (the guard), a middle step, sigma_next = 0
def test_kl_flow_grpo_scale_equals_flow_grpo_penalty(j):
    sigmas = shifted_sigmas(STEPS, 3.0)
    sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
    g = torch.Generator().manual_seed(j)
    x, v, v_ref = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    v_ref = v + 0.1 * v_ref  # a reference near the policy
    ours, ref = (sde_step_with_logprob(u, x, sigma, sigma_next, A) for u in (v, v_ref))
    kl_ours = gaussian_kl_same_std(ours.mean, ref.mean, kl_std("sde", ours.std, sigma, sigma_next, "flow_grpo"))

    m64, std_dev_t = flow_grpo_step_mean_std(x.double(), v.double(), sigma, sigma_next, float(sigmas[1]), A)
    m64_ref, _ = flow_grpo_step_mean_std(x.double(), v_ref.double(), sigma, sigma_next, float(sigmas[1]), A)
    kl_theirs = flow_grpo_kl(m64, m64_ref, std_dev_t)
    torch.testing.assert_close(kl_ours.double(), kl_theirs, rtol=2e-4, atol=1e-9)
    # "transition" is the true KL of the two transition Gaussians: Flow-GRPO's / |dt|.
    kl_true = gaussian_kl_same_std(ours.mean, ref.mean, kl_std("sde", ours.std, sigma, sigma_next, "transition"))
    torch.testing.assert_close(kl_true.double(), kl_theirs / (sigma - sigma_next), rtol=2e-4, atol=1e-9)


def test_kl_scales_agree_for_cps():
    std = torch.full((2, 1, 1, 1), 0.3)
    assert torch.equal(kl_std("cps", std, 0.5, 0.4, "flow_grpo"), kl_std("cps", std, 0.5, 0.4, "transition"))


# ----------------------------------------------------------------------------------------------
# trained steps
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps,fraction", [(10, 0.99), (10, 1.0), (10, 0.5), (40, 0.99), (7, 0.3)])
def test_flow_grpo_selection_trains_the_first_int_fraction_steps_all_sde(num_steps, fraction):
    # train_sd3.py: num_train_timesteps = int(num_steps * timestep_fraction); train_timesteps = range(it)
    expected = list(range(int(num_steps * fraction)))
    for seed in range(5):  # not drawn: the same for every rollout
        steps = choose_steps(num_steps, random.Random(seed), timestep_fraction=fraction, selection="flow_grpo")
        assert steps == expected
    assert stochastic_steps(num_steps, expected, "flow_grpo") == list(range(num_steps))  # untrained: SDE too
    # the other selections keep their untrained steps deterministic
    assert stochastic_steps(num_steps, [1, 3], "random_subset") == [1, 3]
    assert stochastic_steps(num_steps, [2, 3], None) == [2, 3]


def test_flow_grpo_fraction_of_ten_steps_at_0_99_is_nine():
    assert choose_steps(10, random.Random(0), timestep_fraction=0.99, selection="flow_grpo") == list(range(9))


def test_window_range_bounds_the_whole_window_as_flow_grpo_fast():
    # Flow-GRPO-Fast: start = randint(lo, hi - window); range (0, 6), window 3 -> starts {0, 1, 2, 3}
    starts = {choose_window(10, 3, (0, 6), random.Random(s))[0] for s in range(300)}
    assert starts == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="does not fit"):
        choose_window(10, 3, (4, 6), random.Random(0))


# ----------------------------------------------------------------------------------------------
# advantages and the zero-advantage drop
# ----------------------------------------------------------------------------------------------
REWARDS = [0.2, 0.9, 0.4, 0.7, 0.5, 0.5, 0.5, 0.5, 0.1, 0.3, 0.3, 0.8]  # 3 groups of 4; group 2 all equal
G = 4


def test_batch_population_advantages_equal_flow_grpo_global_std():
    r = np.array(REWARDS, dtype=np.float64)
    prompts = [f"p{i // G}" for i in range(len(r))]
    theirs = flow_grpo_advantages(r, prompts, clip=5.0)
    ours = grpo.group_advantages(torch.tensor(REWARDS), G, scale="batch_population", clip=5.0)
    torch.testing.assert_close(ours.advantages.double(), torch.from_numpy(theirs), rtol=1e-5, atol=1e-6)
    assert ours.valid.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # "batch" is the unbiased std: larger by sqrt(n / (n - 1)) than the population one, so smaller advantages
    unbiased = grpo.group_advantages(torch.tensor(REWARDS), G, scale="batch", clip=None).advantages
    n = len(REWARDS)
    torch.testing.assert_close(unbiased[:4].double() * math.sqrt(n / (n - 1)), torch.from_numpy(theirs[:4]),
                               rtol=1e-4, atol=1e-6)


def test_decoder_loss_with_zero_advantage_drop_equals_flow_grpo_loss():
    # The first row of group 0 has an advantage of exactly 0 too (its reward is its group's mean).
    rewards = torch.tensor([0.5, 0.2, 0.8, 0.5] + REWARDS[4:])
    adv = grpo.group_advantages(rewards, G, scale="batch_population", clip=5.0)
    assert (adv.advantages == 0).sum() == 6 and adv.valid.sum() == 8  # 4 of a zero-variance group, 2 at the mean
    n, t = rewards.numel(), 9
    g = torch.Generator().manual_seed(0)
    old_logp = torch.randn(n, t, generator=g)
    logp = old_logp + 2e-4 * torch.randn(n, t, generator=g)  # some ratios beyond 1 +- 1e-4: clipping engaged
    kl = torch.rand(n, t, generator=g)
    beta, clip_range = 0.04, 1e-4

    w, w_tok = grpo.trajectory_weights(adv.advantages, adv.valid, t, drop_zero_advantage=True)
    ours = grpo.micro_batch_loss(logp, old_logp, adv.advantages, w, w_tok, kl=kl, beta=beta, epsilon=clip_range)
    theirs = flow_grpo_loss(logp.double(), old_logp.double(), adv.advantages.double(), kl.double(), beta, clip_range)
    torch.testing.assert_close(ours.loss.double(), theirs, rtol=1e-5, atol=1e-8)
    # Without the drop, the 4 masked rows of the zero-variance group still count in the row mean
    # (and the 2 zero-advantage rows keep their KL term): a different loss.
    w_all, w_tok_all = grpo.trajectory_weights(adv.advantages, adv.valid, t)
    kept = grpo.micro_batch_loss(logp, old_logp, adv.advantages, w_all, w_tok_all, kl=kl, beta=beta, epsilon=clip_range)
    assert not torch.isclose(kept.loss.double(), theirs, rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# the recipe: the production values and contradictions refused
# ----------------------------------------------------------------------------------------------
def test_production_recipe_uses_flow_grpo_choices():
    r = load_recipe("recipes/unified_grpo.yaml", check_files=False)
    t, d = r.rollout.trajectory, r.grpo.decoder
    assert (t.step_selection, t.timestep_fraction, t.num_steps, t.noise_level) == ("flow_grpo", 0.99, 10, 0.7)
    assert (d.kl_scale, d.advantage_scale, d.drop_zero_advantage) == ("flow_grpo", "batch_population", True)
    assert (d.lr, d.weight_decay, d.ema_decay, d.beta, d.epsilon) == (3e-4, 1e-4, 0.9, 0.04, 1e-4)
    assert r.grpo.adv_clip == 5.0


@pytest.mark.parametrize("trajectory,fields", [
    ("{step_selection: flow_grpo, timestep_fraction: 0.99, sde_window: 2}", ("step_selection", "sde_window")),
    ("{step_selection: random_subset, timestep_fraction: 0.5, sde_window: 2}", ("sde_window", "timestep_fraction")),
    ("{step_selection: flow_grpo}", ("step_selection", "timestep_fraction")),
    ("{step_selection: window}", ("step_selection", "sde_window")),
    ("{step_selection: all, timestep_fraction: 0.5}", ("step_selection", "timestep_fraction")),
    ("{timestep_fraction: 0.5, window_range: [0, 4]}", ("window_range", "sde_window")),
    ("{num_steps: 10, sde_window: 3, window_range: [4, 6]}", ("window_range", "sde_window")),
])
def test_recipe_refuses_contradictory_step_settings(tmp_path, trajectory, fields):
    path = tmp_path / "r.yaml"
    path.write_text(f"rollout: {{trajectory: {trajectory}}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, check_files=False)
    for field in fields:
        assert field in str(err.value)


# ----------------------------------------------------------------------------------------------
# the tiny decoder: rollouts and the learner in the parity settings
# ----------------------------------------------------------------------------------------------
N_STEPS, GROUP = 6, 3  # int(6 x 0.99) = 5 trained steps, the 6th sampled with the SDE but not trained


def parity_learner():
    from rl.config import Recipe
    from rl.learner import Learner

    return Learner(Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": GROUP, "caption": {"max_new_tokens": 8},
                    "trajectory": {"num_steps": N_STEPS, "eval_steps": 9, "render_steps": 4, "noise_level": A,
                                   "step_selection": "flow_grpo", "timestep_fraction": 0.99}},
        "grpo": {"decoder": {"lr": 1e-2, "beta": 0.04, "epsilon": 1e-4, "kl_scale": "flow_grpo",
                             "drop_zero_advantage": True}},
    }))


def conditions(models, b: int = 2):
    ids = torch.randint(10, 60, (b, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return models.condition(ids, torch.ones_like(ids))


def test_flow_grpo_rollout_records_the_prefix_and_samples_the_rest_with_the_sde():
    from rollouts.trajectories import denoise, initial_noise, row_generator, sample_trajectories, step_logprobs

    learner = parity_learner()
    dec = learner.models.decoder
    cond, mask, pooled = conditions(learner.models)
    kw = dict(num_steps=N_STEPS, noise_level=A, seed=4, step_selection="flow_grpo", timestep_fraction=0.99,
              version=learner.version)
    traj = sample_trajectories(dec, cond, mask, pooled, GROUP, **kw)
    assert traj.steps.tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        lp, _, _ = step_logprobs(dec, traj, A)
    assert torch.equal(lp, traj.log_probs)  # the learner scores exactly what was recorded
    micro = sample_trajectories(dec, cond, mask, pooled, GROUP, micro_batch_size=2, **kw)
    assert micro.steps.tolist() == traj.steps.tolist()
    torch.testing.assert_close(micro.log_probs, traj.log_probs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(micro.next_latents, traj.next_latents, rtol=1e-4, atol=1e-5)

    # The stochastic set and the recorded set are separate: with step 5 an SDE step too, steps 0-4
    # are the same (same per-row noise streams), only the final latent differs.
    noise = initial_noise(dec, [1, 1], cond.device)
    runs = []
    for sde in ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4]):
        gens = [row_generator(0, r, cond.device) for r in range(2)]
        with torch.no_grad():
            runs.append(denoise(dec, noise, cond, mask, pooled, N_STEPS, noise_level=A, sde_steps=sde,
                                row_generators=gens, record_steps=[0, 1, 2, 3, 4]))
    (x_sde, rec_sde), (x_ode, rec_ode) = runs
    assert sorted(rec_sde) == sorted(rec_ode) == [0, 1, 2, 3, 4]
    assert torch.equal(rec_sde[4][1], rec_ode[4][1])
    assert not torch.allclose(x_sde, x_ode)
    with pytest.raises(ValueError, match="not SDE steps"):
        denoise(dec, noise, cond, mask, pooled, N_STEPS, noise_level=A, sde_steps=[0], record_steps=[1])


def test_learner_kl_is_flow_grpo_penalty_over_the_kept_rows():
    from rollouts.trajectories import sample_trajectories, step_logprobs

    learner = parity_learner()
    models = learner.models
    cond, mask, pooled = conditions(models)
    n = 2 * GROUP
    adv = (torch.arange(n, dtype=torch.float32) % GROUP) - 1.0  # -1, 0, 1: a zero row in each group
    valid = torch.ones(n, dtype=torch.bool)
    sample = lambda seed: sample_trajectories(models.decoder, cond, mask, pooled, GROUP, num_steps=N_STEPS,  # noqa: E731
                                              noise_level=A, seed=seed, step_selection="flow_grpo",
                                              timestep_fraction=0.99, version=learner.version)
    learner.train_decoder(sample(0), adv, valid)  # the policy moves off the reference
    traj = sample(1)
    with torch.no_grad():
        _, mean, _ = step_logprobs(models.decoder, traj, A)
        with models.reference("decoder"):
            _, mean_ref, _ = step_logprobs(models.decoder, traj, A)
    sigmas = shifted_sigmas(N_STEPS, models.decoder.shift)
    kl = torch.stack([flow_grpo_kl(mean[:, s].double(), mean_ref[:, s].double(),
                                   flow_grpo_step_mean_std(0.0, 0.0, float(traj.sigmas[s]), float(traj.sigmas_next[s]),
                                                           float(sigmas[1]), A)[1])
                      for s in range(traj.steps.numel())], 1)  # (N, 5)
    expected = kl[adv != 0].mean()  # Flow-GRPO: zero-advantage rows dropped, mean over kept rows and steps
    stats = learner.train_decoder(traj, adv, valid)
    assert expected > 0
    assert stats["kl"] == pytest.approx(float(expected), rel=1e-4)


def test_driver_scales_decoder_advantages_with_the_decoder_option():
    from types import SimpleNamespace

    from rl.train import Trainer

    recipe = load_recipe("recipes/unified_grpo.yaml", check_files=False)  # grpo.scale group, decoder batch_population
    rewards = torch.tensor([REWARDS])  # (K = 1, N)
    batch = SimpleNamespace(matrix=rewards, weights=[1.0])
    for stage, scale in (("decoder", "batch_population"), ("encoder", "group")):
        driver = SimpleNamespace(recipe=recipe, stages=[stage], step=0)
        driver.recipe.rollout.group_size = G
        got = Trainer._advantages(driver, batch)
        want = grpo.group_advantages(rewards[0], G, scale=scale, clip=recipe.grpo.adv_clip)
        assert torch.equal(got.advantages, want.advantages), stage
