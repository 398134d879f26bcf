"""Micro-batched decoder rollouts (rollouts/trajectories.py, rollouts/actors.py).

What `rollout.micro_batch_size` promises: no transformer call, VAE decode or caption re-reading
sees more than a micro-batch of rows, and the results do not depend on it (each row's SDE noise
comes from its own generator), up to float round-off in batched matmuls. `step_logprobs` scores
any subset of steps and rows as the all-at-once call does, and per-step, per-slice backward
passes add up to the full gradient (Flow-GRPO's per-timestep loop). Tiny models, CPU.
"""

import numpy as np
import pytest
import torch

from rl import adapters
from rl.config import Recipe
from rl.models.unified import build_models
from rl.shapes import generate_shapes
from rollouts import captions as caption_rollouts
from rollouts.actors import RolloutWorker
from rollouts.trajectories import Uncond, render, row_generator, sample_trajectories, step_logprobs

NUM_STEPS, GROUP, A = 6, 3, 0.7
# Batched matmuls and convolutions over other row counts may differ in the last bits: 1e-6 on
# latents and log-probs (observed: 5e-7), 1e-5 on decoded images (observed: 2e-6, the VAE amplifies).
ATOL, IMAGE_ATOL = 1e-6, 1e-5


def small_recipe(micro_batch_size=None, **trajectory) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": GROUP, "micro_batch_size": micro_batch_size,
                    "caption": {"max_new_tokens": 6},
                    "trajectory": {"num_steps": NUM_STEPS, "eval_steps": 5, "render_steps": 4,
                                   "noise_level": A, **trajectory}},
    })


@pytest.fixture(scope="module")
def models():
    return build_models(small_recipe(), torch.device("cpu"))


def conditions(models, b: int = 2):
    """(cond (b, L, D), mask (b, L), pooled (b, P)) of b fixed captions (one shorter), and Uncond."""
    ids = torch.randint(10, 60, (b, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    ids[1, 3:] = models.encoder.pad_token_id
    with torch.no_grad():
        cond, cmask, pooled = models.condition(ids, mask)
        empty = torch.zeros((1, 0), dtype=torch.long)
        uncond = Uncond(*models.condition(empty, empty))
    return cond, cmask, pooled, uncond


class RowCounter:
    """Records the batch size of every transformer call and VAE decode of a decoder."""

    def __init__(self, decoder, monkeypatch):
        self.velocity, self.decode = [], []
        real_velocity, real_decode = decoder.velocity, decoder.decode

        def velocity(x, *args, **kw):
            self.velocity.append(x.shape[0])
            return real_velocity(x, *args, **kw)

        def decode(latents):
            self.decode.append(latents.shape[0])
            return real_decode(latents)

        monkeypatch.setattr(decoder, "velocity", velocity)
        monkeypatch.setattr(decoder, "decode", decode)


SETTINGS = {
    "window": dict(sde_window=2),
    "fraction+cfg": dict(timestep_fraction=0.5, cfg_scale=3.0, cfg_in_training=False),
    "cps+cfg": dict(sampler="cps", cfg_scale=2.0),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_trajectories_do_not_depend_on_the_micro_batch(models, setting, monkeypatch):
    cond, mask, pooled, uncond = conditions(models)
    kw = dict(num_steps=NUM_STEPS, noise_level=A, seed=4, uncond=uncond, **SETTINGS[setting])
    full = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, **kw)
    guided = kw.get("cfg_scale", 1.0) != 1.0
    for mb in (1, 2, GROUP, 4):
        counter = RowCounter(models.decoder, monkeypatch)
        traj = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, micro_batch_size=mb, **kw)
        # Every transformer call and decode took at most mb rows (2 mb with guidance: [uncond; cond]).
        assert max(counter.velocity) == min(mb, 2 * GROUP) * (2 if guided else 1)
        assert max(counter.decode) == min(mb, 2 * GROUP) and sum(counter.decode) == 2 * GROUP
        monkeypatch.undo()
        for name in ("cond", "cond_mask", "pooled", "sigmas", "sigmas_next", "steps"):
            assert torch.equal(getattr(traj, name), getattr(full, name)), name
        for name in ("latents", "next_latents", "log_probs"):
            torch.testing.assert_close(getattr(traj, name), getattr(full, name), rtol=0, atol=ATOL, msg=name)
        torch.testing.assert_close(traj.images, full.images, rtol=0, atol=IMAGE_ATOL)
    # The SDE steps spread each group (different noise per row), and the rollout is reproducible.
    x = full.next_latents[:, 0]
    assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[GROUP], x[GROUP + 1])
    again = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, **kw)
    assert torch.equal(again.next_latents, full.next_latents)


def test_a_rows_trajectory_does_not_depend_on_the_other_conditions(models):
    """Row r's noise is row_generator(seed, r): the first group sampled alone is the first group
    sampled beside a second condition."""
    cond, mask, pooled, _ = conditions(models)
    kw = dict(num_steps=NUM_STEPS, noise_level=A, seed=9, sde_window=3)
    both = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, **kw)
    alone = sample_trajectories(models.decoder, cond[:1], mask[:1], pooled[:1], GROUP, **kw)
    torch.testing.assert_close(alone.next_latents, both.next_latents[:GROUP], rtol=0, atol=ATOL)
    torch.testing.assert_close(alone.log_probs, both.log_probs[:GROUP], rtol=0, atol=ATOL)
    # Distinct seeds per (rollout, row): no two rows, in one rollout or across two, share a stream.
    cpu = torch.device("cpu")
    draws = {float(torch.randn(1, generator=row_generator(s, r, cpu))) for s in (0, 1) for r in range(8)}
    assert len(draws) == 16


