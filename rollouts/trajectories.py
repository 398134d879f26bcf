"""Denoising rollouts of the decoder policy (UAE stage 3, eq. 4; Flow-GRPO's SDE sampling).

`denoise` is the single sampler: with `noise_level = 0` it is the deterministic ODE (Euler) used
for renders and evaluation (`render`, with `eval_steps` for evaluation); with `noise_level > 0` on
a chosen set of steps it is the SDE whose per-step log-probs the GRPO ratio needs.
`sample_trajectories` runs G trajectories per condition from one shared initial noise and keeps
latents, next latents, log-probs and sigmas of the trained steps only (the rest are never needed
again). `step_logprobs` is the learner's side: the same step, scored on the stored transitions,
for any subset of rows and steps (the learner back-propagates one step and micro-batch at a time).

Memory is bounded by a micro-batch (shared/DESIGN.md, "Scale"): with `micro_batch_size`, samplers
run that many rows at a time through the transformer and the VAE. The results do not depend on it:
the initial noise of a row comes from its condition's seed and its SDE noise from a generator of
its own (`row_generator`), never from a stream shared across the batch.

Which steps are trained (`choose_steps`, drawn per rollout from its seed) and stochastic
(`stochastic_steps`):
  - all of them, or
  - a window of `sde_window` consecutive steps lying inside `window_range` (Flow-GRPO-Fast), or
  - a random subset of round(timestep_fraction * num_steps) steps,
    where every other step is an ODE step, so the group's spread comes from the trained steps alone;
  - or Flow-GRPO's prefix, the first int(timestep_fraction * num_steps) steps, with every step SDE.

Classifier-free guidance (`guided_velocity`) is one batched transformer call over
[unconditional; conditional] rows, v = v_u + s (v_c - v_u), in every path that asks for it; the
learner may stop the gradient through v_u (`cfg_detach_uncond`; Flow-GRPO does not).
"""

from __future__ import annotations

import random
from typing import NamedTuple, Sequence

import numpy as np
import torch

from rl.grpo import shard_rows
from rl.models.decoder import Decoder
from rollouts.sde import shifted_sigmas, step_with_logprob


class Uncond(NamedTuple):
    """The unconditional condition of classifier-free guidance: the connector's output for an
    empty caption (SD3's negative prompt is its text encoders' output for ""; the connector
    replaces those encoders, so it produces ours). One row, broadcast over the batch."""

    cond: torch.Tensor  # (1, L_u, D)
    mask: torch.Tensor  # (1, L_u) bool
    pooled: torch.Tensor  # (1, P)


class Trajectory(NamedTuple):
    """G SDE trajectories for each of B conditions (N = B * G rows, condition-major; S trained steps)."""

    cond: torch.Tensor  # (N, L, D) decoder conditioning from the frozen encoder + connector
    cond_mask: torch.Tensor  # (N, L) bool
    pooled: torch.Tensor  # (N, P)
    latents: torch.Tensor  # (N, S, C, h, w) x_j at each trained step j
    next_latents: torch.Tensor  # (N, S, C, h, w) x_{j+1} actually sampled
    log_probs: torch.Tensor  # (N, S) log p(x_{j+1} | x_j) under the policy the learner trains (see sample_trajectories)
    sigmas: torch.Tensor  # (S,) sigma_j of the trained steps
    sigmas_next: torch.Tensor  # (S,) sigma_{j+1}
    steps: torch.Tensor  # (S,) indices j of the trained steps in the schedule, increasing
    images: torch.Tensor | None  # (N, 3, H, W) final decoded images in [0, 1]; None once rendered out
    group_size: int
    version: int
    uncond: Uncond | None = None  # the CFG unconditional condition the rollout used (None: no CFG)
    clean_latents: torch.Tensor | None = None  # (N, C, h, w) final latents x_0 (DiffusionNFT's training data)


