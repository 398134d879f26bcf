"""TRL parity of the caption-side GRPO options (issue #16 item 2).

The reference is TRL 1.16 itself where it can be driven: `GRPOTrainer._compute_loss` runs on a
trainer built with `object.__new__` (no model, no dataset), with only the attributes it reads set by
hand and `_get_per_token_logps_and_entropies` replaced by a function returning given log-probs.
Its loss, its gradient with respect to those log-probs and its logged kl / clip ratio are compared
with ours: `grpo.caption_loss_mask` -> `grpo.aggregation_weights` -> `grpo.micro_batch_loss` over
micro-batches, exactly as `Learner.train_encoder` calls them.

Advantages and the truncation rule live inside TRL's `_generate_and_score_completions`, which needs
a model, a tokenizer and generation: there the test re-derives TRL's lines in float64 (marked
"TRL:" below, using TRL's own `nanstd`) and compares `grpo.combine_rewards` / `grpo.truncated_rows`.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rl import grpo
from rl.config import EncoderOptim, RecipeError, load_recipe

trl_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402

GRPOTrainer = trl_trainer.GRPOTrainer
D = torch.float64
# our loss_agg -> TRL loss_type with the same normaliser
LOSS_TYPE = {"sequence_mean": "grpo", "token_mean": "bnpo", "constant": "dr_grpo"}
MAX_LEN = 6
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


class _Accelerator:
    """One process: reduce / gather are the identity."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    gather_for_metrics = gather


def trl_compute_loss(logp, old_logp, ref_logp, adv, mask, *, loss_agg, beta, epsilon, epsilon_high, level,
                     bias_correction_kl, top_entropy_quantile=1.0, entropies=None):
    """TRL's `_compute_loss` on given per-token log-probs (and entropies); returns (loss,
    trainer._metrics['train'])."""
    t = object.__new__(GRPOTrainer)
    t.__dict__.update(
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=LOSS_TYPE[loss_agg], epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,  # GRPOConfig's epsilon_high=None default
        use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, max_completion_length=MAX_LEN,
        accelerator=_Accelerator(), model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    ent = torch.zeros_like(logp) if entropies is None else entropies
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)
    n = logp.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp,
        "num_items_in_batch": mask.sum(),
    }
    return t._compute_loss(None, inputs), t._metrics["train"]


def our_loss(logp, old_logp, ref_logp, adv, mask, *, loss_agg, beta, epsilon, epsilon_high, level,
             bias_correction_kl, micro_batch=2, top_entropy_quantile=1.0, entropies=None):
    """Learner.train_encoder's computation, micro-batched; returns (loss, LossStats summary)."""
    w = grpo.aggregation_weights(mask, loss_agg, MAX_LEN)
    w_tok = grpo.aggregation_weights(mask, "token_mean")
    acc, total = grpo.LossStats(), 0.0
    for lo in range(0, logp.shape[0], micro_batch):
        rows = slice(lo, lo + micro_batch)
        kl = grpo.kl_estimator(logp[rows], ref_logp[rows], "k3") if beta > 0 else None
        keep = (grpo.high_entropy_mask(entropies[rows], mask[rows], top_entropy_quantile)
                if top_entropy_quantile < 1.0 else None)
        out = grpo.micro_batch_loss(logp[rows], old_logp[rows], adv[rows], w[rows], w_tok[rows], kl=kl, beta=beta,
                                    epsilon=epsilon, epsilon_high=epsilon_high, level=level,
                                    bias_correction_kl=bias_correction_kl, entropy_mask=keep)
        acc.add(out)
        total = total + out.loss
    return total, acc.summary()


def trl_advantages(rewards_per_func, weights, group_size, mode):
    """TRL 1.16 `_generate_and_score_completions`, the advantage lines (scale_rewards='group'), float64.
    rewards_per_func: (N, K) with NaN for None."""
    rpf, w = rewards_per_func.to(D), torch.tensor(weights, dtype=D)
    unscorable = torch.isnan(rpf).all(dim=1)
    if mode == "sum_then_normalize":
        rewards = (rpf * w.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
        std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
        adv = (rewards - mean) / (std + 1e-4)
    else:  # normalize_then_sum
        grouped = rpf.view(-1, group_size, rpf.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rpf.shape[1])
        rewards = (reward_k * w.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        adv = (rewards - torch.nanmean(rewards)) / (nanstd(rewards).expand_as(rewards) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def _batch(seed=0, n=8, t=MAX_LEN):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, t, generator=g, dtype=D) * 2)
    old = logp + 0.3 * torch.randn(n, t, generator=g, dtype=D)  # off-policy: ratios far from 1, some clipped
    ref = logp + 0.5 * torch.randn(n, t, generator=g, dtype=D)
    lengths = torch.tensor([6, 3, 1, 6, 4, 2, 5, 6])[:n]
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    # two groups of 4; group 1 has zero variance -> advantage 0 for its rows
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.5, 0.5, 0.5, 0.5])[:n]
    return logp, old, ref, mask, rewards


