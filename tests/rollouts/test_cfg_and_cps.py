"""Issue 15's last parity items: the gradient of guided training (`cfg_detach_uncond`) and the CPS
sampler's log-prob convention (`cps_logprob`).

What Flow-GRPO does, re-derived here in float64 from its code (never imported):
  - train_sd3.py `compute_log_prob` with train.cfg: ONE batched transformer call over
    [uncond; cond], then noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond),
    with grad on both halves (no detach, no no_grad): our default `cfg_detach_uncond: false`.
  - sd3_sde_with_logprob.py, sde_type 'cps': Flow-CPS's mean / std / sample, and
    log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2).mean(over latent dims): our
    `cps_logprob: flow_grpo`; the last step (sigma_prev = 0, std 0) keeps that value.
"""
from __future__ import annotations

import math

import pytest
import torch

from rl.config import Recipe, RecipeError, load_recipe
from rl.learner import Learner
from rollouts.sde import cps_step_with_logprob, shifted_sigmas, step_with_logprob
from rollouts.trajectories import Uncond, guided_velocity, sample_trajectories, step_logprobs

A, S_CFG, NUM_STEPS, GROUP = 0.7, 4.5, 4, 2


# ----------------------------------------------------------------------------------------------
# Flow-GRPO, written out in float64
# ----------------------------------------------------------------------------------------------
def flow_grpo_cps(x, v, sigma, sigma_prev, a, prev_sample=None, noise=None):
    """sd3_sde_with_logprob(sde_type='cps') in float64: (prev_sample, log_prob, mean, std_dev_t)."""
    std_dev_t = sigma_prev * math.sin(a * math.pi / 2)
    pred_original_sample = x - sigma * v
    noise_estimate = x + v * (1 - sigma)
    mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * math.sqrt(sigma_prev**2 - std_dev_t**2)
    if prev_sample is None:
        prev_sample = mean + std_dev_t * noise
    log_prob = -((prev_sample.detach() - mean) ** 2)
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std_dev_t


class ToyDecoder(torch.nn.Module):
    """A float64 linear stand-in for `Decoder.velocity`: v = W x + U (mean of cond) + p pooled."""

    def __init__(self, c: int = 3, d: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(c, c, generator=g, dtype=torch.float64))
        self.u = torch.nn.Parameter(torch.randn(c, d, generator=g, dtype=torch.float64))

    def velocity(self, x, sigma, cond, pooled, mask=None):
        c = (cond * mask.unsqueeze(-1)).mean(1) if mask is not None else cond.mean(1)  # (N, D)
        return torch.einsum("ij,njhw->nihw", self.w, x) + (c @ self.u.T)[:, :, None, None] * sigma[:, None, None, None]


