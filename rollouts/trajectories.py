"""Denoising rollouts of the decoder policy (UAE stage 3, eq. 4; Flow-GRPO's SDE sampling).

`denoise` is the single sampler: with `noise_level = 0` it is the deterministic ODE (Euler) used
for renders and evaluation; with `noise_level > 0` inside a window of steps it is the SDE whose
per-step log-probs the GRPO ratio needs. `sample_trajectories` runs G trajectories per condition
from one shared initial noise and keeps latents, next latents and log-probs of the trained steps
only (the rest are never needed again).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from rl.models.decoder import Decoder
from rollouts.sde import shifted_sigmas, step_with_logprob


class Trajectory(NamedTuple):
    """G SDE trajectories for each of B conditions (N = B * G rows, condition-major)."""

    cond: torch.Tensor  # (N, L, D) decoder conditioning from the frozen encoder + connector
    cond_mask: torch.Tensor  # (N, L) bool
    pooled: torch.Tensor  # (N, P)
    latents: torch.Tensor  # (N, S, C, h, w) x_j at each trained step j
    next_latents: torch.Tensor  # (N, S, C, h, w) x_{j+1} actually sampled
    log_probs: torch.Tensor  # (N, S) log p(x_{j+1} | x_j) under the rollout policy
    sigmas: torch.Tensor  # (S,) sigma_j of the trained steps
    sigmas_next: torch.Tensor  # (S,) sigma_{j+1}
    steps: torch.Tensor  # (S,) indices j of the trained steps in the schedule
    images: torch.Tensor  # (N, 3, H, W) final decoded images in [0, 1]
    group_size: int
    version: int


def choose_window(num_steps: int, window: int | None, window_range: tuple[int, int] | None,
                  rng: random.Random) -> list[int]:
    """Steps that are stochastic and trained: a window of `window` consecutive steps.

    The window's start is drawn uniformly in `window_range` (clamped so the window fits);
    None trains every step (plain Flow-GRPO).
    """
    if window is None or window >= num_steps:
        return list(range(num_steps))
    lo, hi = window_range if window_range is not None else (0, num_steps - window + 1)
    lo, hi = max(0, lo), min(hi, num_steps - window + 1)
    if hi <= lo:
        raise ValueError(f"sde window of {window} steps does not fit in range {window_range} of {num_steps} steps")
    start = rng.randrange(lo, hi)
    return list(range(start, start + window))


def denoise(decoder: Decoder, noise: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
            pooled: torch.Tensor, num_steps: int, *, noise_level: float = 0.0,
            sde_steps: list[int] | None = None, sampler: str = "sde", generator: torch.Generator | None = None,
            grad_last: int = 0) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Integrate from noise (sigma = 1) to a clean latent along SD3's shifted schedule.

    Steps in `sde_steps` are SDE steps with `noise_level`; all others are ODE steps.
    `grad_last = K` keeps autograd on for the last K steps only (stage 1, UAE eq. 3).
    Returns (x_0, {j: (x_j, x_{j+1}, log_prob_j)} for the SDE steps).
    """
    sigmas = shifted_sigmas(num_steps, decoder.shift).to(noise.device)
    sde = set(sde_steps or [])
    x = noise
    record: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    n = x.shape[0]
    for j in range(num_steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and j >= num_steps - grad_last):
            sigma = sigmas[j].expand(n)
            v = decoder.velocity(x, sigma, cond, pooled, cond_mask)
            a = noise_level if j in sde else 0.0
            out = step_with_logprob(sampler, v, x, sigmas[j], sigmas[j + 1], a, generator=generator)
            if j in sde:
                record[j] = (x.detach(), out.prev_sample.detach(), out.log_prob.detach())
            x = out.prev_sample
    return x, record


@torch.no_grad()
def render(decoder: Decoder, cond: torch.Tensor, cond_mask: torch.Tensor, pooled: torch.Tensor,
           num_steps: int, seeds: list[int]) -> torch.Tensor:
    """Deterministic ODE renders (N, 3, H, W): the initial noise of row i comes from seeds[i]."""
    noise = initial_noise(decoder, seeds, cond.device)
    latents, _ = denoise(decoder, noise, cond, cond_mask, pooled, num_steps)
    return decoder.decode(latents)


def initial_noise(decoder: Decoder, seeds: list[int], device: torch.device) -> torch.Tensor:
    """(N, C, h, w) standard normal noise, row i drawn from its own seed (reproducible per image)."""
    shape = decoder.latent_shape(1)[1:]
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


@torch.no_grad()
def sample_trajectories(decoder: Decoder, cond: torch.Tensor, cond_mask: torch.Tensor, pooled: torch.Tensor,
                        group_size: int, *, num_steps: int, noise_level: float, seed: int,
                        sde_window: int | None = None, window_range: tuple[int, int] | None = None,
                        sampler: str = "sde", version: int = 0) -> Trajectory:
    """G SDE trajectories per condition from one shared initial noise per group (Flow-GRPO).

    cond (B, L, D), cond_mask (B, L), pooled (B, P): one condition per source image.
    """
    b, g = cond.shape[0], group_size
    rng = random.Random(seed)
    steps = choose_window(num_steps, sde_window, window_range, rng)
    # Same initial noise inside a group: the group's spread comes from the SDE steps alone.
    noise = initial_noise(decoder, [seed * 1000 + i for i in range(b)], cond.device).repeat_interleave(g, 0)
    cond_n, mask_n, pooled_n = (t.repeat_interleave(g, 0) for t in (cond, cond_mask, pooled))
    gen = torch.Generator(device=cond.device).manual_seed(seed)
    x0, rec = denoise(decoder, noise, cond_n, mask_n, pooled_n, num_steps, noise_level=noise_level,
                      sde_steps=steps, sampler=sampler, generator=gen)
    sigmas = shifted_sigmas(num_steps, decoder.shift)
    return Trajectory(
        cond=cond_n.cpu(), cond_mask=mask_n.cpu(), pooled=pooled_n.cpu(),
        latents=torch.stack([rec[j][0] for j in steps], dim=1).cpu(),
        next_latents=torch.stack([rec[j][1] for j in steps], dim=1).cpu(),
        log_probs=torch.stack([rec[j][2] for j in steps], dim=1).cpu(),
        sigmas=sigmas[steps].clone(), sigmas_next=sigmas[[j + 1 for j in steps]].clone(),
        steps=torch.tensor(steps), images=decoder.decode(x0).cpu(), group_size=g, version=version,
    )


def step_logprobs(decoder: Decoder, traj: Trajectory, noise_level: float, sampler: str = "sde",
                  rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute (log_prob (n, S), mean (n, S, ...), std (S,...)) of the stored transitions under
    the decoder's current adapter state (grad if enabled). The learner's side of eq. 4."""
    rows = rows or slice(None)
    device = next(decoder.transformer.parameters()).device
    cond, mask, pooled = (t[rows].to(device) for t in (traj.cond, traj.cond_mask, traj.pooled))
    lps, means, stds = [], [], []
    for s in range(traj.latents.shape[1]):
        x = traj.latents[rows, s].to(device)
        n = x.shape[0]
        v = decoder.velocity(x, traj.sigmas[s].expand(n).to(device), cond, pooled, mask)
        out = step_with_logprob(sampler, v, x, float(traj.sigmas[s]), float(traj.sigmas_next[s]), noise_level,
                                prev_sample=traj.next_latents[rows, s].to(device))
        lps.append(out.log_prob)
        means.append(out.mean)
        stds.append(out.std)
    return torch.stack(lps, 1), torch.stack(means, 1), torch.stack(stds, 1)
