"""DiffusionNFT as the decoder objective (rl/objectives/nft.py, `grpo.decoder.algorithm: nft`).

- parity: our loss and its gradient equal DiffusionNFT's (scripts/train_nft_sd3.py L908-L983 at
  NVlabs/DiffusionNFT 24af555, re-derived below in float64 from their code, not imported) on
  identical tensors; so do the reward mapping, the old-policy decay and the level sampling;
- ODE rollouts: independent noise per row, clean latents kept, nothing recorded;
- the learner: only the decoder LoRA moves, micro-batches give the full-batch step at ZeRO 0 and 2,
  the old policy is an EMA of the trained weights and resumes exactly;
- the recipe refuses contradictory settings naming the fields;
- the real path: `python -m rl.train recipes/decoder_only.yaml` with the objective switched to nft.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl import grpo
from rl.checkpoint import flatten_state, unflatten_state
from rl.config import Recipe, load_recipe
from rl.learner import Learner
from rl.objectives import make_decoder_objective, objectives
from rl.objectives.nft import nft_loss, old_decay, reward_weight, swapped, train_levels
from rl.shapes import generate_shapes
from rollouts.actors import RolloutWorker

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# the reference, re-derived in float64 from train_nft_sd3.py
# ----------------------------------------------------------------------------------------------
def reference_loss(x0, noise, t, v, v_old, v_ref, adv, beta, train_beta, adv_clip_max):
    """DiffusionNFT's per-timestep loss (train_nft_sd3.py L862-L970), float64, adv_mode "all":
    one micro-batch at one timestep; `t` is timesteps / 1000 (L864)."""
    x0, noise, v, v_old, v_ref, adv, t = (a.double() for a in (x0, noise, v, v_old, v_ref, adv, t))
    te = t.view(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - te) * x0 + te * noise  # L870
    a = torch.clamp(adv, -adv_clip_max, adv_clip_max)  # L910
    r = torch.clamp((a / adv_clip_max) / 2.0 + 0.5, 0, 1)  # L928-L929
    pos = beta * v + (1 - beta) * v_old.detach()  # L934
    neg = (1.0 + beta) * v_old.detach() - beta * v  # L935
    x0p = xt - te * pos  # L940
    dims = tuple(range(1, x0.ndim))
    wf = torch.abs(x0p.detach() - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)  # L942-L946
    pl = ((x0p - x0) ** 2 / wf).mean(dim=dims)  # L947
    nx0p = xt - te * neg  # L948
    nwf = torch.abs(nx0p.detach() - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)
    nl = ((nx0p - x0) ** 2 / nwf).mean(dim=dims)  # L955
    ori = r * pl / beta + (1.0 - r) * nl / beta  # L959
    policy = (ori * adv_clip_max).mean()  # L960
    kl = ((v - v_ref) ** 2).mean(dim=dims)  # L966
    return policy + train_beta * kl.mean(), xt  # L970


def reference_return_decay(step, decay_type):
    """train_nft_sd3.py `return_decay` (L169-L189)."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_and_gradient_equal_diffusion_nft(beta):
    g = torch.Generator().manual_seed(0)
    b, shape = 6, (4, 8, 8)
    x0, noise, v_old, v_ref = (torch.randn(b, *shape, generator=g) for _ in range(4))
    v_ours = (v_old + 0.3 * torch.randn(b, *shape, generator=g)).requires_grad_(True)
    v_theirs = v_ours.detach().double().requires_grad_(True)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    adv = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 9.0])  # beyond the clip on both sides
    train_beta, c = 1e-4, 5.0
    expected, xt = reference_loss(x0, noise, t, v_theirs, v_old, v_ref, adv, beta, train_beta, c)
    out = nft_loss(v_ours, v_old, x0, xt.float(), t, adv, beta=beta, adv_clip_max=c, v_ref=v_ref, kl_beta=train_beta)
    ours = out.loss.mean()  # the batch mean at one level, as their per-timestep loss
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    expected.backward()
    ours.backward()
    torch.testing.assert_close(v_ours.grad.double(), v_theirs.grad, rtol=1e-5, atol=1e-9)