# ----------------------------------------------------------------------------------------------
# which steps are stochastic and trained
# ----------------------------------------------------------------------------------------------
def choose_window(num_steps: int, window: int | None, window_range: tuple[int, int] | None,
                  rng: random.Random) -> list[int]:
    """Steps that are stochastic and trained: a window of `window` consecutive steps.

    `window_range` = [lo, hi) bounds the WHOLE window, as Flow-GRPO-Fast's sde_window_range does
    (`start = randint(lo, hi - window)`): the start is drawn uniformly in {lo, ..., hi - window}, so
    range (0, 6) with a window of 3 gives starts {0, 1, 2, 3}. hi is clamped to num_steps; None:
    (0, num_steps). No window (None) trains every step (plain Flow-GRPO).
    """
    if window is None or window >= num_steps:
        return list(range(num_steps))
    lo, hi = window_range if window_range is not None else (0, num_steps)
    lo, hi = max(0, lo), min(hi, num_steps)
    if hi - lo < window:
        raise ValueError(f"sde window of {window} steps does not fit in range {window_range} of {num_steps} steps")
    start = rng.randint(lo, hi - window)
    return list(range(start, start + window))


def choose_steps(num_steps: int, rng: random.Random, *, window: int | None = None,
                 window_range: tuple[int, int] | None = None,
                 timestep_fraction: float | None = None, selection: str | None = None) -> list[int]:
    """The trained steps of one rollout, increasing (`stochastic_steps` says which are SDE steps).

    `selection` (recipe `rollout.trajectory.step_selection`; None: inferred, "window" when a
    window is given, "random_subset" when a fraction is, "all" otherwise):
      "all":           every step.
      "window":        `choose_window` (consecutive steps, drawn inside `window_range`).
      "random_subset": k = max(1, round(f * num_steps)) distinct steps drawn uniformly (f =
                       `timestep_fraction`); the untrained steps are ODE steps.
      "flow_grpo":     the first max(1, int(f * num_steps)) steps (Flow-GRPO's train_sd3.py trains
                       timesteps[:int(num_steps * timestep_fraction)]: 9 of 10 at f = 0.99); the
                       untrained steps are still SDE steps.
    """
    if selection is None:
        if window is not None and timestep_fraction is not None:
            raise ValueError("sde_window and timestep_fraction are mutually exclusive; set one to None")
        selection = "window" if window is not None else "random_subset" if timestep_fraction is not None else "all"
    if selection in ("random_subset", "flow_grpo"):
        if timestep_fraction is None or not 0 < timestep_fraction <= 1:
            raise ValueError(f"step selection {selection!r} needs timestep_fraction in (0, 1], got {timestep_fraction}")
        if window is not None:
            raise ValueError(f"step selection {selection!r} takes no sde_window (got {window}); set it to None")
    if selection == "all":
        return list(range(num_steps))
    if selection == "window":
        return choose_window(num_steps, window, window_range, rng)
    if selection == "random_subset":
        k = max(1, round(timestep_fraction * num_steps))
        return sorted(rng.sample(range(num_steps), k))
    if selection == "flow_grpo":
        return list(range(max(1, int(num_steps * timestep_fraction))))
    raise ValueError(f"unknown step selection {selection!r}; use 'all', 'window', 'random_subset' or 'flow_grpo'")


def stochastic_steps(num_steps: int, trained: list[int], selection: str | None = None) -> list[int]:
    """The SDE steps of a rollout whose trained steps are `trained`: all steps for "flow_grpo"
    (Flow-GRPO samples every step with the SDE and trains a prefix), else the trained ones
    (every other step is an ODE step, so the group's spread comes from the trained steps alone)."""
    return list(range(num_steps)) if selection == "flow_grpo" else list(trained)


