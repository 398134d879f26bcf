"""Tests of rl/grpo.py against hand-computed values (each worked out in the comment above it)."""
import math

import pytest
import torch

from rl.grpo import (
    aggregate,
    clipped_policy_loss,
    combine_rewards,
    group_advantages,
    grpo_loss,
    kl_estimator,
    kl_in_reward,
    to_reward_tensor,
)

NAN = float("nan")
EPS = 1e-4


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=0,
    )


# ---------------------------------------------------------------- group_advantages


def test_to_reward_tensor_none_is_nan():
    r = to_reward_tensor([1, None, 2.5])
    assert r.dtype == torch.float32
    assert r[0] == 1 and torch.isnan(r[1]) and r[2] == 2.5


def test_group_scale_uses_unbiased_group_std():
    # group [1,2,3]: mean 2, unbiased var (1+0+1)/2 = 1, std 1  -> [-1, 0, 1] / (1 + eps)
    # group [4,6,8]: mean 6, unbiased var (4+0+4)/2 = 4, std 2  -> [-2, 0, 2] / (2 + eps)
    # (population std would give sqrt(2/3) and sqrt(8/3): different numbers.)
    out = group_advantages([1, 2, 3, 4, 6, 8], group_size=3, scale="group")
    close(out.advantages, [-1 / (1 + EPS), 0, 1 / (1 + EPS), -2 / (2 + EPS), 0, 2 / (2 + EPS)])
    assert out.advantages.dtype == torch.float32
    assert out.valid.all() and out.zero_var_frac == 0.0


def test_batch_scale_uses_std_of_all_rewards():
    # centred per group as above: [-1, 0, 1, -2, 0, 2].
    # batch: mean 24/6 = 4; deviations -3,-2,-1,0,2,4; squares 9+4+1+0+4+16 = 34;
    # unbiased var 34/5 = 6.8 -> divide everything by sqrt(6.8) + eps.
    out = group_advantages([1, 2, 3, 4, 6, 8], group_size=3, scale="batch")
    d = math.sqrt(6.8) + EPS
    close(out.advantages, [-1 / d, 0, 1 / d, -2 / d, 0, 2 / d])


def test_none_scale_is_mean_centred_only():
    # Dr. GRPO: R - mean, no division: [-1, 0, 1, -2, 0, 2]
    out = group_advantages([1, 2, 3, 4, 6, 8], group_size=3, scale="none")
    close(out.advantages, [-1, 0, 1, -2, 0, 2])


def test_missing_reward_is_excluded_not_zero():
    # [1, None, 3]: mean over present = 2 (as 0 it would be 4/3, giving [-1/3, ., 5/3]).
    # scale none -> [-1, 0, 1]; the None member has advantage 0 and valid False.
    out = group_advantages([1, None, 3], group_size=3, scale="none")
    close(out.advantages, [-1, 0, 1])
    assert out.valid.tolist() == [True, False, True]
    # scale group: unbiased std over the 2 present = sqrt((1 + 1) / 1) = sqrt(2)
    out = group_advantages(torch.tensor([1, NAN, 3]), group_size=3, scale="group")
    d = math.sqrt(2) + EPS
    close(out.advantages, [-1 / d, 0, 1 / d])
    assert out.valid.tolist() == [True, False, True]
    assert out.zero_var_frac == 0.0


def test_zero_variance_and_single_reward_groups_are_masked_and_counted():
    # G = 2, four groups:
    #   [0.1, 0.1]   all equal          -> 0, invalid, zero-var
    #   [5, None]    one present         -> 0, invalid, zero-var
    #   [None, None] none present        -> 0, invalid, zero-var
    #   [0, 1]       mean 0.5, unbiased std sqrt(0.25 + 0.25) = sqrt(0.5) -> +-0.5 / (sqrt(.5)+eps)
    # zero_var_frac = 3/4
    out = group_advantages([0.1, 0.1, 5, None, None, None, 0, 1], group_size=2)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    close(out.advantages, [0, 0, 0, 0, 0, 0, -a, a])
    assert out.valid.tolist() == [False] * 6 + [True, True]
    assert out.zero_var_frac == pytest.approx(0.75)


def test_equal_floats_in_a_large_group_are_zero_variance():
    # 7 copies of 0.1: the float32 mean may differ from 0.1 by an ulp; must still be zero-var,
    # not a huge advantage from a ~1e-9 std.
    out = group_advantages([0.1] * 7, group_size=7)
    assert out.advantages.abs().max() == 0 and not out.valid.any()
    assert out.zero_var_frac == 1.0


