"""The GRPO math: group-relative advantages, KL estimators, the clipped objective, aggregation.

Pure functions of tensors (torch only, no model, no Ray), read top to bottom in the order of the
algorithm box: rewards -> advantages -> per-element loss -> one scalar.

Options (defaults first; the recipe schema `rl/config.py` exposes each one):

- `scale` in `group_advantages` / `combine_rewards`:
    "group" (default): A_i = (R_i - mean_g(R)) / (std_g(R) + eps), the group's unbiased std, as
        TRL's `std()` (UAE eq. 1; DeepSeekMath GRPO).
    "batch": divide by the std of every present reward in the batch instead (more robust to
        groups with a tiny spread; TRL `scale_rewards="batch"`); unbiased (divide by n - 1).
    "batch_population": as "batch" with the population std (divide by n): Flow-GRPO's SD3
        configs (`sample.global_std`: `np.std(rewards) + 1e-4` over the gathered batch).
    "none": A_i = R_i - mean_g(R), no division (Dr. GRPO, Liu et al. 2025: the std divisor
        up-weights too easy / too hard groups).
- `clip` (default 5.0): advantages clipped to [-clip, clip]; None disables.
- Zero-variance groups (all present rewards equal, or fewer than 2 present) carry no signal:
  advantage 0, `valid` False, and their fraction is reported as `zero_var_frac`. The caption loss
  keeps their tokens in its mask, so their KL applies (TRL); `caption_loss_mask(drop_zero_variance=
  True)` drops them (DAPO's dynamic sampling). `trajectory_weights(drop_zero_advantage=True)` drops every
  zero-advantage row from the decoder loss's row mean as well (Flow-GRPO).
- `mode` in `combine_rewards`: "sum_then_normalize" (default; weighted sum of the K rewards, then
  one normalisation), "normalize_then_sum" (TRL's: normalise each reward in its group, weighted
  sum, then standardise over the batch) or "normalize_then_sum_raw" (no batch standardisation).
- `level` in `clipped_policy_loss` / `micro_batch_loss`: "token" (default) ratio per token, or
  "sequence" (GSPO, Zheng et al. 2025): exp of the masked mean log-ratio of each sequence.
- `bias_correction_kl` in `micro_batch_loss`: KL times the importance ratio (TRL's
  use_bias_correction_kl, DeepSeek-V3.2).
- `truncated_rows`: completions without EOS (hit max_new_tokens), for TRL's
  mask_truncated_completions (DAPO's overlong filtering).
- `kind` in `kl_estimator`: "k1" log r, "k2" (log r)^2 / 2, "k3" (default) r - 1 - log r with
  r = ref/pi (Schulman, "Approximating KL divergence", 2020; k3 is unbiased and >= 0).
- `epsilon` (default 0.2) and `epsilon_high` (default None = epsilon) in the clipped objective;
  epsilon_high = 0.28 is DAPO's "clip-higher" (Yu et al. 2025).
- `agg` in `aggregate` / `grpo_loss`: "token_mean" (default, DAPO), "sequence_mean" (original
  GRPO, the 1/|o_i| of UAE eq. 2), "constant" (Dr. GRPO: divide by B * max completion length).
- `quantile` in `high_entropy_mask` (grpo.encoder.top_entropy_quantile, default 1.0 = off): only the
  top-rho entropy tokens keep their policy term (Wang et al. 2025; TRL's get_high_entropy_mask).
- `mode` in `rollout_is_weights`: "sequence_mask" (default, TRL 1.16), "sequence_truncate",
  "token_mask", "token_truncate": the correction between a rollout engine's log-probs (vLLM) and
  the learner's, multiplied into the policy term (`micro_batch_loss(is_weights=...)`).
- KL placement: in the loss (`grpo_loss(kl=..., beta=...)`) or in the reward (`kl_in_reward`).
  beta = 0 (default) needs no reference model at all (DAPO, Dr. GRPO).
"""
from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor


# ALGO LOGIC: rewards -> group-relative advantages (UAE eq. 1)


class Advantages(NamedTuple):
    advantages: Tensor  # (N,) float32, 0 where not valid
    valid: Tensor  # (N,) bool: False for missing rewards and for members of zero-variance groups
    zero_var_frac: float  # fraction of groups with all present rewards equal (or < 2 present)


def to_reward_tensor(rewards) -> Tensor:
    """list[float | None] (or nested lists, or a tensor) -> float32 tensor, NaN for None."""
    if isinstance(rewards, Tensor):
        return rewards.detach().to(torch.float32)

    def none_to_nan(x):
        if isinstance(x, (list, tuple)):
            return [none_to_nan(v) for v in x]
        return float("nan") if x is None else float(x)

    return torch.tensor(none_to_nan(list(rewards)), dtype=torch.float32)


def group_advantages(
    rewards,
    group_size: int,
    scale: Literal["group", "batch", "batch_population", "none"] = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Advantages:
    """Group-relative advantages, UAE eq. 1:  A_i = (R_i - mean(R_g)) / (std(R_g) + eps).

    rewards: (N,) list or tensor, N = num_groups * group_size, the G members of a group
    consecutive. NaN / None (or +-inf) means "no score": that reward is left out of its group's
    mean and std (not counted as 0), and its advantage is 0 with valid False.
    std is the unbiased one (divide by n - 1), like TRL's `rewards.view(-1, G).std(dim=1)`, except
    for scale "batch_population" (divide by n, numpy's default, as Flow-GRPO).
    """
    r = to_reward_tensor(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(r.shape)}")
    if group_size < 1 or r.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must divide the number of rewards N={r.numel()}: "
            "pass N = num_groups * group_size rewards, the members of a group consecutive"
        )
    if scale not in ("group", "batch", "batch_population", "none"):
        raise ValueError(f"scale={scale!r}: use 'group', 'batch', 'batch_population' or 'none'")

    g = r.view(-1, group_size)  # (num_groups, G)
    present = torch.isfinite(g)
    n = present.sum(dim=1, keepdim=True)  # (num_groups, 1)
    x = torch.where(present, g, torch.zeros_like(g))  # missing -> 0, then masked out of sums
    mean = x.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centered = torch.where(present, x - mean, torch.zeros_like(x))

    # Compare max and min rather than test std == 0: the float mean of equal values can differ
    # from them by an ulp, which would leave a tiny nonzero std and a huge advantage.
    hi = torch.where(present, g, torch.full_like(g, -float("inf"))).amax(dim=1)
    lo = torch.where(present, g, torch.full_like(g, float("inf"))).amin(dim=1)
    zero_var = (n.squeeze(1) < 2) | (hi == lo)  # (num_groups,)

    if scale == "group":
        var = centered.pow(2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        adv = centered / (var.sqrt() + eps)
    elif scale == "batch":
        all_present = r[torch.isfinite(r)]
        std = all_present.std() if all_present.numel() >= 2 else r.new_zeros(())
        adv = centered / (std + eps)
    elif scale == "batch_population":
        all_present = r[torch.isfinite(r)]
        std = all_present.std(correction=0) if all_present.numel() else r.new_zeros(())
        adv = centered / (std + eps)
    else:  # "none": Dr. GRPO
        adv = centered

    valid = present & ~zero_var.unsqueeze(1)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    frac = zero_var.float().mean().item() if zero_var.numel() else 0.0
    return Advantages(adv.reshape(-1), valid.reshape(-1), frac)


def fill_missing(rewards: Tensor, group_size: int) -> Tensor:
    """(K, N) rewards, NaN = missing -> the same, each missing R_ki of a sample that has some other
    score replaced by the mean of reward k over its group's present scores (over the batch's when
    the group has none; 0 when the batch has none: a constant, so no group-relative signal). A
    sample with no score at all stays NaN in every row.

    Filling with the group mean makes a dropped score neutral: the sample's centred reward k is 0,
    as `normalize_then_sum` gives it, neither a reward nor a penalty (issue 19)."""
    r = to_reward_tensor(rewards)
    k, n = r.shape
    present = torch.isfinite(r)
    g = r.view(k, -1, group_size)  # (K, groups, G)
    p = present.view(k, -1, group_size)
    count = p.sum(dim=2, keepdim=True)  # (K, groups, 1)
    group_mean = torch.where(p, g, torch.zeros_like(g)).sum(dim=2, keepdim=True) / count.clamp(min=1)
    batch_count = present.sum(dim=1)  # (K,)
    batch_mean = torch.where(present, r, torch.zeros_like(r)).sum(dim=1) / batch_count.clamp(min=1)  # (K,)
    fill = torch.where(count > 0, group_mean, batch_mean.view(k, 1, 1))  # (K, groups, 1); 0 if none at all
    filled = torch.where(p, g, fill.expand_as(g)).reshape(k, n)
    scored = present.any(dim=0, keepdim=True)  # (1, N)
    return torch.where(scored, filled, torch.full_like(filled, float("nan")))


def combine_rewards(
    rewards: Tensor,
    weights: Sequence[float],
    group_size: int,
    mode: Literal["sum_then_normalize", "normalize_then_sum", "normalize_then_sum_raw"] = "sum_then_normalize",
    scale: Literal["group", "batch", "batch_population", "none"] = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Advantages:
    """Advantages from K weighted reward functions. rewards: (K, N), NaN = missing.

    "sum_then_normalize": R_i = sum_k w_k R_ki, then `group_advantages`. A missing R_ki of a
        sample with other scores is replaced by reward k's mean over the present scores of its group
        (`fill_missing`): neutral on that reward's axis, as in the modes below, never 0 or a low score.
        A sample with no score at all is NaN (advantage 0, valid False). TRL's nansum counts a
        missing term as 0 instead (a sample whose plugin score was dropped would look worse than its
        group mates); this is the one deliberate difference from TRL here.
    "normalize_then_sum" (TRL 1.16 `multi_objective_aggregation="normalize_then_sum"`, GDPO):
        S_i = sum_k w_k (R_ki - mean_g(R_k)) / (std_g(R_k) + eps), each reward normalised in its
        group with the unbiased group std whatever `scale` says (TRL ignores scale_rewards here),
        a missing term counting 0; then the sum is standardised over the batch,
        A_i = (S_i - mean(S)) / (std(S) + eps) (unbiased std over rows with any reward), then clipped.
    "normalize_then_sum_raw" (before TRL parity): A_i = sum_k w_k A_ki with A_k =
        group_advantages(R_k, scale) unclipped, then clipped once; no batch re-standardisation.
    In both, valid is where any component is valid (others get advantage 0); `zero_var_frac` is the
    fraction of groups with no valid member (every component zero-variance there).
    """
    r = to_reward_tensor(rewards)
    if r.ndim != 2 or r.shape[0] != len(weights):
        raise ValueError(
            f"rewards must be (K, N) with K = len(weights) = {len(weights)}, "
            f"got shape {tuple(r.shape)}"
        )
    w = torch.tensor(list(weights), dtype=torch.float32).unsqueeze(1)  # (K, 1)
    present = torch.isfinite(r)

    if mode == "sum_then_normalize":
        total = (w * fill_missing(r, group_size)).sum(dim=0)  # (N,), NaN where no score at all
        return group_advantages(total, group_size, scale=scale, eps=eps, clip=clip)
    if mode not in ("normalize_then_sum", "normalize_then_sum_raw"):
        raise ValueError(f"mode={mode!r}: use 'sum_then_normalize', 'normalize_then_sum' or "
                         "'normalize_then_sum_raw'")

    trl = mode == "normalize_then_sum"
    parts = [group_advantages(r_k, group_size, scale="group" if trl else scale, eps=eps, clip=None) for r_k in r]
    adv = (w * torch.stack([p.advantages for p in parts])).sum(dim=0)  # (N,) S_i
    valid = torch.stack([p.valid for p in parts]).any(dim=0)
    if trl:
        # TRL's nanmean / nanstd over the rows with any reward (an unscorable row is NaN there)
        s_present = adv[present.any(dim=0)]
        mean = s_present.mean() if s_present.numel() else adv.new_zeros(())
        std = s_present.std() if s_present.numel() >= 2 else adv.new_zeros(())
        adv = torch.where(valid, (adv - mean) / (std + eps), torch.zeros_like(adv))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    no_signal = ~valid.view(-1, group_size).any(dim=1)
    frac = no_signal.float().mean().item() if no_signal.numel() else 0.0
    return Advantages(adv, valid, frac)


# ALGO LOGIC: KL estimators (Schulman 2020), per element, samples drawn from pi


def kl_estimator(logp: Tensor, ref_logp: Tensor, kind: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-element estimate of KL(pi || ref); logp, ref_logp: (B, T) -> (B, T).

    With log_ratio = logp - ref_logp and r = ref/pi = exp(-log_ratio):
    k1 = log_ratio (unbiased, can be negative), k2 = log_ratio^2 / 2 (biased, >= 0),
    k3 = r - 1 - log r = exp(-log_ratio) - 1 + log_ratio (unbiased, >= 0; DeepSeekMath eq. 4).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"kind={kind!r}: use 'k1', 'k2' or 'k3'")


# ALGO LOGIC: the clipped surrogate (UAE eq. 2) and its aggregation


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    level: Literal["token", "sequence"] = "token",
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element PPO/GRPO clipped loss, UAE eq. 2 without the KL term:

        loss = -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A),   r = exp(logp - old_logp)

    logp, old_logp: (B, T) per token (captions) or per denoising step (trajectories).
    advantages: (B,), broadcast over T. epsilon_high None means symmetric (= epsilon); DAPO
    uses 0.28 so low-probability tokens can still grow.
    level "sequence" (GSPO, Zheng et al. 2025, as TRL's importance_sampling_level="sequence"): one
    ratio per sequence, r_i = exp(sum_t m_it (logp - old_logp)_it / max(1, sum_t m_it)), broadcast
    over its T elements; needs mask (B, T).
    Returns (loss (B, T), ratio (B, T), clipped (B, T) bool: the min took the clipped term and
    it differs from the unclipped one, so no gradient flows there).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logp - old_logp  # (B, T)
    if level == "sequence":
        if mask is None:
            raise ValueError("level='sequence' needs mask=(B, T): the ratio is a masked mean over each sequence")
        m = mask.to(log_ratio.dtype)
        log_ratio = ((log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(logp)
    elif level != "token":
        raise ValueError(f"level={level!r}: use 'token' or 'sequence'")
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.reshape(advantages.shape[0], *([1] * (logp.ndim - 1)))  # (B, 1)
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1 - epsilon, 1 + eps_high) * adv
    clipped = clipped_obj < unclipped
    return -torch.minimum(unclipped, clipped_obj), ratio, clipped


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: Literal["token_mean", "sequence_mean", "constant"] = "token_mean",
    constant: float | None = None,
) -> Tensor:
    """Reduce per-element values (B, T) with a 0/1 mask (B, T) to a scalar.

    "token_mean":    sum(v m) / sum(m), every token of the batch weighs the same (DAPO).
    "sequence_mean": mean_i [ sum_t(v m)_i / sum_t(m)_i ], the 1/|o_i| of GRPO and UAE eq. 2;
                     the mean is over all B sequences (an empty one counts 0, as in TRL).
    "constant":      sum(v m) / (B * constant), constant = max completion length (Dr. GRPO):
                     no length bias from the normaliser.
    Denominators are clamped to >= 1 so an all-zero mask gives 0, not NaN.
    """
    m = mask.to(values.dtype)
    total = (values * m).sum()
    if mode == "token_mean":
        return total / m.sum().clamp(min=1.0)
    if mode == "sequence_mean":
        per_seq = (values * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)  # (B,)
        return per_seq.mean()
    if mode == "constant":
        if constant is None or constant <= 0:
            raise ValueError(
                f"agg='constant' needs constant > 0 (got {constant}): pass the maximum "
                "completion length (caption max_new_tokens, or the number of trained steps)"
            )
        return total / (values.shape[0] * constant)
    raise ValueError(f"agg={mode!r}: use 'token_mean', 'sequence_mean' or 'constant'")


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, with grad
    stats: dict[str, float]  # detached: policy_loss, kl, clip_frac, ratio_mean, ratio_max, ratio_min


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    kl: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    agg: str = "token_mean",
    constant: float | None = None,
) -> LossOutput:
    """The GRPO objective, UAE eq. 2, negated to a loss:

        L = agg_{i,t} [ -min(r A_i, clip(r, 1-eps, 1+eps_high) A_i) + beta KL_{i,t} ]

    logp, old_logp, mask: (B, T); advantages: (B,). kl: (B, T) per element, computed by the caller
    (`kl_estimator` for tokens, the closed-form Gaussian KL per denoising step), required if
    beta > 0. Stats are over masked elements: policy_loss aggregated like the loss, kl the masked
    token mean, clip_frac the fraction of masked elements where clipping was active.
    """
    if beta != 0.0 and kl is None:
        raise ValueError(f"beta={beta} needs kl=(B, T) per-element KL; pass it or set beta=0")
    per_el, ratio, clipped = clipped_policy_loss(logp, old_logp, advantages, epsilon, epsilon_high)
    total = per_el + beta * kl if (kl is not None and beta != 0.0) else per_el
    loss = aggregate(total, mask, agg, constant)

    with torch.no_grad():
        m = mask.bool()
        r = ratio[m]
        stats = {
            "policy_loss": aggregate(per_el, mask, agg, constant).item(),
            "kl": aggregate(kl, mask).item() if kl is not None else 0.0,
            "clip_frac": aggregate(clipped.float(), mask).item(),
            # no masked element: report the neutral ratio 1 rather than NaN
            "ratio_mean": r.mean().item() if r.numel() else 1.0,
            "ratio_max": r.max().item() if r.numel() else 1.0,
            "ratio_min": r.min().item() if r.numel() else 1.0,
        }
    return LossOutput(loss, stats)


# ALGO LOGIC: the same objective over micro-batches (memory bounded by a micro-batch, DESIGN.md)


def aggregation_weights(
    mask: Tensor,
    mode: Literal["token_mean", "sequence_mean", "constant"] = "token_mean",
    constant: float | None = None,
) -> Tensor:
    """Per-element weights w (B, T) of a whole batch with `aggregate(v, mask, mode, constant) ==
    (v * w).sum()`, so that the batch's loss is the sum of its micro-batches' `(v[mb] * w[mb]).sum()`
    and gradients accumulated over micro-batches equal the full-batch gradient:

    "token_mean":    w = m / sum(m)
    "sequence_mean": w_it = m_it / (B sum_t m_it)
    "constant":      w = m / (B * constant)
    (denominators clamped to >= 1, as in `aggregate`).
    """
    m = mask.float()
    if mode == "token_mean":
        return m / m.sum().clamp(min=1.0)
    if mode == "sequence_mean":
        return m / m.sum(dim=-1, keepdim=True).clamp(min=1.0) / m.shape[0]
    if mode == "constant":
        if constant is None or constant <= 0:
            raise ValueError(f"agg='constant' needs constant > 0 (got {constant})")
        return m / (m.shape[0] * constant)
    raise ValueError(f"agg={mode!r}: use 'token_mean', 'sequence_mean' or 'constant'")


def trajectory_weights(advantages: Tensor, valid: Tensor, num_steps: int,
                       drop_zero_advantage: bool = False) -> tuple[Tensor, Tensor]:
    """Per-element weights (w, w_tok), each (N, S), of the decoder loss over N trajectories of S
    trained steps: w the "sequence_mean" weights (mean over steps, then over rows), w_tok the
    "token_mean" ones (for the kl / clip_frac statistics); see `aggregation_weights`.

    Rows with valid False weigh 0 but count in the mean over rows (w = 1 / (S N)).
    `drop_zero_advantage`: rows whose advantage is exactly 0 are dropped too, and the mean is over
    the kept rows only, w = 1 / (S N_kept): Flow-GRPO's train_sd3.py removes them from the batch
    (`samples[advantages.abs().sum(1) != 0]`) before its per-timestep mean losses.
    advantages (N,), valid (N,) bool.
    """
    n = advantages.shape[0]
    if drop_zero_advantage:
        valid = valid & (advantages != 0)
    mask = valid.float().unsqueeze(1).expand(n, num_steps)
    w = aggregation_weights(mask, "sequence_mean")
    if drop_zero_advantage:
        w = w * n / valid.sum().clamp(min=1)
    return w, aggregation_weights(mask, "token_mean")


def micro_batch_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    weights: Tensor,
    token_weights: Tensor,
    *,
    kl: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    level: Literal["token", "sequence"] = "token",
    bias_correction_kl: bool = False,
    is_weights: Tensor | None = None,
    entropy_mask: Tensor | None = None,
) -> LossOutput:
    """`grpo_loss` on one micro-batch (b rows, t elements) of a larger batch:

        loss_mb = sum_{i,t in mb} w_it [ -min(r A_i, clip(r) A_i) + beta KL_it ]

    with w the batch's `aggregation_weights` (sliced to the micro-batch) and token_weights those of
    "token_mean" (for the kl and clip_frac statistics). Summed over the micro-batches, loss and
    stats are `grpo_loss`'s on the whole batch; `LossStats` adds the stats up.

    level: importance ratio per "token" or per "sequence" (GSPO), see `clipped_policy_loss`; the
    sequence mask is token_weights > 0 (rows are whole in a micro-batch). Its clip_frac / ratio
    statistics stay token means of the broadcast ratio (TRL's clip ratio is a mean over sequences there).
    bias_correction_kl: KL_it <- r_it KL_it with the (differentiable) importance ratio, TRL's
    use_bias_correction_kl (DeepSeek-V3.2): the KL gradient becomes the unbiased reverse-KL one.
    The kl statistic is of the corrected KL, as TRL logs it.
    is_weights: (b, t) or (b, 1), constant, the rollout engine's correction (`rollout_is_weights`):
    it multiplies the clipped policy term only, not the KL (TRL's per_token_loss *
    importance_sampling_ratio before + beta KL). None: weight 1, the loss unchanged.
    entropy_mask: (b, t) bool, `high_entropy_mask`: tokens outside it lose their policy term, not their
    KL term nor their weight in the denominators (TRL's per_token_loss * entropy_mask before + beta KL).
    """
    if beta != 0.0 and kl is None:
        raise ValueError(f"beta={beta} needs kl=(B, T) per-element KL; pass it or set beta=0")
    per_el, ratio, clipped = clipped_policy_loss(logp, old_logp, advantages, epsilon, epsilon_high,
                                                 level=level, mask=token_weights > 0)
    if is_weights is not None:
        per_el = per_el * is_weights.detach()
    if entropy_mask is not None:
        per_el = per_el * entropy_mask.to(per_el.dtype)
    if kl is not None and bias_correction_kl:
        kl = kl * ratio
    total = per_el + beta * kl if (kl is not None and beta != 0.0) else per_el
    loss = (total * weights).sum()
    with torch.no_grad():
        m = token_weights > 0
        r = ratio[m]
        stats = {
            "policy_loss": float((per_el * weights).sum()),
            "kl": float((kl * token_weights).sum()) if kl is not None else 0.0,
            "clip_frac": float((clipped.float() * token_weights).sum()),
            "ratio_sum": float(r.sum()), "ratio_count": int(r.numel()),
            "ratio_max": float(r.max()) if r.numel() else None, "ratio_min": float(r.min()) if r.numel() else None,
        }
    return LossOutput(loss, stats)