# ----------------------------------------------------------------------------------------------
# the velocity, with or without classifier-free guidance
# ----------------------------------------------------------------------------------------------
def _pad_to(cond: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (n, L, D) / (n, L) to `length` positions with masked-out zeros. Conditions from
    `Models.condition` already share one fixed length (padding is not neutral in SD3's joint
    attention: shared/DESIGN.md, "Conditioning independent of the batch"), so this is a no-op for
    them; it only reconciles conditions built some other way."""
    extra = length - cond.shape[1]
    if extra <= 0:
        return cond, mask
    cond = torch.cat([cond, cond.new_zeros(cond.shape[0], extra, cond.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return cond, mask


def guided_velocity(decoder: Decoder, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                    cond_mask: torch.Tensor, pooled: torch.Tensor, uncond: Uncond | None = None,
                    cfg_scale: float = 1.0, doubled: tuple[torch.Tensor, ...] | None = None,
                    detach_uncond: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity with classifier-free guidance (Ho & Salimans 2022; SD3's sampler):

        v = v_u + s (v_c - v_u),   v_c = v_theta(x, sigma, c),  v_u = v_theta(x, sigma, empty caption)

    x (N, C, h, w), sigma (N,), cond (N, L, D), cond_mask (N, L), pooled (N, P); `uncond` one row.
    s = 1 (or no `uncond`): the conditional velocity alone, one pass over N rows. Otherwise ONE
    transformer call over 2N rows [unconditional; conditional] concatenated along the batch; both
    conditions have the fixed length of `Models.condition` (the empty caption's too), else they are
    right-padded to the longer one first (masked positions are zeros).
    `doubled`: that 2N-row condition if already built (`guidance_condition`).
    `detach_uncond` (recipe `rollout.trajectory.cfg_detach_uncond`): v = sg(v_u) + s (v_c - sg(v_u)),
    so the gradient reaches the weights through s * v_c only, as if v_u were computed under no_grad
    (the value is unchanged). False, Flow-GRPO's train_sd3.py: the gradient also flows through the
    unconditional half, scaled by (1 - s). The pass stays one batched call either way.
    Returns (v (N, C, h, w), v_c (N, C, h, w)); without guidance both are the same tensor.
    """
    if cfg_scale == 1.0:
        v = decoder.velocity(x, sigma, cond, pooled, cond_mask)
        return v, v
    c2, p2, m2 = doubled if doubled is not None else guidance_condition(cond, cond_mask, pooled, uncond, cfg_scale)
    v_u, v_c = decoder.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), c2, p2, m2).chunk(2)  # 2 x (N, ...)
    if detach_uncond:
        v_u = v_u.detach()
    return v_u + cfg_scale * (v_c - v_u), v_c