def test_reward_mapping_and_old_policy_decay_equal_diffusion_nft():
    adv = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    torch.testing.assert_close(reward_weight(adv, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    for decay_type, args in {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}.items():
        for step in (0, 1, 2, 74, 75, 76, 200, 499, 500, 501, 10_000):
            assert old_decay(step, *args) == reference_return_decay(step, decay_type), (decay_type, step)


def test_levels_are_distinct_steps_of_the_schedule_k_per_sample():
    """int(10 x 0.99) = 9 distinct levels per sample, a fresh permutation per sample (L810-L816)."""
    picks = train_levels(64, 10, 0.99, torch.Generator().manual_seed(0))
    assert picks.shape == (64, 9)
    assert all(len(set(row.tolist())) == 9 for row in picks)
    assert picks.min() >= 0 and picks.max() <= 9
    assert len({tuple(row.tolist()) for row in picks}) > 32  # not one permutation for everyone
    assert train_levels(3, 4, 0.1, torch.Generator().manual_seed(0)).shape == (3, 1)  # at least one


def test_swapped_restores_the_parameters_bitwise():
    p = {"a": torch.nn.Parameter(torch.randn(3, 3))}
    live = p["a"].detach().clone()
    with swapped(p, {"a": torch.zeros(3, 3)}):
        assert torch.equal(p["a"].detach(), torch.zeros(3, 3))
    assert torch.equal(p["a"].detach(), live)


# ----------------------------------------------------------------------------------------------
# the learner
# ----------------------------------------------------------------------------------------------
def recipe(zero: int = 0, micro: int | None = None, bf16: bool = False, **nft) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": 2, "caption": {"max_new_tokens": 6},
                    "trajectory": {"num_steps": 3, "render_steps": 3}},
        "grpo": {"decoder": {"lr": 1e-2, "algorithm": "nft", "nft": nft}},
        "learner": {"zero_stage": zero, "bf16": bf16, "micro_batch_size": micro},
    })


@pytest.fixture(scope="module")
def images():
    return [r.image for r in generate_shapes(2, seed=1)]


ADV = grpo.group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2)


def run(r: Recipe, images, steps: int = 1, learner: Learner | None = None):
    torch.manual_seed(0)
    learner = learner or Learner(r)
    worker = RolloutWorker(r, models=learner.models)
    stats = []
    for seed in range(1, steps + 1):
        worker.version = learner.version
        traj, _, _ = worker.decoder_rollout(images, seed=seed)
        stats.append(learner.train_decoder(traj, ADV.advantages, ADV.valid))
    return learner, stats


def test_ode_rollouts_independent_noise_per_row_and_clean_latents(images):
    r = recipe()
    learner = Learner(r)
    traj, _, renders = RolloutWorker(r, models=learner.models).decoder_rollout(images, seed=3)
    n = 4
    assert traj.latents.shape[:2] == (n, 0) and traj.log_probs.shape == (n, 0)  # nothing recorded
    assert traj.clean_latents.shape[0] == n
    # G members of a group start from different noise: the ODE samples differ
    assert not torch.allclose(traj.clean_latents[0], traj.clean_latents[1])
    decoded = learner.models.decoder.decode(traj.clean_latents)
    assert len(renders) == n and decoded.shape[0] == n