def test_renders_do_not_depend_on_the_micro_batch(models, monkeypatch):
    cond, mask, pooled, uncond = conditions(models)
    cond, mask, pooled = (t.repeat(2, *[1] * (t.ndim - 1)) for t in (cond, mask, pooled))  # 4 rows
    seeds = [5, 6, 7, 8]
    for kw in ({}, dict(uncond=uncond, cfg_scale=3.0)):
        full = render(models.decoder, cond, mask, pooled, 4, seeds, **kw)
        for mb in (1, 3):
            counter = RowCounter(models.decoder, monkeypatch)
            images = render(models.decoder, cond, mask, pooled, 4, seeds, micro_batch_size=mb, **kw)
            assert max(counter.decode) == mb and sum(counter.decode) == 4
            assert max(counter.velocity) == mb * (2 if kw else 1)
            monkeypatch.undo()
            torch.testing.assert_close(images, full, rtol=0, atol=IMAGE_ATOL)


# ----------------------------------------------------------------------------------------------
# the learner's side: any steps, any rows
# ----------------------------------------------------------------------------------------------
def test_step_logprobs_on_step_and_row_subsets_equal_the_full_call(models):
    cond, mask, pooled, uncond = conditions(models)
    traj = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A,
                               seed=2, sde_window=3, uncond=uncond, cfg_scale=2.0)
    with torch.no_grad():
        full = step_logprobs(models.decoder, traj, A, cfg_scale=2.0)
        assert torch.equal(full[0], traj.log_probs)  # same batch as the rollout: bit for bit
        n, s = traj.log_probs.shape
        assert (full[0].shape, full[1].shape, full[2].shape) == ((n, s), traj.latents.shape, (n, s, 1, 1, 1))
        for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
            for steps in ([0], [2], [2, 0]):
                part = step_logprobs(models.decoder, traj, A, rows=rows, steps=steps, cfg_scale=2.0)
                k = len(steps)
                assert part[0].shape == (rows.stop - rows.start, k) and part[2].shape[1] == k
                for got, want in zip(part, full):
                    torch.testing.assert_close(got, want[rows][:, steps], rtol=0, atol=ATOL)


def test_per_step_per_slice_backward_adds_up_to_the_full_gradient():
    """Flow-GRPO's loop: backward one (step, micro-batch) at a time, accumulating gradients, gives
    the gradient of the all-at-once loss. Needs a non-zero LoRA B so that every factor gets one."""
    models = build_models(small_recipe(), torch.device("cpu"))
    params = adapters.adapter_parameters(models.decoder.transformer)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    cond, mask, pooled, _ = conditions(models)
    traj = sample_trajectories(models.decoder, cond, mask, pooled, GROUP, num_steps=NUM_STEPS, noise_level=A,
                               seed=3, sde_window=2)
    weights = torch.randn(traj.log_probs.shape, generator=torch.Generator().manual_seed(0))
    lp, _, _ = step_logprobs(models.decoder, traj, A)
    full = torch.autograd.grad((lp * weights).sum(), params)
    for p in params:
        p.grad = None
    for s in range(traj.log_probs.shape[1]):
        for rows in (slice(0, 4), slice(4, 6)):
            lp, _, _ = step_logprobs(models.decoder, traj, A, rows=rows, steps=[s])
            (lp[:, 0] * weights[rows, s]).sum().backward()
    assert any(g.abs().max() > 0 for g in full)
    for p, want in zip(params, full):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# the rollout worker
# ----------------------------------------------------------------------------------------------
def test_worker_rollouts_run_micro_batches_and_match_the_full_batch(models, monkeypatch):
    records = generate_shapes(2, seed=1)
    images = [r.image for r in records]
    full = RolloutWorker(small_recipe(None, sde_window=2, cfg_scale=2.0), models=models)
    micro = RolloutWorker(small_recipe(2, sde_window=2, cfg_scale=2.0), models=models)
    traj_full, captions_full, renders_full = full.decoder_rollout(images, seed=5)

    condition_rows, generate_rows = [], []
    real_condition, real_generate = models.condition, caption_rollouts.lean_generate  # rollout.caption.generate_loop: lean
    monkeypatch.setattr(models, "condition",
                        lambda ids, m: condition_rows.append(ids.shape[0]) or real_condition(ids, m))
    monkeypatch.setattr(caption_rollouts, "lean_generate",
                        lambda model, call, embeds, **kw: generate_rows.append(
                            call["input_ids"].shape[0] * kw["num_return_sequences"])
                        or real_generate(model, call, embeds, **kw))
    counter = RowCounter(models.decoder, monkeypatch)
    traj, captions, renders = micro.decoder_rollout(images, seed=5)
    assert captions == captions_full  # greedy
    for name in ("latents", "next_latents", "log_probs"):
        torch.testing.assert_close(getattr(traj, name), getattr(traj_full, name), rtol=0, atol=ATOL, msg=name)
    assert [r.size for r in renders] == [r.size for r in renders_full] and len(renders) == 2 * GROUP
    # Caption renders for rewards: same images with and without micro-batches.
    ids = torch.randint(10, 60, (2 * GROUP, 4), generator=torch.Generator().manual_seed(1))
    ids_mask = torch.ones_like(ids)
    seeds = list(range(2 * GROUP))
    got = micro.render_captions(ids, ids_mask, seeds)
    # Nothing ran on more than 2 rows (the guided transformer call: 2 x 2), the empty-caption
    # condition of CFG excepted (one row).
    assert max(condition_rows) <= 2 and max(generate_rows) <= 2
    assert max(counter.velocity) == 4 and max(counter.decode) == 2
    monkeypatch.undo()
    want = full.render_captions(ids, ids_mask, seeds)
    for a, b in zip(got, want):
        diff = np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)
        assert np.abs(diff).max() <= 1  # uint8 pixels: at most one level of round-off