@pytest.mark.parametrize("loss_agg", ["sequence_mean", "token_mean", "constant"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias", [(0.0, False), (0.04, False), (0.04, True)])
def test_loss_gradient_and_stats_match_trl_compute_loss(loss_agg, level, beta, bias):
    logp, old, ref, completion_mask, rewards = _batch()
    adv_out = grpo.group_advantages(rewards, 4, clip=None)
    # TRL default: zero-variance rows stay in the mask with advantage 0 (drop_zero_variance false)
    mask = grpo.caption_loss_mask(completion_mask, adv_out.valid, torch.zeros(8, dtype=torch.bool))
    assert mask.sum() == completion_mask.sum()
    adv = adv_out.advantages.to(D)
    kw = dict(loss_agg=loss_agg, beta=beta, epsilon=0.2, epsilon_high=0.28, level=level, bias_correction_kl=bias)

    lp_trl = logp.clone().requires_grad_(True)
    loss_trl, metrics = trl_compute_loss(lp_trl, old, ref, adv.clone(), completion_mask.to(D), **kw)
    loss_trl.backward()
    lp_ours = logp.clone().requires_grad_(True)
    loss_ours, stats = our_loss(lp_ours, old, ref, adv, mask, **kw)
    loss_ours.backward()

    torch.testing.assert_close(loss_ours.detach(), loss_trl.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp_ours.grad, lp_trl.grad, atol=1e-6, rtol=0)
    assert stats["loss"] == pytest.approx(float(loss_trl.detach()), abs=1e-6)
    if beta > 0:  # TRL logs the (corrected) KL as a token mean over all rows' tokens
        assert stats["kl"] == pytest.approx(metrics["kl"][0], abs=1e-6)
    if level == "token":  # TRL's region clip ratio is a masked token mean, as ours
        assert stats["clip_frac"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
        assert stats["clip_frac"] > 0


def test_zero_variance_rows_kl_counts_by_default_and_not_when_dropped():
    logp, old, ref, completion_mask, rewards = _batch()
    a = grpo.group_advantages(rewards, 4, clip=None)
    no_trunc = torch.zeros(8, dtype=torch.bool)
    keep = grpo.caption_loss_mask(completion_mask, a.valid, no_trunc)
    drop = grpo.caption_loss_mask(completion_mask, a.valid, no_trunc, drop_zero_variance=True)
    assert keep[4:].sum() > 0 and drop[4:].sum() == 0  # group 1 (zero variance) only in TRL's mask
    kw = dict(loss_agg="token_mean", beta=0.04, epsilon=0.2, epsilon_high=None, level="token", bias_correction_kl=False)
    lp = logp.clone().requires_grad_(True)
    our_loss(lp, old, ref, a.advantages.to(D), keep, **kw)[0].backward()
    assert lp.grad[4:].abs().sum() > 0  # their KL pulls them to the reference
    lp = logp.clone().requires_grad_(True)
    our_loss(lp, old, ref, a.advantages.to(D), drop, **kw)[0].backward()
    assert lp.grad[4:].abs().sum() == 0


def test_mask_truncated_completions_matches_trl_rule_and_loss():
    eos, pad = 7, 0
    # rows: finished at t=2; finished at the last position; truncated (no EOS); finished at t=0
    ids = torch.tensor([[3, 4, eos, pad], [5, 6, 5, eos], [1, 2, 3, 4], [eos, pad, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    truncated = grpo.truncated_rows(ids, mask, eos)
    # TRL: is_truncated = ids[-1] not in eos_and_pad, over the unpadded completion of each row
    trl = torch.tensor([row[m.bool()].tolist()[-1] not in (eos, pad) for row, m in zip(ids, mask)])
    assert truncated.tolist() == trl.tolist() == [False, False, True, False]
    # TRL: completion_mask * (~is_truncated): the loss of the masked batch equals TRL's on it
    valid = torch.ones(4, dtype=torch.bool)
    ours = grpo.caption_loss_mask(mask, valid, truncated, mask_truncated=True)
    torch.testing.assert_close(ours, (mask * (~trl).unsqueeze(1)).float())
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(4, 4, generator=g, dtype=D), -torch.rand(4, 4, generator=g, dtype=D)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=D)
    kw = dict(loss_agg="sequence_mean", beta=0.0, epsilon=0.2, epsilon_high=None, level="token",
              bias_correction_kl=False)
    loss_trl, _ = trl_compute_loss(logp, old, logp, adv, ours.to(D), **kw)
    loss_ours, _ = our_loss(logp, old, logp, adv, ours, **kw)
    assert float(loss_ours) == pytest.approx(float(loss_trl), abs=1e-6)


@pytest.mark.parametrize("mode", ["sum_then_normalize", "normalize_then_sum"])
def test_advantages_match_trl(mode):
    nan = float("nan")
    # N = 9 rows (3 groups of 3), K = 2 rewards; group 1 zero-variance in reward 0, a missing score,
    # and one unscorable row (both None) in group 2
    r = torch.tensor([[0.2, 1.0, 0.5, 0.3, 0.3, 0.3, 0.9, nan, 0.1],
                      [2.0, 0.0, 1.0, 1.0, 3.0, 2.0, 0.5, nan, nan]])
    weights = [1.0, 0.5]
    if mode == "sum_then_normalize":
        # the one deliberate difference: TRL's nansum counts row 8's missing reward 1 as 0, ours
        # fills in reward 1's group mean (issue 19, item 5); TRL's code sees the filled-in matrix
        r_trl = grpo.fill_missing(r, 3)
        assert r_trl[1, 8] == pytest.approx(0.5) and torch.isnan(r_trl[:, 7]).all()
    else:
        r_trl = r  # a missing normalised term is 0, the group mean, in both
    ours = grpo.combine_rewards(r, weights, 3, mode=mode, scale="group", clip=None).advantages
    ref = trl_advantages(r_trl.T, weights, 3, mode)
    torch.testing.assert_close(ours.to(D), ref, atol=1e-5, rtol=0)
    assert ours[7] == 0  # unscorable: advantage 0, as TRL's nan_to_num


def test_bias_correction_refused_with_beta_zero():
    with pytest.raises(ValueError, match="grpo.encoder.use_bias_correction_kl.*grpo.encoder.beta"):
        EncoderOptim(lr=1e-5, beta=0.0, use_bias_correction_kl=True)
    assert not EncoderOptim(lr=1e-5, beta=0.0).bias_correction_kl()  # None: TRL's default, on only with a KL
    assert EncoderOptim(lr=1e-5, beta=0.04).bias_correction_kl()
    assert not EncoderOptim(lr=1e-5, beta=0.04, use_bias_correction_kl=False).bias_correction_kl()


def test_recipe_load_refuses_bias_correction_without_kl():
    with pytest.raises(RecipeError, match="use_bias_correction_kl"):
        load_recipe(RECIPE, ["grpo.encoder.beta=0", "grpo.encoder.use_bias_correction_kl=true"], check_files=False)


def test_generate_captions_top_k_reaches_generate():
    """TRL's sampling kwargs: top_k=1 sampling is greedy decoding; defaults (top_k None, min_p None,
    repetition_penalty 1) leave sampling as it was."""
    from rl.models.encoder import build_tiny_encoder
    from rl.shapes import VOCABULARY, generate_shapes
    from rollouts.captions import generate_captions

    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    enc.model.eval()
    images = [r.image for r in generate_shapes(2, seed=3)]
    greedy = generate_captions(enc, images, 1, max_new_tokens=8, greedy=True)
    top1 = generate_captions(enc, images, 1, max_new_tokens=8, top_k=1, seed=5)
    assert top1.captions == greedy.captions
    assert generate_captions(enc, images, 1, max_new_tokens=8, seed=5).captions != greedy.captions  # top_k mattered
    a = generate_captions(enc, images, 2, max_new_tokens=8, seed=5)
    b = generate_captions(enc, images, 2, max_new_tokens=8, seed=5, top_k=0, min_p=None, repetition_penalty=1.0)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_recipe_sampling_filters_reach_generation(monkeypatch):
    """rollout.caption.top_k / min_p / repetition_penalty / generate_loop go from the recipe to generate_captions."""
    import rollouts.actors as actors
    from rl.config import Recipe

    seen = {}

    def fake(encoder, images, group_size, **kw):
        seen.update(kw)
        return "group"

    monkeypatch.setattr(actors, "generate_captions", fake)
    recipe = Recipe.model_validate({"device": "cpu", "rollout": {"caption": {"top_k": 5, "min_p": 0.1,
                                                                         "repetition_penalty": 1.2,
                                                                         "generate_loop": "hf"}}})
    worker = actors.RolloutWorker.__new__(actors.RolloutWorker)
    worker.recipe, worker.vllm, worker.version, worker.models = recipe, None, 0, type("M", (), {"encoder": None})()
    assert worker.captions([], 2, seed=0) == "group"
    assert (seen["top_k"], seen["min_p"], seen["repetition_penalty"], seen["loop"]) == (5, 0.1, 1.2, "hf")


# ----------------------------------------------------------------------------------------------
# top_entropy_quantile (Wang et al. 2025; TRL get_high_entropy_mask)
# ----------------------------------------------------------------------------------------------
class _TwoRanks(_Accelerator):
    """This rank plus another rank holding `other` (1-D masked entropies): TRL pads both to the
    longer length with its sentinel and gathers them."""

    num_processes = 2

    def __init__(self, other):
        self.other = other

    def pad_across_processes(self, x, dim=0, pad_index=0):
        n = max(x.numel(), self.other.numel())
        self._pad = lambda v: torch.cat([v, v.new_full((n - v.numel(),), pad_index)])
        return self._pad(x)

    def gather(self, x):
        return torch.cat([x, self._pad(self.other.to(x.dtype))])


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("ranks", [1, 2])
def test_high_entropy_mask_equals_trl(quantile, ranks):
    g = torch.Generator().manual_seed(3)
    # float32 as the learner's entropies (TRL takes the quantile in float32: float64 entropies could
    # lose their maximum to the rounding of the threshold at quantile 0)
    entropies = torch.rand(6, 5, generator=g) * 3
    entropies[0, :2] = entropies[1, 3]  # ties at the threshold are kept (>=)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    other = torch.rand(7, generator=g) * 3  # the second rank's masked entropies (fewer, longer)
    t = object.__new__(GRPOTrainer)
    t.accelerator = _Accelerator() if ranks == 1 else _TwoRanks(other)
    trl = t.get_high_entropy_mask(entropies, mask, 1 - quantile)
    gather = None if ranks == 1 else (lambda x: torch.cat([x, other]))
    ours = grpo.high_entropy_mask(entropies, mask, quantile, gather)
    assert torch.equal(ours, trl)
    assert 0 < int(ours.sum()) <= int(mask.sum())
    assert quantile < 1.0 or torch.equal(ours, mask.bool())
    # a rank with no masked token keeps none (the other rank's values still set the threshold)
    none = torch.zeros_like(mask)
    empty = grpo.high_entropy_mask(entropies, none, quantile, gather)
    assert torch.equal(empty, t.get_high_entropy_mask(entropies, none, 1 - quantile)) and not empty.any()


@pytest.mark.parametrize("loss_agg", ["sequence_mean", "token_mean", "constant"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_top_entropy_quantile_loss_and_gradient_match_trl(loss_agg, level):
    logp, old, ref, mask, rewards = _batch(seed=4)
    adv = grpo.group_advantages(rewards, 4, clip=None).advantages.to(D)
    entropies = torch.rand(mask.shape, generator=torch.Generator().manual_seed(5)) * 2
    kw = dict(loss_agg=loss_agg, beta=0.04, epsilon=0.2, epsilon_high=0.28, level=level, bias_correction_kl=True,
              top_entropy_quantile=0.2, entropies=entropies)
    lp_trl = logp.clone().requires_grad_(True)
    loss_trl, _ = trl_compute_loss(lp_trl, old, ref, adv.clone(), mask.to(D), **kw)
    loss_trl.backward()
    # TRL takes the quantile over its micro-batch: ours over the same rows (one micro-batch here)
    lp_ours = logp.clone().requires_grad_(True)
    loss_ours, _ = our_loss(lp_ours, old, ref, adv, mask, micro_batch=8, **kw)
    loss_ours.backward()
    torch.testing.assert_close(loss_ours.detach(), loss_trl.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp_ours.grad, lp_trl.grad, atol=1e-6, rtol=0)
    # the masked tokens keep their KL term only: the loss differs from the unmasked one
    full, _ = our_loss(logp, old, ref, adv, mask, micro_batch=8, **{**kw, "top_entropy_quantile": 1.0})
    assert abs(float(full) - float(loss_ours.detach())) > 1e-4
