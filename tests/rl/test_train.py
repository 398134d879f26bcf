"""The driver end to end: real Ray actors, real DeepSpeed, tiny models.

- a LoRA sync reaches a rollout actor and changes what it generates;
- `python -m rl.train` runs all three stages and writes metrics, TensorBoard, plot and checkpoint.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def test_lora_sync_changes_rollout_actor_output(ray_local):
    ray = ray_local
    from rl.shapes import generate_shapes
    from rollouts.actors import RolloutWorker

    recipe = load_recipe(TINY, ["rollout.caption.max_new_tokens=6"])
    actor = ray.remote(num_cpus=1)(RolloutWorker).remote(recipe)
    images = [r.image for r in generate_shapes(2, seed=3)]
    before = ray.get(actor.captions.remote(images, 2, 7))
    state = ray.get(actor.get_weights.remote())
    # A learner update touches only LoRA tensors: perturb the encoder's LoRA B matrices.
    g = torch.Generator().manual_seed(0)
    new = {k: (v + torch.randn(v.shape, generator=g) if k.startswith("encoder.") and "lora_B" in k else v)
           for k, v in state.items()}
    assert ray.get(actor.set_weights.remote(new, 5)) == 5
    after = ray.get(actor.captions.remote(images, 2, 7))  # same seed
    synced = ray.get(actor.get_weights.remote())
    assert all(torch.equal(synced[k], new[k]) for k in new)
    assert after.version == 5 and before.version == 0
    assert not torch.allclose(before.logprobs, after.logprobs)
    ray.kill(actor)


def test_main_job_runs_all_three_stages(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out),
        "--set", "schedule.cold_start_steps=1", "--set", "schedule.cycles=1",
        "--set", "schedule.phases=[{stage: encoder, steps: 2}, {stage: decoder, steps: 2}]",
        "--set", "rollout.batch_size=2", "--set", "rollout.group_size=2",
        "--set", "pretrain.enabled=false",  # random tiny models: the loop, not the shapes-world pretraining
        # issue 16: completions table every encoder step, TRL's high-entropy token mask on the way
        "--set", "output.log_completions_every=1", "--set", "grpo.encoder.top_entropy_quantile=0.2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["cold_start", "encoder", "encoder", "decoder", "decoder"]
    for r in rows:
        for key in ("step", "stage", "reward_mean", "reward_std", "loss", "kl", "caption_len_mean", "seconds"):
            assert key in r, key
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"])
    assert [r["step"] for r in rows] == list(range(5))
    assert (out / "reward.png").stat().st_size > 0
    assert any((out / "tensorboard").iterdir())
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "adapters.safetensors").exists()
    assert "done:" in proc.stdout
    # per-reward mean and std (TRL's rewards/<name>/mean, /std), on every rewarded step
    for r in rows[1:]:
        assert math.isfinite(r["reward_clip_mean"]) and r["reward_clip_std"] >= 0
    assert "caption/truncated_frac" in rows[1]
    # the completions table of each encoder step (1 and 2): B x G rows, each reward's score, the advantage
    table = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [t["step"] for t in table] == [1] * 4 + [2] * 4
    assert all(set(t) == {"step", "image_id", "caption", "rewards", "advantage"} for t in table)
    assert [t["caption"] for t in table[4:]][:2] == rows[2]["captions"]
    assert sum(t["rewards"]["clip"] for t in table[:4]) / 4 == pytest.approx(rows[1]["reward_clip_mean"], abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("completions/text_summary")] == [1, 2]
    assert {"rewards/clip/mean", "rewards/clip/std"} <= set(acc.Tags()["scalars"])