def toy_inputs(n: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    cond, pooled = torch.randn(n, 4, 5, generator=g, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    mask = torch.ones(n, 4, dtype=torch.float64)
    uncond = Uncond(torch.randn(1, 4, 5, generator=g, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64),
                    torch.zeros(1, 1, dtype=torch.float64))
    return x, torch.full((n,), 0.7, dtype=torch.float64), cond, mask, pooled, uncond


# ----------------------------------------------------------------------------------------------
# CFG: the gradient through the unconditional branch
# ----------------------------------------------------------------------------------------------
def _grads(dec, objective):
    dec.zero_grad()
    objective().backward()
    return [p.grad.clone() for p in dec.parameters()]


def test_detached_guidance_gradient_is_that_of_an_uncond_pass_under_no_grad_float64():
    dec, (x, sigma, cond, mask, pooled, uncond) = ToyDecoder(), toy_inputs()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def guided(detach):  # a linear functional <w, v> of the guided velocity
        return lambda: (w * guided_velocity(dec, x, sigma, cond, mask, pooled, uncond, S_CFG,
                                            detach_uncond=detach)[0]).sum()

    def reference():  # v_u from a separate pass under no_grad, v_c with grad
        with torch.no_grad():
            v_u = dec.velocity(x, sigma, uncond.cond.expand(2, -1, -1), uncond.pooled.expand(2, -1),
                               uncond.mask.expand(2, -1))
        v_c = dec.velocity(x, sigma, cond, pooled, mask)
        return (w * (v_u + S_CFG * (v_c - v_u))).sum()

    def cond_only():
        return (w * dec.velocity(x, sigma, cond, pooled, mask)).sum()

    def uncond_only():
        return (w * dec.velocity(x, sigma, uncond.cond.expand(2, -1, -1), uncond.pooled.expand(2, -1),
                                 uncond.mask.expand(2, -1))).sum()

    detached, attached, ref = _grads(dec, guided(True)), _grads(dec, guided(False)), _grads(dec, reference)
    g_c, g_u = _grads(dec, cond_only), _grads(dec, uncond_only)
    for d, a, r, gc, gu in zip(detached, attached, ref, g_c, g_u):
        torch.testing.assert_close(d, r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d, S_CFG * gc, rtol=1e-12, atol=1e-12)  # s J_c^T w
        # Flow-GRPO's (no detach): (1 - s) J_u^T w + s J_c^T w, i.e. -3.5 J_u^T w extra at s = 4.5.
        torch.testing.assert_close(a, (1 - S_CFG) * gu + S_CFG * gc, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(detached[1], attached[1])  # u sees the condition: the two differ
    # The values are the same either way.
    with torch.no_grad():
        assert torch.equal(guided(True)(), guided(False)())


def small_recipe(**trajectory) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 1, "group_size": GROUP, "caption": {"max_new_tokens": 8},
                    "trajectory": {"num_steps": NUM_STEPS, "eval_steps": 4, "render_steps": 4, "noise_level": A,
                                   **trajectory}},
        "grpo": {"decoder": {"lr": 1e-2, "beta": 0.0}},
    })


@pytest.fixture(scope="module")
def models():
    m = Learner(small_recipe()).models
    with torch.no_grad():  # LoRA B = 0 at init would leave A without gradient: give B a value
        for name, p in m.decoder.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return m


