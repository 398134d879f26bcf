"""Tests for rollouts/sde.py: each log-prob is checked against a float64 computation written out
here from the equations (not by calling the module), and the deterministic limits against diffusers."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from rollouts.sde import (
    SDEStep,
    cps_step_with_logprob,
    gaussian_kl_same_std,
    sde_step_with_logprob,
    shifted_sigmas,
    step_with_logprob,
)

B, SHAPE = 3, (3, 4, 5, 5)  # (B, C, H, W) latents


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    v = torch.randn(SHAPE, generator=g).to(dtype)
    return x, v


def _col64(s):
    """float / (B,) sigma -> float64 (B, 1, 1, 1) for the references."""
    return torch.as_tensor(s, dtype=torch.float64).reshape(-1).expand(B).reshape(B, 1, 1, 1)


def _sde_reference(x, v, sigma, sigma_next, a):
    """Flow-GRPO mean and std in float64, straight from the equations (no sigma = 1 here)."""
    x, v = x.double(), v.double()
    s, sn = _col64(sigma), _col64(sigma_next)
    dt = sn - s
    std_sigma = a * torch.sqrt(s / (1 - s))
    mu = x + dt * (v + std_sigma**2 / (2 * s) * (x + (1 - s) * v))
    return mu, std_sigma * torch.sqrt(-dt)


def _cps_reference(x, v, sigma, sigma_next, a):
    x, v = x.double(), v.double()
    s, sn = _col64(sigma), _col64(sigma_next)
    std = sn * math.sin(a * math.pi / 2)
    mu = (1 - sn) * (x - s * v) + torch.sqrt(sn**2 - std**2) * (x + (1 - s) * v)
    return mu, std


def _ref_log_prob(x_next, mu, std):
    """Full Gaussian density, averaged over (C, H, W) -> (B,)."""
    return Normal(mu, std.expand_as(mu)).log_prob(x_next.double()).mean(dim=(1, 2, 3))


SIGMAS = [
    pytest.param(0.8, 0.6, id="float-sigma"),
    pytest.param(torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.4, 0.0]), id="per-sample-sigma"),
    pytest.param(torch.tensor(0.5), torch.tensor(0.3), id="0d-sigma"),
]


@pytest.mark.parametrize("sigma, sigma_next", SIGMAS)
def test_sde_log_prob_matches_float64_reference(sigma, sigma_next):
    x, v = _inputs()
    out = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7,
                                generator=torch.Generator().manual_seed(5))
    mu, std = _sde_reference(x, v, sigma, sigma_next, 0.7)
    # The drawn sample is mu + std * noise with the generator's first draw.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).double()
    torch.testing.assert_close(out.prev_sample.double(), mu + std * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean.double(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.double(), std, rtol=1e-6, atol=1e-7)
    assert out.log_prob.shape == (B,) and out.std.shape == (B, 1, 1, 1)
    torch.testing.assert_close(out.log_prob.double(), _ref_log_prob(out.prev_sample, mu, std),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step, reference", [(sde_step_with_logprob, _sde_reference),
                                             (cps_step_with_logprob, _cps_reference)])
def test_given_prev_sample_is_scored_and_ratio_is_exactly_one(step, reference):
    x, v = _inputs()
    given = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.4, 0.1])
    lp1 = step(v, x, sigma, sigma_next, 0.7, prev_sample=given).log_prob
    out2 = step(v, x, sigma, sigma_next, 0.7, prev_sample=given)
    torch.testing.assert_close(out2.prev_sample, given, rtol=0, atol=0)  # no noise drawn
    mu, std = reference(x, v, sigma, sigma_next, 0.7)
    torch.testing.assert_close(out2.log_prob.double(), _ref_log_prob(given, mu, std), rtol=1e-5, atol=1e-5)
    # Same weights, same sample -> PPO ratio exactly 1, not just close.
    assert torch.equal(torch.exp(out2.log_prob - lp1), torch.ones(B))


def test_noise_level_zero_reproduces_diffusers_euler_steps():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(6)
    x, _ = _inputs()
    ours, theirs = x.clone(), x.clone()
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(scheduler.timesteps):
        # A stand-in "model" whose velocity depends on the current latent, so errors compound.
        v_ours, v_theirs = w - 0.5 * ours, w - 0.5 * theirs
        s, s_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        out = sde_step_with_logprob(v_ours, ours, s, s_next, noise_level=0.0)
        assert torch.equal(out.log_prob, torch.zeros(B)) and torch.equal(out.std, torch.zeros(B, 1, 1, 1))
        ours = out.prev_sample
        theirs = scheduler.step(v_theirs, t, theirs).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours, x)  # the loop actually moved the latent


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sigma_one_and_last_step_are_finite(kind):
    x, v = _inputs()
    # First step of a real schedule (sigma = 1), per-sample mixed with an ordinary level, and the
    # last step (sigma_next = 0).
    cases = [(1.0, 0.9), (torch.tensor([1.0, 0.5, 1.0]), torch.tensor([0.8, 0.3, 0.95])), (0.1, 0.0)]
    for sigma, sigma_next in cases:
        out = step_with_logprob(kind, v, x, sigma, sigma_next, 0.7,
                                generator=torch.Generator().manual_seed(0))
        for name, value in out._asdict().items():
            assert torch.isfinite(value).all(), (kind, sigma, name)
    # The sde guard: at sigma = 1, std_sigma = a * sqrt(1 / (1 - sigma_next)), times sqrt(-dt).
    out = sde_step_with_logprob(v, x, 1.0, 0.9, 0.7)
    expected = 0.7 * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1)
    torch.testing.assert_close(out.std, torch.full((B, 1, 1, 1), expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_bf16_inputs_are_computed_in_float32(kind):
    x, v = _inputs(dtype=torch.bfloat16)
    out = step_with_logprob(kind, v, x, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.bfloat16
    assert out.log_prob.dtype == out.mean.dtype == out.std.dtype == torch.float32
    # The mean is the float32 computation on the (exactly representable) bf16 values.
    ref = step_with_logprob(kind, v.float(), x.float(), 0.8, 0.6, 0.7,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mean, ref.mean) and torch.equal(out.log_prob, ref.log_prob)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_generator_seed_controls_the_noise(kind):
    x, v = _inputs()

    def draw(seed):
        return step_with_logprob(kind, v, x, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1).prev_sample, draw(1).prev_sample)
    assert not torch.allclose(draw(1).prev_sample, draw(2).prev_sample)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_given_noise_is_the_generators_draw_and_splits_by_row(kind):
    """`noise` replaces the generator's draw exactly, so a caller may draw it per row: one step
    over B rows equals B one-row steps with those rows' noise, bit for bit."""
    x, v = _inputs()
    from_generator = step_with_logprob(kind, v, x, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    given = step_with_logprob(kind, v, x, 0.8, 0.6, 0.7, noise=noise)
    for field in SDEStep._fields:
        assert torch.equal(getattr(given, field), getattr(from_generator, field)), field
    rows = [step_with_logprob(kind, v[i:i + 1], x[i:i + 1], 0.8, 0.6, 0.7, noise=noise[i:i + 1]) for i in range(B)]
    torch.testing.assert_close(torch.cat([r.prev_sample for r in rows]), given.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r.log_prob for r in rows]), given.log_prob, rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 10, 40])