def test_clip_at_5():
    # G = 50, 49 zeros and one 1: mean 0.02; unbiased var (49 * 0.02^2 + 0.98^2) / 49
    #   = (0.0196 + 0.9604) / 49 = 0.02, std sqrt(0.02) = 0.1414
    # the 1 gets 0.98 / 0.1414 = 6.93 -> clipped to 5; the zeros get -0.02 / 0.1414 = -0.1414
    rewards = [0.0] * 49 + [1.0]
    out = group_advantages(rewards, group_size=50)
    d = math.sqrt(0.02) + EPS
    close(out.advantages[:49], [-0.02 / d] * 49)
    assert out.advantages[49].item() == 5.0
    # scale none, [0, 100]: [-50, 50] -> [-5, 5]; clip=None leaves [-50, 50]
    close(group_advantages([0, 100], 2, scale="none").advantages, [-5, 5])
    close(group_advantages([0, 100], 2, scale="none", clip=None).advantages, [-50, 50])


def test_not_divisible_raises_naming_group_size():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages([1, 2, 3, 4, 5], group_size=2)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_never_nan(scale):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(40, generator=g)
    r[torch.rand(40, generator=g) < 0.4] = NAN
    r[:4] = NAN  # a fully missing group
    r[4:8] = 0.3  # a constant group
    out = group_advantages(r, group_size=4, scale=scale)
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[~out.valid] == 0).all()
    out = group_advantages([None] * 4, group_size=2, scale=scale)
    assert torch.isfinite(out.advantages).all() and out.zero_var_frac == 1.0


# ---------------------------------------------------------------- combine_rewards

# K = 2 reward functions, weights [1, 0.5], G = 2, three groups
R = torch.tensor([[1.0, 3.0, 2.0, 2.0, NAN, 1.0], [2.0, 0.0, NAN, 4.0, NAN, 1.0]])


def test_combine_sum_then_normalize_with_missing_components():
    # weighted sums, a missing term filled with its reward's group mean (never 0):
    #   [1 + 0.5*2, 3 + 0.5*0, 2 + 0.5*4 (R2's group mean), 2 + 0.5*4, all missing, 1 + 0.5*1]
    #   = [2, 3, 4, 4, NaN, 1.5]
    # scale none: [2,3] -> [-0.5, 0.5]; [4,4] zero-var; [NaN, 1.5] one present -> zero-var
    out = combine_rewards(R, [1.0, 0.5], group_size=2, scale="none")
    close(out.advantages, [-0.5, 0.5, 0, 0, 0, 0])
    assert out.valid.tolist() == [True, True, False, False, False, False]
    assert out.zero_var_frac == pytest.approx(2 / 3)
    # scale group on [2, 3]: unbiased std sqrt(0.25 + 0.25) = sqrt(0.5) -> +-0.5 / (sqrt(.5)+eps)
    out = combine_rewards(R, [1.0, 0.5], group_size=2, scale="group")
    a = 0.5 / (math.sqrt(0.5) + EPS)
    close(out.advantages[:2], [-a, a])


def test_combine_normalize_then_sum_with_missing_components():
    # the raw variant (no batch standardisation); TRL's normalize_then_sum: tests/rl/test_trl_parity.py
    # per reward, scale none:
    #   R1: [1,3] -> [-1, 1]; [2,2] zero-var -> 0; [NaN,1] one present -> 0
    #   R2: [2,0] -> [1, -1]; [NaN,4] one present -> 0; [NaN,1] -> 0
    # weighted sum: group 0 = [-1 + 0.5*1, 1 + 0.5*(-1)] = [-0.5, 0.5]; the rest 0, invalid
    # zero_var_frac: groups 1 and 2 have no valid member -> 2/3
    out = combine_rewards(R, [1.0, 0.5], group_size=2, mode="normalize_then_sum_raw", scale="none")
    close(out.advantages, [-0.5, 0.5, 0, 0, 0, 0])
    assert out.valid.tolist() == [True, True, False, False, False, False]
    assert out.zero_var_frac == pytest.approx(2 / 3)