def condition(models):
    ids = torch.randint(10, 60, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, mask, pooled = models.condition(ids, torch.ones_like(ids))
        empty = torch.zeros((1, 0), dtype=torch.long)
        uncond = Uncond(*models.condition(empty, empty))
    return cond, mask, pooled, uncond


def test_detached_guided_log_prob_gradient_on_the_tiny_decoder_lora(models):
    """d log_prob / d LoRA with cfg_detach_uncond equals the gradient with v_u computed under no_grad
    (separate passes), and differs from Flow-GRPO's (no detach)."""
    dec = models.decoder
    cond, mask, pooled, uncond = condition(models)
    traj = sample_trajectories(dec, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A, seed=3,
                               sde_window=1, uncond=uncond, cfg_scale=S_CFG)
    lora = [p for n, p in dec.transformer.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)

    def grads(fn):
        for p in lora:
            p.grad = None
        fn().sum().backward()
        return torch.cat([p.grad.flatten() for p in lora])

    def ours(detach):
        return lambda: step_logprobs(dec, traj, A, cfg_scale=S_CFG, cfg_detach_uncond=detach)[0]

    def reference():
        x, n = traj.latents[:, 0], traj.latents.shape[0]
        sig = traj.sigmas[0].expand(n)
        with torch.no_grad():
            v_u = dec.velocity(x, sig, uncond.cond.expand(n, -1, -1), uncond.pooled.expand(n, -1),
                               uncond.mask.expand(n, -1))
        v_c = dec.velocity(x, sig, traj.cond, traj.pooled, traj.cond_mask)
        v = v_u + S_CFG * (v_c - v_u)
        return step_with_logprob("sde", v, x, float(traj.sigmas[0]), float(traj.sigmas_next[0]), A,
                                 prev_sample=traj.next_latents[:, 0]).log_prob

    detached, attached, ref = grads(ours(True)), grads(ours(False)), grads(reference)
    assert ref.abs().max() > 0
    # float32 round-off of the batched 2N-row pass vs two N-row passes
    torch.testing.assert_close(detached, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert (detached - attached).abs().max() > 1e-2 * attached.abs().max()
    with torch.no_grad():  # values unchanged, the stored log-probs reproduced bit for bit
        assert torch.equal(ours(True)(), traj.log_probs)


def test_learner_passes_cfg_detach_uncond(monkeypatch):
    """train_decoder scores the guided velocity with the recipe's cfg_detach_uncond (not the reference pass)."""
    import rl.objectives.flow_grpo as learner_mod  # the decoder loss lives in the flow_grpo objective

    calls = []
    real = learner_mod.step_logprobs

    def spy(*args, **kw):
        calls.append((torch.is_grad_enabled(), kw.get("cfg_scale"), kw.get("cfg_detach_uncond"), kw.get("cps_logprob")))
        return real(*args, **kw)

    monkeypatch.setattr(learner_mod, "step_logprobs", spy)
    recipe = small_recipe(cfg_scale=S_CFG, cfg_detach_uncond=True, cps_logprob="flow_grpo", sde_window=1)
    learner = Learner(recipe)
    cond, mask, pooled, uncond = condition(learner.models)
    traj = sample_trajectories(learner.models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS,
                               noise_level=A, seed=0, sde_window=1, uncond=uncond, cfg_scale=S_CFG,
                               version=learner.version)
    learner.train_decoder(traj, torch.tensor([1.0, -1.0]), torch.ones(GROUP, dtype=torch.bool))
    assert calls and all(c == (True, S_CFG, True, "flow_grpo") for c in calls)


# ----------------------------------------------------------------------------------------------
# CFG: the recipe
# ----------------------------------------------------------------------------------------------
def test_cfg_detach_uncond_without_guided_training_is_refused():
    with pytest.raises(ValueError, match="cfg_detach_uncond.*cfg_scale=1.0"):
        small_recipe(cfg_detach_uncond=True)
    with pytest.raises(ValueError, match="cfg_in_training=False"):
        small_recipe(cfg_scale=S_CFG, cfg_in_training=False, cfg_detach_uncond=True)
    assert small_recipe(cfg_scale=S_CFG, cfg_detach_uncond=True).rollout.trajectory.cfg_detach_uncond
    assert not small_recipe().rollout.trajectory.cfg_detach_uncond  # default false: Flow-GRPO's
    with pytest.raises(RecipeError, match="cfg_detach_uncond"):
        load_recipe("recipes/unified_grpo.yaml", overrides=["rollout.trajectory.cfg_scale=1.0",
                                                            "rollout.trajectory.cfg_detach_uncond=true"])


def test_production_recipe_samples_and_trains_with_flow_grpo_guidance():
    for path in ("recipes/unified_grpo.yaml", "recipes/unified_grpo_dryrun.yaml"):
        t = load_recipe(path).rollout.trajectory
        assert (t.cfg_scale, t.cfg_in_training, t.cfg_detach_uncond) == (4.5, True, False)


# ----------------------------------------------------------------------------------------------
# CPS: Flow-GRPO's log-prob convention
# ----------------------------------------------------------------------------------------------
def cps_inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g),
            torch.randn(3, 4, 2, 2, generator=g))


# The shifted 10-step schedule's pairs, the last one ending at sigma 0.
SCHEDULE = shifted_sigmas(10, 3.0)
PAIRS = [pytest.param(float(SCHEDULE[j]), float(SCHEDULE[j + 1]), id=f"step{j}") for j in (0, 4, 8, 9)]


