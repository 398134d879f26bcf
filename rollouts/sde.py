"""One stochastic denoising step of a flow-matching decoder, with the log-prob GRPO needs.

Convention (SD3 / diffusers `FlowMatchEulerDiscreteScheduler`): x_sigma = (1 - sigma) x0 + sigma eps,
the model predicts the velocity v = eps - x0, sampling runs sigma from 1 (noise) down to 0 (data).
A step goes from level sigma to sigma_next < sigma, so dt = sigma_next - sigma < 0.

Two samplers, one signature (`step_with_logprob` dispatches):
  - "sde": Flow-GRPO's SDE (Liu et al. 2025, eq. 9; UAE eq. 4), `sde_step_with_logprob`.
  - "cps": coefficients-preserving sampling (Wang & Yu 2025, Flow-CPS), `cps_step_with_logprob`.
With noise_level = 0 both are deterministic (Euler / DDIM), so evaluation and rollouts share code.

Everything is computed in float32 whatever the model dtype: bf16 loses the tiny (x' - mu) residuals
the log-prob is made of, and the PPO ratio exp(lp_new - lp_old) amplifies any such error.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

Sigma = Union[float, Tensor]  # python float, 0-d tensor or per-sample (B,) tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class SDEStep(NamedTuple):
    """Result of one denoising step; B is the batch size, `...` the latent dims.

    prev_sample: (B, ...) the next latent x' (at level sigma_next), in the input sample's dtype.
    log_prob:    (B,) float32, log N(x'; mean, std^2) averaged over the latent dims (for "cps" with
                 Flow-GRPO's convention: -(x' - mean)^2 averaged, see `cps_step_with_logprob`).
    mean:        (B, ...) float32, mean of the transition Gaussian.
    std:         (B, 1, ..., 1) float32, std of the transition Gaussian; for "sde" that is
                 a * sqrt(sigma / (1 - sigma)) * sqrt(-dt), for "cps" sigma_next * sin(a * pi / 2).
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def _column(s: Sigma, sample: Tensor) -> Tensor:
    """Float, 0-d or (B,) noise level -> float32 (B, 1, ..., 1) on the sample's device."""
    batch, ndim = sample.shape[0], sample.ndim
    s = torch.as_tensor(s, dtype=torch.float32, device=sample.device).reshape(-1)
    if s.numel() not in (1, batch):
        raise ValueError(
            f"sigma must be a float, a 0-d tensor or have shape ({batch},); got {s.numel()} values")
    return s.expand(batch).reshape(batch, *([1] * (ndim - 1)))