def test_combine_normalize_then_sum_valid_if_any_component_and_clip_after_sum():
    # R1 = [1,3 | 5,5], R2 = [0,0 | 0,2], weights [1, 2], scale none:
    #   R1: [-1, 1 | zero-var 0, 0];  R2: [zero-var 0, 0 | -1, 1]
    #   sum: [-1, 1, 2*(-1), 2*1] = [-1, 1, -2, 2], all valid (each group valid in one reward)
    r = torch.tensor([[1.0, 3.0, 5.0, 5.0], [0.0, 0.0, 0.0, 2.0]])
    out = combine_rewards(r, [1.0, 2.0], 2, mode="normalize_then_sum_raw", scale="none", clip=None)
    close(out.advantages, [-1, 1, -2, 2])
    assert out.valid.all() and out.zero_var_frac == 0.0
    # clip=1.5 applies to the sum: [-1, 1, -2, 2] -> [-1, 1, -1.5, 1.5]
    out = combine_rewards(r, [1.0, 2.0], 2, mode="normalize_then_sum_raw", scale="none", clip=1.5)
    close(out.advantages, [-1, 1, -1.5, 1.5])
    # ... and only to the sum: R2 = [0,0 | 0,4] -> group 1 [-2, 2], weight 0.5 -> [-1, 1].
    # Clipping each component first would give 0.5 * [-1.5, 1.5] = [-0.75, 0.75].
    r = torch.tensor([[1.0, 3.0, 5.0, 5.0], [0.0, 0.0, 0.0, 4.0]])
    out = combine_rewards(r, [1.0, 0.5], 2, mode="normalize_then_sum_raw", scale="none", clip=1.5)
    close(out.advantages, [-1, 1, -1, 1])


def test_combine_rejects_wrong_weights():
    with pytest.raises(ValueError, match="weights"):
        combine_rewards(R, [1.0], group_size=2)


# ---------------------------------------------------------------- kl_estimator


def test_kl_estimators_hand_values():
    # log_ratio = logp - ref = [0, 1, -2]
    # k1 = [0, 1, -2]
    # k2 = 0.5 * lr^2 = [0, 0.5, 2]
    # k3 = exp(-lr) - 1 + lr = [1-1+0, e^-1 - 1 + 1, e^2 - 1 - 2] = [0, 0.36788, 4.38906]
    logp = torch.tensor([0.5, 1.0, -1.0])
    ref = torch.tensor([0.5, 0.0, 1.0])
    close(kl_estimator(logp, ref, "k1"), [0, 1, -2])
    close(kl_estimator(logp, ref, "k2"), [0, 0.5, 2])
    close(kl_estimator(logp, ref, "k3"), [0, math.exp(-1), math.exp(2) - 3], atol=1e-5)
    close(kl_estimator(logp, ref), [0, math.exp(-1), math.exp(2) - 3], atol=1e-5)  # default k3
    with pytest.raises(ValueError):
        kl_estimator(logp, ref, "k4")


def test_k3_nonnegative_and_all_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    k3 = kl_estimator(logp, ref, "k3")
    assert k3.shape == (4, 7) and (k3 >= 0).all()
    for kind in ("k1", "k2", "k3"):
        assert (kl_estimator(logp, logp, kind) == 0).all()


# ---------------------------------------------------------------- clipped_policy_loss


def test_ratio_one_gives_minus_advantage():
    # r = 1: min(1*A, 1*A) = A -> loss -A, broadcast over T; nothing clipped
    logp = torch.zeros(2, 3)
    loss, ratio, clipped = clipped_policy_loss(logp, logp, torch.tensor([2.0, -3.0]))
    close(loss, [[-2, -2, -2], [3, 3, 3]])
    assert (ratio == 1).all() and not clipped.any()


def test_clipping_each_sign():
    # eps = 0.2, one element per row:
    #   r 1.5, A +1: min(1.5, 1.2) = 1.2   -> loss -1.2, clipped
    #   r 1.5, A -1: min(-1.5, -1.2) = -1.5 -> loss  1.5, not clipped (pessimistic side)
    #   r 0.5, A -1: min(-0.5, -0.8) = -0.8 -> loss  0.8, clipped
    #   r 0.5, A +1: min(0.5, 0.8) = 0.5    -> loss -0.5, not clipped
    ratio = torch.tensor([[1.5], [1.5], [0.5], [0.5]])
    logp = ratio.log().requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, r, clipped = clipped_policy_loss(logp, torch.zeros(4, 1), adv, epsilon=0.2)
    close(loss, [[-1.2], [1.5], [0.8], [-0.5]])
    close(r, ratio)
    assert clipped.squeeze(1).tolist() == [True, False, True, False]
    # no gradient through the clipped branch; d(-r A)/dlogp = -r A elsewhere
    loss.sum().backward()
    close(logp.grad, [[0.0], [1.5], [0.0], [-0.5]])


def test_asymmetric_epsilon_high():
    # eps 0.2, eps_high 0.28 (DAPO): upper bound 1.28, lower bound still 0.8
    #   r 1.25, A +1: symmetric -> clip to 1.2, loss -1.2; with eps_high -> loss -1.25, unclipped
    #   r 1.30, A +1: clip to 1.28 -> loss -1.28, clipped
    #   r 0.75, A -1: min(-0.75, -0.8) = -0.8 -> loss 0.8, clipped (lower side unchanged)
    ratio = torch.tensor([[1.25], [1.30], [0.75]])
    adv = torch.tensor([1.0, 1.0, -1.0])
    old = torch.zeros(3, 1)
    loss, _, clipped = clipped_policy_loss(ratio.log(), old, adv, 0.2, epsilon_high=0.28)
    close(loss, [[-1.25], [-1.28], [0.8]])
    assert clipped.squeeze(1).tolist() == [False, True, True]
    loss, _, clipped = clipped_policy_loss(ratio.log(), old, adv, 0.2)
    close(loss, [[-1.2], [-1.2], [0.8]])
    assert clipped.squeeze(1).tolist() == [True, True, True]