def high_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float,
                      gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(b, t) bool: the tokens whose entropy is in the top `quantile` of the masked tokens (Wang et al.
    2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for LLM Reasoning";
    TRL 1.16 GRPOTrainer.get_high_entropy_mask with threshold 1 - top_entropy_quantile):

        tau = torch.quantile({H_it : m_it = 1, over all ranks}, 1 - quantile)   (linear interpolation)
        keep_it = m_it and H_it m_it >= tau

    entropies: (b, t) per-token entropies; mask: (b, t) the loss mask; gather: the masked entropies of
    every learner rank from this rank's (1-D, lengths may differ; None: one rank). No masked token
    anywhere: nothing kept (TRL's)."""
    local = entropies[mask.bool()].detach().float()
    values = gather(local) if gather is not None else local
    if values.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(values, 1.0 - quantile)
    return ((entropies.detach() * mask.to(entropies.dtype)) >= threshold) & mask.bool()


def gather_ragged(x: Tensor) -> Tensor:
    """The 1-D tensors `x` of every rank of the default torch.distributed group, concatenated in rank
    order (lengths may differ): padded to the longest, all-gathered, cut back to each rank's length
    (TRL: accelerator.pad_across_processes + gather). A collective: every rank calls it."""
    import torch.distributed as dist

    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    padded = torch.cat([x, x.new_zeros(max(int(s) for s in sizes) - x.numel())])
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


# ALGO LOGIC: the rollout engine's correction (vLLM samples, the learner trains)


def rollout_is_weights(
    learner_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    """Importance weights between the learner's log-probs and the rollout engine's, TRL 1.16's
    vllm_importance_sampling_correction (truncated IS, Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"):

        d_it = m_it (logp_learner - logp_rollout)_it   (NaN: 0, weight 1 on that token)
        token_*:    rho_it = exp(d_it)                         -> (B, T)
        sequence_*: rho_i  = exp(sum_t d_it)                   -> (B, 1)
        *_truncate: rho <- clamp(rho, clip_min, clip_max)      (None: that side unbounded)
        *_mask:     rho <- 0 where rho < clip_min or rho > clip_max

    learner_logp: (B, T) the learner's pi_old (its own log-probs before the update) of the tokens the
    engine sampled; rollout_logp: (B, T) the engine's, of the same distribution (same temperature,
    same blocked tokens: vLLM's processed_logprobs). mask: (B, T) completion mask. Detached: a
    constant factor on each token's policy loss (`micro_batch_loss(is_weights=...)`).
    TRL 1.16's defaults: mode "sequence_mask", clip_max 3.0, clip_min None.
    """
    if mode not in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        raise ValueError(f"mode={mode!r}: use 'token_truncate', 'token_mask', 'sequence_truncate' or 'sequence_mask'")
    d = torch.nan_to_num((learner_logp.detach() - rollout_logp.detach()) * mask.to(learner_logp.dtype), nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(dim=-1, keepdim=True)  # (B, 1)
    rho = torch.exp(d)
    lo = -float("inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return rho.clamp(min=clip_min, max=clip_max) if (clip_min is not None or clip_max is not None) else rho
    return rho.masked_fill((rho < lo) | (rho > hi), 0.0)


class LossStats:
    """Adds up `micro_batch_loss` stats over the micro-batches of one batch; `summary()` gives
    `grpo_loss`'s keys (policy_loss, kl, clip_frac, ratio_mean / max / min; ratio 1 with no element)."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_sum": 0.0, "ratio_count": 0}
        self.ratio_max: float | None = None
        self.ratio_min: float | None = None

    def add(self, out: LossOutput) -> None:
        self.sums["loss"] += float(out.loss.detach())
        for key in ("policy_loss", "kl", "clip_frac", "ratio_sum", "ratio_count"):
            self.sums[key] += out.stats[key]
        if out.stats["ratio_max"] is not None:
            self.ratio_max = max(out.stats["ratio_max"], self.ratio_max if self.ratio_max is not None else float("-inf"))
            self.ratio_min = min(out.stats["ratio_min"], self.ratio_min if self.ratio_min is not None else float("inf"))

    def summary(self) -> dict[str, float]:
        count = self.sums["ratio_count"]
        return {
            "loss": self.sums["loss"], "policy_loss": self.sums["policy_loss"], "kl": self.sums["kl"],
            "clip_frac": self.sums["clip_frac"],
            "ratio_mean": self.sums["ratio_sum"] / count if count else 1.0,
            "ratio_max": self.ratio_max if self.ratio_max is not None else 1.0,
            "ratio_min": self.ratio_min if self.ratio_min is not None else 1.0,
        }


def truncated_rows(completion_ids: Tensor, completion_mask: Tensor, eos_id: int) -> Tensor:
    """(N,) bool: rows with no EOS among their masked tokens, i.e. cut at max_new_tokens.

    TRL marks a completion truncated when its last token is neither EOS nor pad
    (`ids[-1] not in eos_and_pad`); our mask runs up to and including the first EOS, so a finished
    row has its EOS inside the mask and an unfinished one has none.
    completion_ids, completion_mask: (N, T).
    """
    return ~((completion_ids == eos_id) & completion_mask.bool()).any(dim=1)


def caption_loss_mask(completion_mask: Tensor, valid: Tensor, truncated: Tensor, *,
                      drop_zero_variance: bool = False, mask_truncated: bool = False) -> Tensor:
    """(N, T) float loss mask of the caption policy's tokens, the m of `aggregation_weights`.

    TRL (default): every completion token, whatever its advantage; a zero-variance group's rows
    have advantage 0, so they add only their KL, and count in every denominator.
    drop_zero_variance: rows with valid False leave the mask (DAPO's dynamic sampling).
    mask_truncated: rows cut at max_new_tokens leave the mask (TRL mask_truncated_completions).
    completion_mask (N, T); valid, truncated (N,) bool.
    """
    mask = completion_mask.float()
    if drop_zero_variance:
        mask = mask * valid.float().unsqueeze(1)
    if mask_truncated:
        mask = mask * (~truncated).float().unsqueeze(1)
    return mask


def kl_in_reward(rewards: Tensor, kl_per_token: Tensor, mask: Tensor, beta: float) -> Tensor:
    """KL as a reward penalty instead of a loss term:  R_i <- R_i - beta * sum_t KL_{i,t} m_{i,t}.

    rewards: (N,), NaN = missing (stays NaN); kl_per_token, mask: (N, T). The KL is detached:
    a reward is a constant to the policy gradient.
    """
    penalty = (kl_per_token.detach() * mask.to(kl_per_token.dtype)).sum(dim=-1)  # (N,)
    return to_reward_tensor(rewards) - beta * penalty.to(torch.float32)


def shard_rows(n: int, group_size: int, rank: int, world_size: int) -> torch.Tensor:
    """Row indices (long) of the whole groups that learner rank `rank` of `world_size` trains on:
    groups rank, rank + world_size, ... of the n // group_size groups of `group_size` rows."""
    groups = range(rank, n // group_size, world_size)
    return torch.tensor([i * group_size + j for i in groups for j in range(group_size)], dtype=torch.long)