def guidance_condition(cond: torch.Tensor, cond_mask: torch.Tensor, pooled: torch.Tensor,
                       uncond: Uncond | None, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The 2N-row condition of a guided pass, (cond, pooled, mask) of [unconditional; conditional],
    both right-padded to the longer length; None without guidance (`cfg_scale` 1). The same at
    every denoising step: samplers build it once and pass it to `guided_velocity` as `doubled`."""
    if cfg_scale == 1.0:
        return None
    if uncond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional condition (`uncond`); "
                         "set rollout.trajectory.cfg_scale: 1.0 to sample without guidance")
    n = cond.shape[0]
    length = max(cond.shape[1], uncond.cond.shape[1])
    c, m = _pad_to(cond, cond_mask, length)
    uc, um = _pad_to(uncond.cond.to(c.device), uncond.mask.to(m.device), length)
    return (torch.cat([uc.expand(n, -1, -1).to(c.dtype), c]),
            torch.cat([uncond.pooled.to(pooled.device, pooled.dtype).expand(n, -1), pooled]),
            torch.cat([um.expand(n, -1).to(m.dtype), m]))


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
def denoise(decoder: Decoder, noise: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
            pooled: torch.Tensor, num_steps: int, *, noise_level: float = 0.0,
            sde_steps: list[int] | None = None, sampler: str = "sde", generator: torch.Generator | None = None,
            grad_last: int = 0, uncond: Uncond | None = None, cfg_scale: float = 1.0,
            cfg_in_training: bool = True, row_generators: Sequence[torch.Generator] | None = None,
            record_steps: list[int] | None = None, cps_logprob: str = "gaussian",
            ) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Integrate from noise (sigma = 1) to a clean latent along SD3's shifted schedule.

    noise (N, C, h, w); cond (N, L, D), cond_mask (N, L), pooled (N, P).
    Steps in `sde_steps` are SDE steps with `noise_level`; all others are ODE steps.
    `grad_last = K` keeps autograd on for the last K steps only (stage 1, UAE eq. 3).
    `uncond`, `cfg_scale`: classifier-free guidance, see `guided_velocity`. The recorded log-prob
    is under the guided velocity, or with `cfg_in_training=False` under the conditional velocity
    alone (the policy the learner then trains; the sample itself always follows the guided one).
    SDE noise: row i's from `row_generators[i]` when given (one generator per row, so a row's sample
    does not depend on the batch it is in), else from `generator` shared by the batch.
    `record_steps`: the steps whose transitions are returned (None: the SDE steps); each must be one.
    `cps_logprob`: the log-prob convention of the "cps" sampler (`rollouts.sde.cps_step_with_logprob`).
    Returns (x_0, {j: (x_j, x_{j+1}, log_prob_j)} for the recorded steps).
    """
    sigmas = shifted_sigmas(num_steps, decoder.shift).to(noise.device)
    sde = set(sde_steps or [])
    recorded = sde if record_steps is None else set(record_steps)
    if not recorded <= sde:
        raise ValueError(f"record_steps {sorted(recorded - sde)} are not SDE steps: only SDE steps have a log-prob")
    x = noise
    record: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    n = x.shape[0]
    doubled = guidance_condition(cond, cond_mask, pooled, uncond, cfg_scale)  # once, not per step
    for j in range(num_steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and j >= num_steps - grad_last):
            v, v_c = guided_velocity(decoder, x, sigmas[j].expand(n), cond, cond_mask, pooled, uncond, cfg_scale,
                                     doubled)
            a = noise_level if j in sde else 0.0
            eps = _row_noise(row_generators, x) if row_generators is not None and a > 0 else None
            out = step_with_logprob(sampler, v, x, sigmas[j], sigmas[j + 1], a, generator=generator, noise=eps,
                                    cps_logprob=cps_logprob)
            if j in recorded:
                log_prob = out.log_prob
                if not cfg_in_training and v_c is not v:
                    # Score the guided sample under the conditional policy the learner trains.
                    log_prob = step_with_logprob(sampler, v_c, x, sigmas[j], sigmas[j + 1], a,
                                                 prev_sample=out.prev_sample, cps_logprob=cps_logprob).log_prob
                record[j] = (x.detach(), out.prev_sample.detach(), log_prob.detach())
            x = out.prev_sample
    return x, record


def initial_noise(decoder: Decoder, seeds: list[int], device: torch.device) -> torch.Tensor:
    """(N, C, h, w) standard normal noise, row i drawn from its own seed (reproducible per image)."""
    shape = decoder.latent_shape(1)[1:]
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """The SDE noise generator of trajectory row `row` of the rollout seeded `seed`.

    Its seed is hashed from (seed, row) by numpy's SeedSequence: distinct rows and rollouts get
    unrelated streams, unrelated too to the initial noise's seeds `seed * 1000 + b` (a plain
    `seed * 1000 + row` would make row r's SDE noise the initial noise of condition r).
    """
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, row]  # SeedSequence takes non-negative words
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def _row_noise(generators: Sequence[torch.Generator], x: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) float32 standard normal noise, row i drawn from generators[i] (on x's device)."""
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=torch.float32)
                        for g in generators])


def micro_batches(n: int, micro_batch_size: int | None) -> list[slice]:
    """Row slices of at most `micro_batch_size` rows covering range(n) in order (None: one slice)."""
    size = n if micro_batch_size is None else micro_batch_size
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, max(size, 1))]


@torch.no_grad()
def render(decoder: Decoder, cond: torch.Tensor, cond_mask: torch.Tensor, pooled: torch.Tensor,
           num_steps: int, seeds: list[int], *, uncond: Uncond | None = None,
           cfg_scale: float = 1.0, micro_batch_size: int | None = None) -> torch.Tensor:
    """Deterministic ODE renders (N, 3, H, W) on cond's device: the initial noise of row i comes
    from seeds[i]. cond (N, L, D), cond_mask (N, L), pooled (N, P).

    `micro_batch_size` rows at a time through the transformer and the VAE decode (None: all N);
    the renders do not depend on it. The same function serves caption renders (`render_steps`) and
    evaluation (`eval_steps`, more steps than training, Flow-GRPO's 40 vs 10): only `num_steps` differs.
    """
    images = []
    for rows in micro_batches(cond.shape[0], micro_batch_size):
        noise = initial_noise(decoder, seeds[rows], cond.device)
        latents, _ = denoise(decoder, noise, cond[rows], cond_mask[rows], pooled[rows], num_steps,
                             uncond=uncond, cfg_scale=cfg_scale)
        images.append(decoder.decode(latents))
    return torch.cat(images)