def _gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Full log N(x; mean, std^2), averaged over non-batch dims -> (B,).

    Samples whose std is 0 (a deterministic transition) get log_prob 0 instead of NaN/inf.
    """
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    # x is detached: it is an observed action; gradients reach the policy through `mean` only.
    lp = -((x.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    lp = torch.where(positive, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _flow_grpo_cps_log_prob(x: Tensor, mean: Tensor) -> Tensor:
    """Flow-GRPO's CPS "log-prob" -(x - mean)^2, averaged over non-batch dims -> (B,): the Gaussian
    exponent without its 1 / (2 std^2) and without the normalising constants
    (sd3_sde_with_logprob.py, sde_type 'cps': "remove all constants"). Defined for std = 0 too."""
    lp = -((x.detach() - mean) ** 2)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _finish(mean: Tensor, std: Tensor, sample: Tensor, prev_sample: Optional[Tensor],
            generator: Optional[torch.Generator], noise: Optional[Tensor] = None,
            log_prob: Literal["gaussian", "flow_grpo"] = "gaussian") -> SDEStep:
    """x' = mean + std * noise (noise from `generator` unless given), or `prev_sample`; scored by
    the full Gaussian density ("gaussian") or Flow-GRPO's CPS -(x' - mean)^2 ("flow_grpo")."""
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=sample.device, dtype=torch.float32)
        x_next = mean + std * noise.to(device=sample.device, dtype=torch.float32)
    else:
        x_next = prev_sample.to(device=sample.device, dtype=torch.float32)
    lp = _flow_grpo_cps_log_prob(x_next, mean) if log_prob == "flow_grpo" else _gaussian_log_prob(x_next, mean, std)
    return SDEStep(x_next.to(sample.dtype), lp, mean, std)


def _deterministic(mean: Tensor, sample: Tensor, prev_sample: Optional[Tensor]) -> SDEStep:
    """noise_level = 0: a point mass has no density, so log_prob and std are zeros by convention."""
    x_next = mean if prev_sample is None else prev_sample.to(device=sample.device, dtype=torch.float32)
    zeros = torch.zeros(sample.shape[0], dtype=torch.float32, device=sample.device)
    std = torch.zeros((sample.shape[0],) + (1,) * (sample.ndim - 1), dtype=torch.float32,
                      device=sample.device)
    return SDEStep(x_next.to(sample.dtype), zeros, mean, std)


def sde_step_with_logprob(velocity: Tensor, sample: Tensor, sigma: Sigma, sigma_next: Sigma,
                          noise_level: float, prev_sample: Optional[Tensor] = None,
                          generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None) -> SDEStep:
    """Flow-GRPO SDE step from sigma to sigma_next (Flow-GRPO eq. 9; UAE eq. 4).

    With a = noise_level, dt = sigma_next - sigma < 0 and x = sample, v = velocity, both (B, ...):
        std_sigma = a * sqrt(sigma / (1 - sigma))
        mu        = x + dt * (v + std_sigma^2 / (2 sigma) * (x + (1 - sigma) v))
        x'        = mu + std_sigma * sqrt(-dt) * noise,        noise ~ N(0, I)
        log_prob  = mean over latent dims of log N(x'; mu, std_sigma^2 * (-dt))   (constants included)

    sigma = 1 guard: 1 - sigma is replaced by 1 - sigma_next in std_sigma's denominator for those
    samples (as Flow-GRPO does with sigmas[1] on the first step), so the step stays finite.
    The last step (sigma_next = 0) is taken like any other: dt = -sigma, the std is positive.
    noise_level = 0 gives the Euler step x' = x + dt * v (diffusers' scheduler step) with
    log_prob = 0 and std = 0.
    If `prev_sample` is given no noise is drawn and log_prob is the density of that sample, so
    recomputing it with unchanged weights reproduces the rollout's log_prob bit for bit.
    `generator` must live on the sample's device. `noise` (B, ...): the standard normal draw to use
    instead of one from `generator` (callers that keep one generator per row, so that a row's sample
    does not depend on the batch it is drawn in). sigma, sigma_next: float, 0-d or (B,), with
    0 <= sigma_next < sigma <= 1 (sigma = 0 would divide by zero; it is never a step's start).
    """
    x, v = sample.float(), velocity.float()
    s, s_next = _column(sigma, x), _column(sigma_next, x)
    dt = s_next - s  # (B, 1, ..., 1), negative
    if noise_level == 0:
        return _deterministic(x + dt * v, sample, prev_sample)
    std_sigma = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
    mean = x + dt * (v + std_sigma**2 / (2 * s) * (x + (1 - s) * v))
    return _finish(mean, std_sigma * torch.sqrt(-dt), sample, prev_sample, generator, noise)


def cps_step_with_logprob(velocity: Tensor, sample: Tensor, sigma: Sigma, sigma_next: Sigma,
                          noise_level: float, prev_sample: Optional[Tensor] = None,
                          generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
                          log_prob: Literal["gaussian", "flow_grpo"] = "gaussian") -> SDEStep:
    """Coefficients-preserving step from sigma to sigma_next (Wang & Yu 2025, Flow-CPS).

    Re-noises the predicted clean latent so that x' has exactly the signal/noise coefficients
    (1 - sigma_next, sigma_next) of the forward process, instead of the SDE's excess noise:
        x0_hat    = x - sigma * v                       predicted data
        eps_hat   = x + (1 - sigma) * v                 predicted noise
        std       = sigma_next * sin(a * pi / 2)
        mean      = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat
        x'        = mean + std * noise
    Mean, std and sample are Flow-GRPO's (sd3_sde_with_logprob.py, sde_type 'cps'). The log-prob
    (`log_prob`, recipe `rollout.trajectory.cps_logprob`), averaged over the latent dims:
      "gaussian" (default):  log N(x'; mean, std^2), constants included, on the scale of "sde";
      "flow_grpo":           -(x' - mean)^2, Flow-GRPO's (constants AND the variance dropped).
    The two are NOT interchangeable in GRPO: the constants cancel in a log-ratio but the variance
    does not, log-ratio_gaussian = log-ratio_flow_grpo / (2 std^2), so the PPO ratio under
    "flow_grpo" is the "gaussian" one raised to the power 2 std^2 (a step-dependent temperature:
    different clipping, and per-step gradients scaled by 2 std^2).
    The last step (sigma_next = 0) has std = 0 for any noise level and x' = mean = x0_hat:
    "gaussian" gives it log_prob 0 (a point mass; no gradient), "flow_grpo" gives it
    -(x' - x0_hat_theta)^2 as Flow-GRPO does (0 at the sampling weights, but a gradient once they move).
    noise_level = 0 gives the deterministic DDIM step (log_prob 0 and std 0 under either
    convention: an ODE step is never scored). Other arguments as in `sde_step_with_logprob`.
    """
    x, v = sample.float(), velocity.float()
    s, s_next = _column(sigma, x), _column(sigma_next, x)
    x0_hat, eps_hat = x - s * v, x + (1 - s) * v
    std = s_next * math.sin(noise_level * math.pi / 2)
    # sigma_next^2 - std^2 = (sigma_next cos)^2 >= 0 in exact arithmetic; clamp float round-off.
    mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * eps_hat
    if noise_level == 0:
        return _deterministic(mean, sample, prev_sample)
    if log_prob not in ("gaussian", "flow_grpo"):
        raise ValueError(f"unknown CPS log_prob {log_prob!r}; use 'gaussian' or 'flow_grpo'")
    return _finish(mean, std, sample, prev_sample, generator, noise, log_prob)


def step_with_logprob(kind: Literal["sde", "cps"], velocity: Tensor, sample: Tensor, sigma: Sigma,
                      sigma_next: Sigma, noise_level: float, prev_sample: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
                      cps_logprob: Literal["gaussian", "flow_grpo"] = "gaussian") -> SDEStep:
    """Dispatch to `sde_step_with_logprob` ("sde") or `cps_step_with_logprob` ("cps", scored by
    `cps_logprob`; the "sde" step always has the full Gaussian density, as Flow-GRPO's)."""
    if kind == "sde":
        return sde_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample, generator, noise)
    if kind == "cps":
        return cps_step_with_logprob(velocity, sample, sigma, sigma_next, noise_level, prev_sample, generator, noise,
                                     log_prob=cps_logprob)
    raise ValueError(f"unknown step kind {kind!r}; use 'sde' (Flow-GRPO) or 'cps' (Flow-CPS)")


def shift_sigma(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift, shift(t) = shift * t / (1 + (shift - 1) * t): more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def shifted_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Tensor:
    """SD3's shifted schedule, float32 (num_steps + 1,), from 1 down to a trailing 0.

    Equals `FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=...)` after
    `set_timesteps(num_steps)`, `.sigmas`:
        t_i     = linspace(1, sigma_min, num_steps)     sigma_min = shift(1 / num_train_timesteps)
        sigma_i = shift(t_i),   shift(t) = shift * t / (1 + (shift - 1) * t)
    Note sigma_min is itself shifted before the second shift: diffusers takes it from its training
    schedule, which is already shifted; we mirror that (and its float32 / float64 rounding) exactly.
    """
    # 1) sigma_min of the (shifted) training schedule, in float32 as diffusers builds it.
    sigma_min = shift_sigma(torch.tensor(1.0, dtype=torch.float32) / num_train_timesteps, shift).item()
    # 2) linearly spaced timesteps in float64 (numpy's linspace in diffusers), then shifted.
    t = torch.linspace(num_train_timesteps, sigma_min * num_train_timesteps, num_steps,
                       dtype=torch.float64) / num_train_timesteps
    # 3) cast to float32 and append the terminal 0.
    return torch.cat([shift_sigma(t, shift).float(), torch.zeros(1)])


def gaussian_kl_same_std(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, averaged over non-batch dims -> (B,).

    With equal variances the closed form is ||mean - mean_ref||^2 / (2 std^2) (Flow-GRPO's KL
    penalty). mean, mean_ref: (B, ...); std: broadcastable, e.g. SDEStep.std (B, 1, ..., 1), > 0.
    """
    kl = (mean.float() - mean_ref.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def kl_std(kind: Literal["sde", "cps"], std: Tensor, sigma: Sigma, sigma_next: Sigma,
           kl_scale: Literal["flow_grpo", "transition"]) -> Tensor:
    """The std s that the decoder KL ||mu_theta - mu_ref||^2 / (2 s^2) divides by
    (`gaussian_kl_same_std`); std: the step's `SDEStep.std` (B, 1, ..., 1).

    "transition": s = the transition std, so the KL is the true KL of the two transition
        Gaussians: for "sde" std_sigma * sqrt(-dt), for "cps" sigma_next * sin(a pi / 2).
    "flow_grpo": Flow-GRPO's penalty (train_sd3.py: mean over latent dims of
        (mean - mean_ref)^2 / (2 std_dev_t^2)), whose std_dev_t is what its step function returns:
        for "sde" the SDE coefficient std_sigma = a sqrt(sigma / (1 - sigma)) WITHOUT sqrt(-dt),
        so that KL = transition KL * |dt|; for "cps" the transition std itself (its CPS step
        returns std_dev_t = sigma_next sin(a pi / 2)), so both scales agree there.
    """
    if kl_scale == "transition" or kind == "cps":
        return std
    if kl_scale != "flow_grpo":
        raise ValueError(f"unknown kl_scale {kl_scale!r}; use 'flow_grpo' or 'transition'")
    s, s_next = _column(sigma, std), _column(sigma_next, std)
    return std / torch.sqrt(s - s_next)  # std_sigma * sqrt(-dt) / sqrt(-dt)
