"""Issue #19, items 1 and 2: a run never writes into another run's directory, and NaN weights are
never applied, saved or resumed.

- a used output directory (metrics.jsonl or checkpoints/) is refused with exit 2 before Ray starts;
  `--overwrite` moves it aside (never deletes it) and the new run's checkpoints survive keep_last;
- checkpoints are ordered and pruned by step number, never by name;
- non-finite recipe numbers are refused at load, naming the field;
- save_checkpoint refuses a NaN tensor, find_latest skips one and load_checkpoint refuses it;
- a learner step with a NaN gradient raises naming the stage and leaves the weights as they were.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl import checkpoint as ckpt
from rl.config import Recipe, RecipeError, load_recipe
from rl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"


def _save(root, step, value=1.0, keep_last=2):
    weights = {"encoder.lora_A": torch.full((2, 3), value)}
    state = {"learner": {"exp_avg": torch.ones(3), "version": step}}
    return ckpt.save_checkpoint(str(root), step, weights, state, {"step": step}, {"models": {}}, keep_last=keep_last)


def _names(root) -> list[str]:
    return [Path(p).name for p in ckpt.list_checkpoints(str(root))]


# ----------------------------------------------------------------------------------------------
# 1. one run per output directory; checkpoints by step number
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("used", ["metrics.jsonl", "checkpoints"])
def test_a_used_output_dir_is_refused_with_exit_2_and_nothing_written(tmp_path, capsys, used):
    import ray

    from rl.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n') if used == "metrics.jsonl" else (out / "checkpoints").mkdir()
    before = sorted(p.name for p in out.rglob("*"))
    rc = main([str(TINY), "--output-dir", str(out), "--set", "pretrain.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in out.rglob("*")) == before  # no tensorboard/, actors.json, metrics row
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == [out]  # nothing moved aside either


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(RecipeError, match="--overwrite and --resume"):
        load_recipe(TINY, ["output.overwrite=true", "output.resume=auto"])


def test_pruning_orders_checkpoints_by_step_number(tmp_path):
    _save(tmp_path, 999_999)
    _save(tmp_path, 1_000_000, keep_last=1)  # "step-1000000" sorts before "step-999999" by name
    assert _names(tmp_path) == ["step-1000000"]
    assert Path(ckpt.find_latest(str(tmp_path))[0]).name == "step-1000000"
    # checkpoints numbered above the one written (a timeline a resume went back from) are neither
    # counted nor deleted: the one just written always survives
    _save(tmp_path, 2, keep_last=1)
    assert _names(tmp_path) == ["step-000002", "step-1000000"]
    _save(tmp_path, 3, keep_last=1)
    assert _names(tmp_path) == ["step-000003", "step-1000000"]
    assert ckpt.checkpoint_step(str(tmp_path / "step-000003")) == 3 and ckpt.checkpoint_step("step-3.bak") is None


def test_overwrite_moves_the_old_run_aside_and_the_new_checkpoints_survive(tmp_path):
    out = tmp_path / "run"
    for step in (3, 4):  # an earlier, longer run: its step numbers are above the new run's
        _save(out / "checkpoints", step)
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(5)))
    cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out), "--overwrite", "--max-steps", "2"]
    for o in ["schedule.cold_start_steps=2", "output.save_every=1", "output.keep_last=1", "rollout.batch_size=2",
              "rollout.group_size=2", "output.progress=false", "output.plot=false", "output.tensorboard=false",
              "pretrain.enabled=false", "eval.grid_images=0"]:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = re.search(r"checkpoint (\S+)$", proc.stdout.strip()).group(1)
    assert Path(printed).is_dir() and Path(printed).name == "step-000002"
    assert _names(out / "checkpoints") == ["step-000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert _names(aside / "checkpoints") == ["step-000003", "step-000004"]  # moved, not deleted
    assert len(read_metrics(aside / "metrics.jsonl")) == 5
    assert str(aside) in proc.stderr


# ----------------------------------------------------------------------------------------------
# 2. non-finite numbers: recipe, checkpoints, learner
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, field", [
    ("grpo.encoder.lr=.inf", "grpo.encoder.lr"),
    ("cold_start.lr=.nan", "cold_start.lr"),
    ("rewards.functions=[{name: clip, weight: .nan}]", "rewards.functions.0.weight"),
])
def test_non_finite_recipe_numbers_are_refused_at_load(override, field):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, [override])
    assert f"{field}: must be a finite number" in str(e.value)


def test_save_checkpoint_refuses_nan_tensors_and_resume_skips_them(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)
    weights = {"encoder.lora_A": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ckpt.CheckpointError, match=r"'encoder.lora_A' in adapters.safetensors has 1 non-finite"):
        ckpt.save_checkpoint(str(tmp_path), 2, weights, {}, {"step": 2}, {})
    with pytest.raises(ckpt.CheckpointError, match=r"'learner.exp_avg' in state.safetensors"):
        ckpt.save_checkpoint(str(tmp_path), 2, {}, {"learner": {"exp_avg": torch.tensor([float("inf")])}},
                             {"step": 2}, {})
    assert _names(tmp_path) == ["step-000001"] and ckpt.half_written(str(tmp_path)) == []
    # one written by older code (its hashes match): skipped by find_latest, refused by load_checkpoint
    monkeypatch.setattr(ckpt, "nonfinite_tensor", lambda tensors, where: None)
    bad = ckpt.save_checkpoint(str(tmp_path), 2, weights, {}, {"step": 2, "format": ckpt.FORMAT}, {})
    monkeypatch.undo()
    path, skipped = ckpt.find_latest(str(tmp_path))
    assert path == good and skipped == [(bad, skipped[0][1])] and "non-finite" in skipped[0][1]
    with pytest.raises(ckpt.CheckpointError, match="cannot resume from .*encoder.lora_A"):
        ckpt.load_checkpoint(bad)


def _learner_recipe(zero: int) -> Recipe:
    return Recipe.model_validate({
        "device": "cpu",
        "models": {"encoder": {"adapter": {"r": 4, "alpha": 8}}, "decoder": {"adapter": {"r": 4, "alpha": 8}}},
        "rollout": {"batch_size": 2, "group_size": 2, "caption": {"max_new_tokens": 6},
                    "trajectory": {"num_steps": 3, "render_steps": 3, "sde_window": 2}},
        "learner": {"zero_stage": zero},
    })


@pytest.mark.parametrize("zero", [0, 2])
def test_a_nan_gradient_stops_the_step_and_leaves_the_weights(zero, monkeypatch):
    from rl import grpo
    from rl.learner import Learner
    from rl.shapes import generate_shapes
    from rollouts.actors import RolloutWorker

    torch.manual_seed(0)
    learner = Learner(_learner_recipe(zero))
    worker = RolloutWorker(learner.recipe, models=learner.models)
    records = generate_shapes(2, seed=1)
    group, _ = worker.encoder_rollout([r.image for r in records], [r.image_id for r in records], seed=1, render=False)
    adv = grpo.group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2)
    real = learner._forward_backward

    def nan_loss(loss_fn):  # the loss (hence every gradient) goes NaN
        def poisoned():
            out, extra = loss_fn()
            return out._replace(loss=out.loss * float("nan")), extra
        return real(poisoned)

    monkeypatch.setattr(learner, "_forward_backward", nan_loss)
    before = {k: v.clone() for k, v in learner.trainable_state().items()}
    steps_before = learner.state_dict()["optimizer"]["step"]
    with pytest.raises(FloatingPointError, match=r"non-finite .* at the encoder stage, weight version 0 -> 1"):
        learner.train_encoder(group, adv.advantages, adv.valid)
    after = learner.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # ZeRO-2 in fp32: DeepSpeed skipped it
    assert learner.version == 0 and learner.state_dict()["optimizer"]["step"] == steps_before