@torch.no_grad()
def sample_trajectories(decoder: Decoder, cond: torch.Tensor, cond_mask: torch.Tensor, pooled: torch.Tensor,
                        group_size: int, *, num_steps: int, noise_level: float, seed: int,
                        sde_window: int | None = None, window_range: tuple[int, int] | None = None,
                        timestep_fraction: float | None = None, sampler: str = "sde", version: int = 0,
                        uncond: Uncond | None = None, cfg_scale: float = 1.0,
                        cfg_in_training: bool = True, micro_batch_size: int | None = None,
                        step_selection: str | None = None, cps_logprob: str = "gaussian",
                        ode: bool = False) -> Trajectory:
    """G SDE trajectories per condition from one shared initial noise per group (Flow-GRPO).

    cond (B, L, D), cond_mask (B, L), pooled (B, P): one condition per source image; N = B * G
    rows, condition-major (row r follows condition r // G).
    `seed` fixes the trained steps (`choose_steps` with `step_selection`; the SDE steps are
    `stochastic_steps`), the initial noise (condition b: seed * 1000 + b)
    and the SDE noise (row r: `row_generator(seed, r)`).
    Log-probs are stored under the policy the learner will score: the guided velocity, or the
    conditional one when `cfg_in_training` is False (see `denoise`), and, for the "cps" sampler,
    in the `cps_logprob` convention (the learner must score with the same one).
    `micro_batch_size` rows at a time through the transformer and the VAE decode (None: all N);
    each micro-batch's results go to the CPU before the next one starts. Per-row noise makes the
    trajectory the same for every micro_batch_size, up to float round-off in batched matmuls.
    `ode` (DiffusionNFT's rollouts, `grpo.decoder.nft.rollout: ode`): every step is a deterministic
    ODE step and every row starts from its own noise (`ode_noise_seed(seed, r)`; a shared one would
    give G equal samples); no step is recorded (S = 0), only the clean latents and images.
    The final latents x_0 are kept in `clean_latents` either way.
    """
    b, g = cond.shape[0], group_size
    device = cond.device
    if ode:
        steps, sde = [], []
    else:
        steps = choose_steps(num_steps, random.Random(seed), window=sde_window, window_range=window_range,
                             timestep_fraction=timestep_fraction, selection=step_selection)
        sde = stochastic_steps(num_steps, steps, step_selection)
    parts: list[tuple[torch.Tensor, ...]] = []  # (latents, next_latents, log_probs, images, x_0) per micro-batch, CPU
    for rows in micro_batches(b * g, micro_batch_size):
        source = torch.arange(rows.start, rows.stop) // g  # (n,) condition of each row
        if ode:
            noise = initial_noise(decoder, [ode_noise_seed(seed, r) for r in range(rows.start, rows.stop)], device)
        else:
            # Same initial noise inside a group: the group's spread comes from the SDE steps alone.
            noise = initial_noise(decoder, [seed * 1000 + int(i) for i in source], device)
        gens = [row_generator(seed, r, device) for r in range(rows.start, rows.stop)]
        src = source.to(device)
        x0, rec = denoise(decoder, noise, cond[src], cond_mask[src], pooled[src], num_steps,
                          noise_level=noise_level, sde_steps=sde, sampler=sampler, row_generators=gens,
                          uncond=uncond, cfg_scale=cfg_scale, cfg_in_training=cfg_in_training, record_steps=steps,
                          cps_logprob=cps_logprob)
        n = rows.stop - rows.start
        if steps:
            recorded = tuple(torch.stack([rec[j][k] for j in steps], dim=1).cpu() for k in range(3))
        else:  # nothing recorded: (n, 0, ...) placeholders
            recorded = (x0.new_zeros(n, 0, *x0.shape[1:]).cpu(), x0.new_zeros(n, 0, *x0.shape[1:]).cpu(),
                        torch.zeros(n, 0))
        parts.append((*recorded, decoder.decode(x0).cpu(), x0.detach().cpu()))
    latents, next_latents, log_probs, images, clean = (torch.cat(p) for p in zip(*parts))
    sigmas = shifted_sigmas(num_steps, decoder.shift)
    cond_n, mask_n, pooled_n = (t.cpu().repeat_interleave(g, 0) for t in (cond, cond_mask, pooled))
    return Trajectory(
        cond=cond_n, cond_mask=mask_n, pooled=pooled_n,
        latents=latents,  # (N, S, C, h, w)
        next_latents=next_latents,  # (N, S, C, h, w)
        log_probs=log_probs,  # (N, S)
        sigmas=sigmas[steps].clone(), sigmas_next=sigmas[[j + 1 for j in steps]].clone(),
        steps=torch.tensor(steps), images=images, group_size=g, version=version,
        uncond=None if uncond is None or cfg_scale == 1.0 else Uncond(*(t.cpu() for t in uncond)),
        clean_latents=clean,  # (N, C, h, w)
    )