@pytest.mark.parametrize("zero", [0, 2])
def test_micro_batches_give_the_full_batch_step_and_only_the_decoder_moves(zero, images):
    full, s_full = run(recipe(zero), images)
    micro, s_micro = run(recipe(zero, micro=2), images)
    before = Learner(recipe(zero)).trainable_state() if zero == 0 else None
    a, b = s_full[0], s_micro[0]
    assert a["levels"] == 2  # int(3 x 0.99)
    # float32 sums in another order (AdamW's first step then turns tiny gradient differences into up
    # to 2 lr on near-zero entries, so the weights are not compared; test_zero.py does the same)
    for key in ("loss", "grad_norm", "kl", "old_deviate", "policy_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    a = full.trainable_state()
    if before is not None:
        moved = {k.split(".")[0] for k in a if not torch.equal(a[k], before[k])}
        assert moved == {"decoder"}


def test_old_policy_is_an_ema_of_the_trained_weights(images):
    learner = Learner(recipe())
    start = {k: v.float().clone() for k, v in learner._gathered(learner._decoder_lora()).items()}
    run(recipe(), images, steps=1, learner=learner)
    live = {k: v.float() for k, v in learner._gathered(learner._decoder_lora()).items()}
    old = learner.decoder_objective.old
    assert old.steps == 1
    for k, s in old.shadow.items():  # d = 0.001 after the first update (decay_type 1)
        torch.testing.assert_close(s, 0.001 * start[k] + 0.999 * live[k])
    assert any(not torch.equal(start[k], live[k]) for k in live)


def test_resume_continues_exactly(images):
    straight, _ = run(recipe(), images, steps=1)
    tensors, skeleton = flatten_state(straight.state_dict())
    state = unflatten_state(json.loads(json.dumps(skeleton)), {k: v.clone() for k, v in tensors.items()})
    resumed = Learner(recipe())
    resumed.load_state_dict(state)
    worker_a, worker_b = RolloutWorker(recipe(), models=straight.models), RolloutWorker(recipe(), models=resumed.models)
    for learner, worker in ((straight, worker_a), (resumed, worker_b)):
        worker.version = learner.version
        traj, _, _ = worker.decoder_rollout(images, seed=2)
        learner.train_decoder(traj, ADV.advantages, ADV.valid)
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k, v in straight.decoder_objective.old.shadow.items():
        assert torch.equal(v, resumed.decoder_objective.old.shadow[k].to(v.device))


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------
def test_registry_and_defaults():
    assert set(objectives()) == {"flow_grpo", "nft"}
    r = recipe()
    assert make_decoder_objective(r).name == "nft"
    assert r.grpo.decoder.advantage_scale == "batch_population"  # DiffusionNFT's global std
    n = r.grpo.decoder.nft
    assert (n.beta, n.kl_beta, n.adv_clip_max, n.timestep_fraction) == (1.0, 1e-4, 5.0, 0.99)
    assert Recipe().grpo.decoder.algorithm == "flow_grpo" and Recipe().grpo.decoder.advantage_scale is None


def test_contradictory_settings_are_refused_naming_the_fields():
    base = ROOT / "recipes" / "decoder_only.yaml"
    with pytest.raises(ValueError, match="grpo.decoder.nft.rollout.*rollout.trajectory.sde_window=2.*window_range"):
        load_recipe(base, ["grpo.decoder.algorithm=nft"])
    with pytest.raises(ValueError, match="zero_stage"):
        load_recipe(base, ["grpo.decoder.algorithm=nft", "rollout.trajectory.sde_window=null",
                           "rollout.trajectory.window_range=null", "learner.zero_stage=3"])
    with pytest.raises(ValueError, match="cfg_detach_uncond"):
        load_recipe(base, ["grpo.decoder.algorithm=nft", "grpo.decoder.nft.rollout=sde",
                           "rollout.trajectory.cfg_scale=2.0", "rollout.trajectory.cfg_detach_uncond=true"])
    # NFT on the recipe's own SDE rollouts keeps the window
    assert load_recipe(base, ["grpo.decoder.algorithm=nft", "grpo.decoder.nft.rollout=sde"]).rollout.trajectory.sde_window == 2


def test_unknown_algorithm_is_refused_naming_the_field():
    from rl.config import RecipeError

    with pytest.raises(RecipeError, match="grpo.decoder.algorithm"):
        load_recipe(ROOT / "recipes" / "decoder_only.yaml", ["grpo.decoder.algorithm=ppo"])


# ----------------------------------------------------------------------------------------------
# the real path
# ----------------------------------------------------------------------------------------------
def test_decoder_only_recipe_trains_with_nft(tmp_path):  # ~40 s (Ray start-up; a step is < 1 s)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl.train", str(ROOT / "recipes" / "decoder_only.yaml"), "--output-dir", str(out),
           "--max-steps", "2", "--set", "grpo.decoder.algorithm=nft",
           "--set", "rollout.trajectory.sde_window=null", "--set", "rollout.trajectory.window_range=null",
           "--set", "rollout.batch_size=2", "--set", "eval.grid_images=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["decoder", "decoder"]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["version"] == 2
    assert "done:" in proc.stdout


@pytest.mark.slow  # ~50 s: Ray start-up, then cold start, encoder and two NFT decoder steps
def test_unified_tiny_recipe_trains_with_nft(tmp_path):
    """All three stages with the NFT decoder objective: the old policy starts from the decoder LoRA
    that the cold start moved."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl.train", str(ROOT / "recipes" / "tiny.yaml"), "--output-dir", str(out),
           "--set", "pretrain.enabled=false", "--set", "schedule.cold_start_steps=1", "--set", "schedule.cycles=1",
           "--set", "schedule.phases=[{stage: encoder, steps: 1}, {stage: decoder, steps: 2}]",
           "--set", "rollout.batch_size=2", "--set", "rollout.group_size=2", "--set", "eval.grid_images=0",
           "--set", "grpo.decoder.algorithm=nft", "--set", "rollout.trajectory.sde_window=null"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["cold_start", "encoder", "decoder", "decoder"]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows[2:])
