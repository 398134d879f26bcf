"""Checkpoints: atomic writes, skipping incomplete ones, no pickle, and a SIGKILLed run that resumes
to the same adapters (bitwise) and metrics as an uninterrupted one."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rl import checkpoint as ckpt
from rl.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny.yaml"


def _save(root, step, value=1.0, keep_last=2, recipe=None):
    weights = {"encoder.lora_A": torch.full((2, 3), value), "connector.steps_done": torch.tensor(step)}
    state = {"learner": {"optimizer": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3)}},
                                       "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": "encoder"}]},
                         "version": step},
             "driver": {"rng": ckpt.capture_rng()}}
    trainer = {"step": step, "schedule": {"stage": "encoder", "stage_step": 0}, "data_position": 4 * step}
    return ckpt.save_checkpoint(str(root), step, weights, state, trainer, recipe or {"models": {"encoder": {"name": "tiny"}}},
                                keep_last=keep_last)


# ----------------------------------------------------------------------------------------------
# format
# ----------------------------------------------------------------------------------------------
def test_round_trip_keeps_types_and_values(tmp_path):
    path = _save(tmp_path, 3, value=0.5)
    c = ckpt.load_checkpoint(path)
    assert c.step == 3 and c.trainer["data_position"] == 12
    assert torch.equal(c.weights["encoder.lora_A"], torch.full((2, 3), 0.5))
    opt = c.state["learner"]["optimizer"]
    assert list(opt["state"]) == [0]  # int keys come back as ints (torch's optimizer needs them)
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert torch.equal(opt["state"][0]["step"], torch.tensor(3.0))
    # only safetensors / JSON / YAML on disk
    assert sorted(os.listdir(path)) == sorted([ckpt.ADAPTERS, ckpt.STATE_TENSORS, ckpt.STATE_JSON, ckpt.TRAINER_JSON,
                                               ckpt.RECIPE_YAML, ckpt.MANIFEST])


def test_flatten_refuses_what_would_need_pickle():
    with pytest.raises(ckpt.CheckpointError, match="learner.thing.*never pickle"):
        ckpt.flatten_state({"learner": {"thing": object()}})


def test_optimizer_state_round_trips_through_the_flat_format():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1, "name": "encoder"}])
    p.grad = torch.randn(4)
    opt.step()
    tensors, skeleton = ckpt.flatten_state({"optimizer": opt.state_dict()})
    assert "optimizer.state.0.exp_avg" in tensors
    json.dumps(skeleton)  # JSON-serialisable
    restored = ckpt.unflatten_state(json.loads(json.dumps(skeleton)), tensors)["optimizer"]
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([{"params": [q], "lr": 0.5, "name": "encoder"}])
    opt2.load_state_dict(restored)
    for o, param in ((opt, p), (opt2, q)):
        param.grad = torch.ones(4)
        o.step()
    assert torch.equal(p, q)


def test_rng_capture_and_restore():
    state = json.loads(json.dumps(ckpt.flatten_state(ckpt.capture_rng())[1]))
    tensors = ckpt.flatten_state(ckpt.capture_rng())[0]
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    ckpt.restore_rng(ckpt.unflatten_state(state, tensors))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want


def test_schedule_position():
    stages = ["cold_start", "cold_start", "encoder", "encoder", "decoder"]
    assert ckpt.schedule_position(stages, 0) == {"stage": "cold_start", "stage_step": 0}
    assert ckpt.schedule_position(stages, 3) == {"stage": "encoder", "stage_step": 1}
    assert ckpt.schedule_position(stages, 4) == {"stage": "decoder", "stage_step": 0}
    assert ckpt.schedule_position(stages, 5) == {"stage": None, "stage_step": 0}


# ----------------------------------------------------------------------------------------------
# atomicity and incomplete checkpoints
# ----------------------------------------------------------------------------------------------
def test_keep_last_prunes_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    _save(tmp_path, 6)
    assert [Path(p).name for p in ckpt.list_checkpoints(str(tmp_path))] == ["step-000004", "step-000006"]

    # a save that dies before its rename (here: the disk fills while writing) leaves the complete
    # ones untouched, even with keep_last=1
    from safetensors import torch as st

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(OSError):
        _save(tmp_path, 8, keep_last=1)
    monkeypatch.undo()
    assert [Path(p).name for p in ckpt.list_checkpoints(str(tmp_path))] == ["step-000004", "step-000006"]
    path, skipped = ckpt.find_latest(str(tmp_path))
    assert Path(path).name == "step-000006"
    assert [Path(p).name for p, _ in skipped] == [f".tmp-step-000008-{os.getpid()}"]
    # the next complete save clears the leftover
    _save(tmp_path, 8)
    assert ckpt.half_written(str(tmp_path)) == []


def test_truncated_and_half_written_checkpoints_are_skipped_and_reported(tmp_path):
    _save(tmp_path, 2, value=2.0)
    newest = Path(_save(tmp_path, 4, value=4.0))
    # a copy interrupted mid-file: right name, short file
    data = (newest / ckpt.ADAPTERS).read_bytes()
    (newest / ckpt.ADAPTERS).write_bytes(data[: len(data) // 2])
    # a save killed before its manifest, already renamed by hand
    broken = tmp_path / "step-000005"
    shutil.copytree(newest, broken)
    (broken / ckpt.MANIFEST).unlink()
    path, skipped = ckpt.find_latest(str(tmp_path))
    assert Path(path).name == "step-000002"
    reasons = {Path(p).name: r for p, r in skipped}
    assert "truncated" in reasons["step-000004"] and "manifest" in reasons["step-000005"]
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(str(newest))


def test_resume_refuses_a_recipe_that_changes_the_models(tmp_path, capsys):
    from rl.config import load_recipe
    from rl.train import main

    recipe = load_recipe(TINY).model_dump(mode="json")
    recipe["models"]["decoder"]["adapter"]["r"] = 4
    _save(tmp_path / "checkpoints", 2, recipe=recipe)
    rc = main([str(TINY), "--output-dir", str(tmp_path), "--resume", "--set", "output.progress=false",
               "--set", "pretrain.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "changes the models" in err and "models.decoder.adapter.r: checkpoint 4, recipe 8" in err


def test_resume_drops_metrics_rows_it_will_run_again(tmp_path):
    from rl.train import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": i / 10}) + "\n" for i in range(5)) + '{"step": 5, "lo')
    assert _truncate_metrics(str(path), 3) == 3  # steps 3, 4 and the line cut short by the kill
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# kill -9 and resume (subprocesses, local Ray)
# ----------------------------------------------------------------------------------------------
# 6 steps: cold_start x2, encoder x2, decoder x2; checkpoints after steps 3 and 6. The kill lands
# after step 3 (index 3, an encoder step) is logged, i.e. between the two checkpoints and in the
# middle of the encoder phase; the resume then crosses into the decoder phase.
OVERRIDES = [
    "schedule.cold_start_steps=2", "schedule.phases=[{stage: encoder, steps: 2}, {stage: decoder, steps: 2}]",
    "schedule.cycles=1", "output.save_every=3", "output.keep_last=3", "rollout.batch_size=2",
    "rollout.group_size=2", "output.progress=false", "output.plot=false", "pretrain.enabled=false",
]
N = 6


def _train(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    # its own session: killing the group takes the driver and the local Ray it started
    return subprocess.Popen(cmd + list(extra), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _rows(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "learner_wait")} for r in rows]  # timings


@pytest.mark.slow  # ~75-105 s per ZeRO stage on 2 shared cores: three local-Ray runs, two side by side
@pytest.mark.parametrize("zero", [0, 2])
def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(tmp_path, zero):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    t0 = time.time()
    stage = f"learner.zero_stage={zero}"
    ref = _train(ref_dir, "--set", stage)  # both start together: the machine has idle time during Ray start-up
    run = _train(run_dir, "--set", stage)
    try:
        while not any(r["step"] >= 3 for r in _rows(run_dir)):
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.time() - t0 < 400, "the run to kill never reached step 3"
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)  # from outside, no chance to clean up
        run.wait()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    killed_at = max(r["step"] for r in _rows(run_dir))
    root = run_dir / "checkpoints"
    path, _ = ckpt.find_latest(str(root))
    assert Path(path).name == "step-000003", f"the kill should land between checkpoints 3 and 6 (rows to {killed_at})"
    assert killed_at >= 3  # rows past the checkpoint exist: the resume must drop them

    # Faults a resume must survive: a save that died before its rename, and a newer checkpoint
    # truncated by an interrupted copy.
    tmp = root / ".tmp-step-000005-99999"
    tmp.mkdir()
    (tmp / ckpt.ADAPTERS).write_bytes(b"\0" * 100)
    truncated = root / "step-000004"
    shutil.copytree(path, truncated)
    data = (truncated / ckpt.ADAPTERS).read_bytes()
    (truncated / ckpt.ADAPTERS).write_bytes(data[:1000])

    out, _ = ref.communicate(timeout=400)
    assert ref.returncode == 0, out[-3000:]
    t1 = time.time()
    resumed = _train(run_dir, "--set", stage, "--resume")
    log, _ = resumed.communicate(timeout=400)
    resume_seconds = time.time() - t1
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed from" in log and "step-000003 at step 3" in log
    assert f"ignoring incomplete checkpoint {truncated}" in log and "truncated" in log
    assert f"ignoring incomplete checkpoint {tmp}" in log and "half-written" in log

    # the same adapters and connector, bitwise; the same optimizer and RNG state too
    final_ref = ckpt.load_checkpoint(str(ref_dir / "checkpoints" / f"step-{N:06d}"))
    final_run = ckpt.load_checkpoint(str(root / f"step-{N:06d}"))
    assert final_ref.weights.keys() == final_run.weights.keys()
    for key, value in final_ref.weights.items():
        assert torch.equal(value, final_run.weights[key]), key
    ref_t, ref_s = ckpt.flatten_state(final_ref.state)
    run_t, run_s = ckpt.flatten_state(final_run.state)
    assert ckpt.recipe_differences(ref_s, run_s) == []
    for key, value in ref_t.items():
        assert torch.equal(value, run_t[key]), key
    assert final_ref.trainer == final_run.trainer

    # every step once, with the uninterrupted run's metrics
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(N))
    assert _comparable(rows) == _comparable(_rows(ref_dir))
    print(f"resume run: {resume_seconds:.1f} s for {N - 3} steps;",
          next(line for line in log.splitlines() if "resumed from" in line))


def test_zero2_run_writes_checkpoints_and_resumes(tmp_path):
    """The production recipe's ZeRO stage through `python -m rl.train`: a run stopped after 3 steps
    resumes from its checkpoint and finishes the schedule, every step once."""
    out = tmp_path / "run"
    first = _train(out, "--set", "learner.zero_stage=2", "--max-steps", "3")
    log, _ = first.communicate(timeout=400)
    assert first.returncode == 0, log[-3000:]
    assert (out / "checkpoints" / "step-000003" / ckpt.MANIFEST).exists()
    state = ckpt.load_checkpoint(str(out / "checkpoints" / "step-000003")).state["learner"]["optimizer"]
    # optimizer steps per group: tiny.yaml reads captions with the base encoder (reader: base), so the
    # two cold-start steps move connector and decoder only; then one encoder step of 4 iterations
    assert state["step"] == {"encoder": 4, "decoder": 2, "connector": 2}
    resumed = _train(out, "--set", "learner.zero_stage=2", "--resume")
    log, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, log[-3000:]
    assert "step-000003 at step 3" in log
    assert [r["step"] for r in _rows(out)] == list(range(N))
    final = ckpt.load_checkpoint(str(out / "checkpoints" / f"step-{N:06d}")).state["learner"]["optimizer"]
    assert final["step"] == {"encoder": 8, "decoder": 2 + 8, "connector": 2}