# ---------------------------------------------------------------- aggregate

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # ragged: lengths 3 and 1


def test_aggregate_modes_ragged():
    # token_mean:    (1 + 2 + 3 + 4) / 4 tokens = 2.5
    # sequence_mean: mean(6/3, 4/1) = mean(2, 4) = 3
    # constant 3:    10 / (B=2 * 3) = 5/3
    close(aggregate(VALUES, MASK, "token_mean"), 2.5)
    close(aggregate(VALUES, MASK.float(), "sequence_mean"), 3.0)
    close(aggregate(VALUES, MASK, "constant", constant=3), 5 / 3)
    with pytest.raises(ValueError, match="constant"):
        aggregate(VALUES, MASK, "constant")


def test_aggregate_empty_mask_is_zero_not_nan():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in ("token_mean", "sequence_mean", "constant"):
        assert aggregate(VALUES, empty, mode, constant=3).item() == 0.0


# ---------------------------------------------------------------- grpo_loss


def test_grpo_loss_first_update_ratio_exactly_one_and_gradient():
    # logp == old_logp -> r = 1 exactly; per-element loss -A: row 0 -1 (x3 tokens), row 1 +1 (x1)
    # token_mean: (-1 - 1 - 1 + 1) / 4 = -0.5
    # d loss / d logp = -r A / 4 on masked tokens = [[-.25, -.25, -.25], [.25, 0, 0]]
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]], requires_grad=True)
    out = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), MASK)
    close(out.loss, -0.5)
    assert out.stats["ratio_mean"] == 1.0
    assert out.stats["ratio_max"] == 1.0 and out.stats["ratio_min"] == 1.0
    assert out.stats["clip_frac"] == 0.0 and out.stats["kl"] == 0.0
    assert out.stats["policy_loss"] == pytest.approx(-0.5)
    out.loss.backward()
    close(logp.grad, [[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]])
    # sequence_mean: mean(-1, +1) = 0
    close(grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), MASK,
                    agg="sequence_mean").loss, 0.0)


def test_grpo_loss_adds_beta_kl_and_stats_over_masked():
    # kl 0.5 everywhere, beta 0.1 -> every element +0.05: -0.5 + 0.05 = -0.45
    # ratio: row 0 token 0 has r = 1.5 with A = +1 -> clipped (1 of 4 masked) -> clip_frac 0.25;
    #   its loss is -1.2 instead of -1, so loss = (-1.2 - 1 - 1 + 1)/4 + 0.05 = -0.55 + 0.05
    #   = -0.5; the unmasked row-1 tokens have r = 9 (ignored by ratio_max)
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), 0.0, 0.0], [0.0, math.log(9), math.log(9)]])
    kl = torch.full((2, 3), 0.5)
    out = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), MASK, kl=kl, beta=0.1)
    close(out.loss, -0.5)
    assert out.stats["policy_loss"] == pytest.approx(-0.55)
    assert out.stats["kl"] == pytest.approx(0.5)
    assert out.stats["clip_frac"] == pytest.approx(0.25)
    assert out.stats["ratio_max"] == pytest.approx(1.5) and out.stats["ratio_min"] == 1.0
    assert out.stats["ratio_mean"] == pytest.approx((1.5 + 3) / 4)
    # beta = 0 ignores kl; beta > 0 without kl is an error
    close(grpo_loss(logp, old, torch.tensor([1.0, -1.0]), MASK, kl=kl).loss, -0.55)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logp, old, torch.tensor([1.0, -1.0]), MASK, beta=0.1)


# ---------------------------------------------------------------- kl_in_reward


def test_kl_in_reward():
    # masked KL sums: [0.1 + 0.2, 1+1+1, 0.4] = [0.3, 3, 0.4]; beta 0.5
    # -> [1 - 0.15, NaN stays NaN, 0.5 - 0.2] = [0.85, NaN, 0.3]
    rewards = torch.tensor([1.0, NAN, 0.5])
    kl = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0], [0.4, 0.4, 0.4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = kl_in_reward(rewards, kl, mask, beta=0.5)
    close(out[[0, 2]], [0.85, 0.3])
    assert torch.isnan(out[1])
    assert not out.requires_grad  # a reward is a constant to the policy gradient