@pytest.mark.parametrize("sigma, sigma_next", PAIRS)
def test_cps_flow_grpo_log_prob_matches_flow_grpo_float64(sigma, sigma_next):
    x, v, noise = cps_inputs()
    ref_x, ref_lp, ref_mean, ref_std = flow_grpo_cps(x.double(), v.double(), sigma, sigma_next, A, noise=noise.double())
    out = cps_step_with_logprob(v, x, sigma, sigma_next, A, noise=noise, log_prob="flow_grpo")
    torch.testing.assert_close(out.prev_sample.double(), ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(out.std.flatten()[0]), ref_std, rel_tol=1e-6, abs_tol=1e-7)
    torch.testing.assert_close(out.log_prob.double(), ref_lp, rtol=1e-4, atol=1e-7)
    # Scoring a stored sample under moved weights (v + dv): the value and the gradient w.r.t. v,
    # the last step included (Flow-GRPO's is not 0 there; the Gaussian convention's is).
    v2 = (v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(8))).requires_grad_(True)
    v2_64 = v2.detach().double().requires_grad_(True)
    lp = cps_step_with_logprob(v2, x, sigma, sigma_next, A, prev_sample=out.prev_sample, log_prob="flow_grpo").log_prob
    _, ref_lp2, _, _ = flow_grpo_cps(x.double(), v2_64, sigma, sigma_next, A, prev_sample=out.prev_sample.double())
    torch.testing.assert_close(lp.double(), ref_lp2, rtol=1e-4, atol=1e-7)
    (g,) = torch.autograd.grad(lp.sum(), v2)
    (g_ref,) = torch.autograd.grad(ref_lp2.sum(), v2_64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-8)
    assert g.abs().max() > 0
    gauss = cps_step_with_logprob(v2, x, sigma, sigma_next, A, prev_sample=out.prev_sample).log_prob
    if sigma_next == 0:  # a point mass under the density convention: 0, and no gradient
        assert torch.equal(gauss.detach(), torch.zeros(3))
        assert torch.autograd.grad(gauss.sum(), v2)[0].abs().max() == 0


@pytest.mark.parametrize("sigma, sigma_next", PAIRS[:3])
def test_cps_log_ratio_gaussian_is_flow_grpo_over_2_std_squared(sigma, sigma_next):
    """The variance does not cancel in a log-ratio: the two conventions give different PPO ratios."""
    x, v, noise = cps_inputs()
    v_new = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    old = {c: cps_step_with_logprob(v, x, sigma, sigma_next, A, noise=noise, log_prob=c) for c in ("gaussian", "flow_grpo")}
    new = {c: cps_step_with_logprob(v_new, x, sigma, sigma_next, A, prev_sample=old[c].prev_sample, log_prob=c)
           for c in ("gaussian", "flow_grpo")}
    std = sigma_next * math.sin(A * math.pi / 2)
    lr_gauss = (new["gaussian"].log_prob - old["gaussian"].log_prob).double()
    lr_flow = (new["flow_grpo"].log_prob - old["flow_grpo"].log_prob).double()
    torch.testing.assert_close(lr_gauss, lr_flow / (2 * std**2), rtol=2e-3, atol=1e-6)
    assert not torch.allclose(lr_gauss, lr_flow)


def test_cps_trajectory_log_probs_reproduced_by_the_learner_in_either_convention(models):
    """Rollout and learner share the convention; every step trained, the last (sigma_next 0) too."""
    dec = models.decoder
    cond, mask, pooled, _ = condition(models)
    for conv in ("gaussian", "flow_grpo"):
        traj = sample_trajectories(dec, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A, seed=1,
                                   sampler="cps", cps_logprob=conv)
        assert float(traj.sigmas_next[-1]) == 0.0
        with torch.no_grad():
            lp, _, _ = step_logprobs(dec, traj, A, sampler="cps", cps_logprob=conv)
        assert torch.equal(lp, traj.log_probs)
        assert torch.equal(traj.log_probs[:, -1], torch.zeros(traj.log_probs.shape[0]))  # x' = mean at the last step
        if conv == "flow_grpo":  # -(x' - mean)^2 <= 0, and < 0 where noise was added
            assert (traj.log_probs[:, :-1] < 0).all()
    with pytest.raises(ValueError, match="cps_logprob|literal_error|Input should be"):
        small_recipe(cps_logprob="full")