def test_shifted_sigmas_equal_diffusers_schedule(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas = shifted_sigmas(num_steps, shift)
    assert sigmas.shape == (num_steps + 1,) and sigmas.dtype == torch.float32
    assert torch.equal(sigmas, scheduler.sigmas)


def test_gaussian_kl_same_std():
    mean = torch.randn(SHAPE)
    std = torch.tensor([0.5, 1.0, 2.0]).reshape(B, 1, 1, 1)
    assert torch.equal(gaussian_kl_same_std(mean, mean.clone(), std), torch.zeros(B))
    # Means differ by 1 everywhere: KL = 1 / (2 std^2) = 2, 0.5, 0.125 in every element.
    kl = gaussian_kl_same_std(mean + 1, mean, std)
    torch.testing.assert_close(kl, torch.tensor([2.0, 0.5, 0.125]))
    assert kl.dtype == torch.float32


@pytest.mark.parametrize("sigma, sigma_next", SIGMAS)
def test_cps_log_prob_matches_float64_reference(sigma, sigma_next):
    x, v = _inputs()
    out = cps_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(4))
    mu, std = _cps_reference(x, v, sigma, sigma_next, 0.7)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).double()
    torch.testing.assert_close(out.prev_sample.double(), mu + std * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.double(), std, rtol=1e-6, atol=1e-7)
    # Per-sample sigma_next = 0 is a deterministic last step: log_prob 0 there by convention.
    positive = std.reshape(-1) > 0
    expected = torch.where(positive, _ref_log_prob(out.prev_sample, mu, std.clamp_min(1e-12)), 0.0)
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


def test_cps_noise_level_zero_is_deterministic_ddim():
    x, v = _inputs()
    a = cps_step_with_logprob(v, x, 0.8, 0.6, 0.0, generator=torch.Generator().manual_seed(1))
    b = cps_step_with_logprob(v, x, 0.8, 0.6, 0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, torch.zeros(B))
    # DDIM on the flow parametrisation: x' = (1 - s') x0_hat + s' eps_hat.
    x0_hat, eps_hat = x - 0.8 * v, x + 0.2 * v
    torch.testing.assert_close(a.prev_sample, 0.4 * x0_hat + 0.6 * eps_hat)


def test_step_with_logprob_dispatches_and_rejects_unknown_kind():
    x, v = _inputs()
    for kind, fn in [("sde", sde_step_with_logprob), ("cps", cps_step_with_logprob)]:
        got = step_with_logprob(kind, v, x, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
        want = fn(v, x, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
        assert isinstance(got, SDEStep) and torch.equal(got.prev_sample, want.prev_sample)
    with pytest.raises(ValueError, match="'sde'"):
        step_with_logprob("ddim", v, x, 0.8, 0.6, 0.7)
