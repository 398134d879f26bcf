"""The vLLM caption path's parts that run without vLLM or a GPU (issue #16 item 3).

- what VLLMCaptioner asks of vLLM (`vllm_engine_kwargs`, `vllm_sampling_kwargs`): the encoder's
  suppressed tokens blocked, the rollout temperature, processed (post-temperature) log-probs;
- the truncated importance-sampling weights (`grpo.rollout_is_weights`) against a float64 copy of
  TRL 1.16's formula, and `micro_batch_loss(is_weights=...)` against TRL's `_compute_loss` with vLLM on;
- the learner applying them only to groups sampled by vLLM, and nothing changing for hf groups.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from rl import grpo
from rl.config import Recipe
from rl.models.encoder import build_tiny_encoder
from rl.shapes import VOCABULARY, generate_shapes
from rollouts.captions import (BLOCKED_LOGIT_BIAS, _chunk_logprobs, group_from_samples, sampled_logprobs,
                               vllm_engine_kwargs, vllm_sampling_kwargs)

D = torch.float64
MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.fixture(scope="module")
def encoder():
    enc = build_tiny_encoder(VOCABULARY, image_size=32, seed=0)
    enc.model.eval()
    return enc


# ------------------------------------------------------------------------------------------------
# what vLLM is asked for
# ------------------------------------------------------------------------------------------------
def test_sampling_kwargs_block_the_suppressed_ids_at_the_rollout_temperature(encoder):
    blocked = encoder.suppressed_ids
    kw = vllm_sampling_kwargs(4, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3, blocked_ids=blocked,
                              eos_id=encoder.eos_token_id)
    tok = encoder.tokenizer.convert_tokens_to_ids
    assert {tok("<|image_pad|>"), tok("<|endoftext|>"), tok("<|im_start|>")} <= set(kw["logit_bias"])
    assert kw["logit_bias"] == {i: BLOCKED_LOGIT_BIAS for i in blocked}
    assert kw["stop_token_ids"] == [encoder.eos_token_id] and encoder.eos_token_id not in kw["logit_bias"]
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["max_tokens"], kw["seed"]) == (4, 0.7, 0.9, 12, 3)
    assert kw["logprobs"] == 0  # the sampled token's log-prob only


def test_logit_bias_then_temperature_is_the_learners_suppressed_distribution(encoder):
    """vLLM adds the bias, divides by T, log-softmaxes (processed_logprobs); the learner fills the
    suppressed ids after dividing by T. Same log-probs, blocked tokens at probability exactly 0."""
    torch.manual_seed(0)
    v, t = 300, 0.7
    blocked = [i for i in encoder.suppressed_ids if i < v] + [5, 17]
    logits = 8 * torch.randn(6, v)
    bias = torch.zeros(v)
    for i, b in vllm_sampling_kwargs(1, max_new_tokens=1, temperature=t, top_p=1.0, seed=0,
                                     blocked_ids=blocked)["logit_bias"].items():
        bias[i] = b
    vllm_logp = ((logits + bias) / t).log_softmax(-1)  # (6, V) processed log-probs
    assert torch.all(vllm_logp[:, blocked].exp() == 0) and torch.isfinite(vllm_logp).all()
    ids = torch.tensor([i for i in range(v) if i not in blocked][:6])  # unblocked tokens
    learner, _ = _chunk_logprobs(torch.nn.Identity(), logits, ids, t, torch.tensor(blocked), with_entropy=False)
    torch.testing.assert_close(vllm_logp[torch.arange(6), ids], learner, rtol=0, atol=1e-5)


def test_engine_kwargs_ask_for_processed_logprobs():
    kw = vllm_engine_kwargs("Qwen/Qwen2.5-VL-3B-Instruct", max_lora_rank=16)
    assert kw["logprobs_mode"] == "processed_logprobs"  # after logit bias and temperature, as TRL sets it
    assert kw["enable_lora"] and kw["max_lora_rank"] == 16 and kw["limit_mm_per_prompt"] == {"image": 1}


def test_sampled_logprobs_are_read_by_token_id():
    lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731  vLLM's Logprob
    # position 1: the sampled token (9) is listed after a more likely one
    assert sampled_logprobs([4, 9], [{4: lp(-0.5)}, {2: lp(-0.1), 9: lp(-2.0)}]) == [-0.5, -2.0]


def test_group_from_samples_pads_like_generate_captions_and_says_vllm(encoder):
    images = [r.image for r in generate_shapes(2, seed=3)]
    inputs = encoder.prepare(encoder.resized(images))
    eos, pad = encoder.eos_token_id, encoder.pad_token_id
    outs = [[([7, 8, eos], [-1.0, -2.0, -0.5]), ([9, eos], [-0.25, -0.75])],
            [([7, 7, 7, 7], [-1.0] * 4), ([eos], [-0.1])]]  # row 2 ran to max_new_tokens (no EOS)
    group = group_from_samples(encoder, inputs, outs, 2, version=5)
    assert group.sampler == "vllm" and group.version == 5 and group.group_size == 2
    assert torch.equal(group.completion_ids, torch.tensor([[7, 8, eos, pad], [9, eos, pad, pad],
                                                           [7, 7, 7, 7], [eos, pad, pad, pad]]))
    assert torch.equal(group.completion_mask, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert torch.equal(group.logprobs[1], torch.tensor([-0.25, -0.75, 0.0, 0.0]))  # padding: 0
    assert torch.equal(group.prompt_ids, inputs["input_ids"])


# ------------------------------------------------------------------------------------------------
# the truncated importance-sampling weights
# ------------------------------------------------------------------------------------------------
def trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, its vLLM IS block, in float64."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 2.0), (0.5, None)])
def test_rollout_is_weights_match_trl(mode, clip_min, clip_max):
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        pytest.skip("refused by the config")
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 5, generator=g, dtype=D) * 3
    sampling = old + 0.6 * torch.randn(6, 5, generator=g, dtype=D)  # some ratios beyond the bounds
    sampling[2, 1] = float("nan")  # vLLM gave none: weight 1 on that token
    mask = torch.tensor([[1, 1, 1, 1, 0]] * 3 + [[1, 1, 0, 0, 0]] * 3, dtype=D)
    ours = grpo.rollout_is_weights(old, sampling, mask, mode, clip_min, clip_max)
    ref = trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max)
    assert ours.shape == ((6, 1) if mode.startswith("sequence") else (6, 5))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    assert torch.isfinite(ours).all()
    if mode.endswith("mask"):  # the draw puts ratios on both sides of the bounds
        assert (ours == 0).any() and (ours > 0).any()


def test_rollout_is_weights_are_one_when_the_engines_agree():
    logp = -torch.rand(4, 6)
    mask = torch.ones(4, 6)
    for mode in MODES:
        assert torch.equal(grpo.rollout_is_weights(logp, logp.clone(), mask, mode), torch.ones_like(
            logp[:, :1] if mode.startswith("sequence") else logp))


LOSS_TYPE = {"sequence_mean": "grpo", "token_mean": "bnpo", "constant": "dr_grpo"}
MAX_LEN = 6


def trl_loss_with_vllm_is(logp, old, ref, adv, mask, is_ratio, *, loss_agg, beta, bias):
    """TRL's `_compute_loss` with use_vllm and the IS correction on (as test_trl_parity's driver)."""
    t = object.__new__(GRPOTrainer)
    t.__dict__.update(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=LOSS_TYPE[loss_agg], epsilon_low=0.2, epsilon_high=0.28, use_vllm=True,
        vllm_importance_sampling_correction=True, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, max_completion_length=MAX_LEN,
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=bias, delta=None, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    n = logp.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(), "importance_sampling_ratio": is_ratio,
    }
    return t._compute_loss(None, inputs)


@pytest.mark.parametrize("loss_agg", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
@pytest.mark.parametrize("beta,bias", [(0.0, False), (0.04, True), (0.04, False)])
def test_micro_batch_loss_with_is_weights_matches_trl(loss_agg, mode, beta, bias):
    g = torch.Generator().manual_seed(1)
    n = 8
    mask = (torch.arange(MAX_LEN) < torch.randint(1, MAX_LEN + 1, (n, 1), generator=g)).to(D)
    old = -torch.rand(n, MAX_LEN, generator=g, dtype=D) * 2
    sampling = old + 0.4 * torch.randn(n, MAX_LEN, generator=g, dtype=D)
    ref = old + 0.1 * torch.randn(n, MAX_LEN, generator=g, dtype=D)
    adv = torch.randn(n, generator=g, dtype=D)
    is_ratio = grpo.rollout_is_weights(old, sampling, mask, mode, None, 3.0)
    base = (old + 0.2 * torch.randn(n, MAX_LEN, generator=g, dtype=D)).detach()

    logp_trl = base.clone().requires_grad_(True)
    trl = trl_loss_with_vllm_is(logp_trl, old, ref, adv, mask, is_ratio, loss_agg=loss_agg, beta=beta, bias=bias)
    trl.backward()

    logp = base.clone().requires_grad_(True)
    w, w_tok = grpo.aggregation_weights(mask, loss_agg, MAX_LEN), grpo.aggregation_weights(mask, "token_mean")
    total = 0.0
    for lo in range(0, n, 3):  # micro-batches, as the learner
        rows = slice(lo, lo + 3)
        kl = grpo.kl_estimator(logp[rows], ref[rows], "k3") if beta > 0 else None
        total = total + grpo.micro_batch_loss(logp[rows], old[rows], adv[rows], w[rows], w_tok[rows], kl=kl, beta=beta,
                                              epsilon=0.2, epsilon_high=0.28, bias_correction_kl=bias,
                                              is_weights=is_ratio[rows]).loss
    total.backward()
    # aggregation_weights are float32 (the learner's), so float32 agreement
    torch.testing.assert_close(total, trl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp.grad, logp_trl.grad, rtol=1e-6, atol=1e-7)


def test_micro_batch_loss_without_is_weights_is_unchanged():
    g = torch.Generator().manual_seed(2)
    logp, old = -torch.rand(4, 5, generator=g), -torch.rand(4, 5, generator=g)
    adv, mask = torch.randn(4, generator=g), torch.ones(4, 5)
    w = grpo.aggregation_weights(mask)
    a = grpo.micro_batch_loss(logp, old, adv, w, w, kl=None)
    b = grpo.micro_batch_loss(logp, old, adv, w, w, kl=None, is_weights=torch.ones(4, 1))
    assert torch.equal(a.loss, b.loss) and a.stats == b.stats


def test_recipe_is_fields_default_to_trl_and_refuse_empty_bounds():
    enc = Recipe.model_validate({}).grpo.encoder
    assert enc.vllm_importance_sampling_correction is True
    assert enc.vllm_importance_sampling_mode == "sequence_mask"  # TRL 1.16 defaults
    assert enc.vllm_importance_sampling_clip_max == 3.0 and enc.vllm_importance_sampling_clip_min is None
    with pytest.raises(ValueError, match="clip_max"):
        Recipe.model_validate({"grpo": {"encoder": {"lr": 1e-5, "vllm_importance_sampling_mode": "token_truncate",
                                                    "vllm_importance_sampling_clip_max": None}}})
    with pytest.raises(ValueError, match="clip_min"):
        Recipe.model_validate({"grpo": {"encoder": {"lr": 1e-5, "vllm_importance_sampling_clip_min": 3.0}}})


# ------------------------------------------------------------------------------------------------
# the learner: weights for vLLM groups only
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    from rl.learner import Learner
    from rollouts.actors import RolloutWorker

    recipe = Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": 2, "caption": {"max_new_tokens": 6},
                    "trajectory": {"num_steps": 2, "render_steps": 2}},
        "grpo": {"encoder": {"lr": 1e-2, "beta": 0.0}, "decoder": {"lr": 1e-2}},
        "learner": {"micro_batch_size": 2},  # two micro-batches: weights per micro-batch
    })
    learner = Learner(recipe)
    worker = RolloutWorker(recipe, models=learner.models)
    records = generate_shapes(2, seed=1)
    return recipe, learner, worker, [r.image for r in records]


def _expected_policy_loss(recipe, learner, group, adv, is_rows):
    """At ratio 1 (the first pass) -min(r A, clip(r) A) = -A: the policy loss is sum -A_i rho_i w_it."""
    truncated = grpo.truncated_rows(group.completion_ids, group.completion_mask, learner.models.encoder.eos_token_id)
    mask = grpo.caption_loss_mask(group.completion_mask, adv.valid, truncated)
    w = grpo.aggregation_weights(mask, recipe.grpo.loss_agg, recipe.rollout.caption.max_new_tokens)
    return float((-adv.advantages.unsqueeze(1) * is_rows * w).sum())


def test_learner_weighs_vllm_groups_only(setup):
    from rollouts.captions import completion_logprobs

    recipe, learner, worker, images = setup
    g = recipe.rollout.group_size
    worker.version = learner.version
    group = worker.captions(images, g, seed=1)
    assert group.sampler == "hf"
    n = len(group.captions)
    adv = grpo.group_advantages(torch.arange(n, dtype=torch.float32) % g, g)

    # hf: no weights (exactly 1), no IS statistics
    hf = learner.train_encoder(group, adv.advantages, adv.valid)
    assert "is_ratio_mean" not in hf and hf["ratio_mean"] == 1.0
    assert hf["policy_loss"] == pytest.approx(_expected_policy_loss(recipe, learner, group, adv, torch.ones(n, 1)),
                                              rel=1e-5, abs=1e-7)

    # vLLM, one version stale, its log-probs off the learner's by a per-row shift: sequence_mask
    # weights exp(shift_i * len_i), 0 above 3.0.
    worker.version = learner.version
    group = worker.captions(images, g, seed=2)
    with torch.no_grad():
        learner_logp, _ = completion_logprobs(learner.models.encoder.model, group, recipe.rollout.caption.temperature,
                                              learner.models.encoder.suppressed_ids)
    shift = torch.tensor([0.05, -0.1, 2.0, 0.0, 0.1, -0.3])[:n]  # row 2 above the cap
    vllm = group._replace(sampler="vllm", version=learner.version - 1,
                          logprobs=(learner_logp - shift.unsqueeze(1)) * group.completion_mask)
    lengths = group.completion_mask.sum(1).float()
    rho = torch.exp(shift * lengths)
    rho = torch.where(rho > 3.0, torch.zeros_like(rho), rho)  # (N,)
    stats = learner.train_encoder(vllm, adv.advantages, adv.valid)
    assert stats["stale_rollout"] == 1.0
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # pi_old: the learner's own first pass
    assert stats["is_ratio_mean"] == pytest.approx(float(rho.mean()), rel=1e-4)
    assert stats["is_ratio_min"] == 0.0 and stats["is_ratio_max"] == pytest.approx(float(rho.max()), rel=1e-4)
    assert stats["policy_loss"] == pytest.approx(_expected_policy_loss(recipe, learner, vllm, adv, rho.unsqueeze(1)),
                                                 rel=1e-4, abs=1e-7)
    assert torch.isfinite(torch.tensor(stats["loss"]))