def ode_noise_seed(seed: int, row: int) -> int:
    """The initial-noise seed of row `row` of an ODE rollout seeded `seed` (`sample_trajectories(ode=
    True)`): hashed from (seed, row, 1) by numpy's SeedSequence, so unrelated to the shared-noise seeds
    `seed * 1000 + b` and to the SDE streams of `row_generator`."""
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, row, 1]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0])


# ----------------------------------------------------------------------------------------------
# the learner's side
# ----------------------------------------------------------------------------------------------
def step_logprobs(decoder: Decoder, traj: Trajectory, noise_level: float, sampler: str = "sde",
                  rows: slice | None = None, cfg_scale: float = 1.0, steps: Sequence[int] | None = None,
                  cfg_detach_uncond: bool = False, cps_logprob: str = "gaussian",
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute (log_prob (n, K), mean (n, K, C, h, w), std (n, K, 1, 1, 1)) of the stored
    transitions of rows `rows` (None: all N) at the K positions `steps` among the trajectory's S
    trained steps (0..S-1, None: all), under the decoder's current adapter state (grad if enabled).
    The learner's side of UAE eq. 4; it may score one step and one row slice at a time and
    back-propagate each (Flow-GRPO's per-timestep loop), so that only one step's graph is alive.
    `cfg_scale > 1` scores the guided velocity (needs `traj.uncond`), one batched pass per step;
    1 scores the conditional velocity. `cfg_detach_uncond`: the unconditional half carries no
    gradient (`guided_velocity`'s `detach_uncond`; values unchanged). `cps_logprob`: the "cps"
    sampler's log-prob convention (`rollouts.sde.cps_step_with_logprob`). With unchanged weights and the rollout's guidance setting,
    log_prob equals the stored `traj.log_probs` (up to float round-off when the rows are batched
    differently from the rollout's micro-batches)."""
    rows = rows if rows is not None else slice(None)
    positions = range(traj.latents.shape[1]) if steps is None else steps
    device = next(decoder.transformer.parameters()).device
    cond, mask, pooled = (t[rows].to(device) for t in (traj.cond, traj.cond_mask, traj.pooled))
    doubled = guidance_condition(cond, mask, pooled, traj.uncond, cfg_scale)  # once, not per step
    lps, means, stds = [], [], []
    for s in positions:
        x = traj.latents[rows, s].to(device)
        n = x.shape[0]
        v, _ = guided_velocity(decoder, x, traj.sigmas[s].expand(n).to(device), cond, mask, pooled,
                               traj.uncond, cfg_scale, doubled, detach_uncond=cfg_detach_uncond)
        out = step_with_logprob(sampler, v, x, float(traj.sigmas[s]), float(traj.sigmas_next[s]), noise_level,
                                prev_sample=traj.next_latents[rows, s].to(device), cps_logprob=cps_logprob)
        lps.append(out.log_prob)
        means.append(out.mean)
        stds.append(out.std)
    return torch.stack(lps, 1), torch.stack(means, 1), torch.stack(stds, 1)


def shard_trajectory(traj: Trajectory, rank: int, world_size: int) -> Trajectory:
    """Rows of the groups that learner rank `rank` of `world_size` trains on (whole groups)."""
    if world_size == 1:
        return traj
    rows = shard_rows(traj.log_probs.shape[0], traj.group_size, rank, world_size)
    per_row = ("cond", "cond_mask", "pooled", "latents", "next_latents", "log_probs", "images", "clean_latents")
    return traj._replace(**{name: getattr(traj, name)[rows] for name in per_row if getattr(traj, name) is not None})
