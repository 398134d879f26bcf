"""Reward plugins in a real `python -m rl.train` run (issue 17): TRL's own reward function and a
file plugin named relative to the recipe (as the README shows), both logged as reward_<name>_mean / _std; the
arguments in TRL's format; a clash of function names gets a suffix."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
CHECK = Path(__file__).parent / "plugins" / "trl_format_check.py"


@pytest.mark.slow  # ~65 s on 2 busy cores (Ray, DeepSpeed, two steps)
def test_trl_reward_and_relative_file_plugin_in_a_real_run(tmp_path):
    data = tmp_path / "images"  # an image folder with metadata.jsonl captions (references)
    data.mkdir()
    rows = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (32, 32), color).save(data / f"im{i}.png")
        rows.append(json.dumps({"file_name": f"im{i}.png", "text": f"a square of colour {i}", "source": f"made for im{i}"}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    functions = ("[{name: clip}, {name: 'trl.rewards:think_format_reward', weight: 0.1}, "
                 "{name: 'plugins/my_reward.py:shape_words', weight: 0.5}, "
                 "{name: 'plugins/my_reward.py:shape_words', weight: 0.2}, "
                 f"{{name: '{CHECK}:trl_format', weight: 0.0}}]")
    cmd = [
        sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out),
        "--set", "pretrain.enabled=false", "--set", f"data.source={data}",
        "--set", "schedule.cold_start_steps=0", "--set", "schedule.cycles=1",
        "--set", "schedule.phases=[{stage: encoder, steps: 1}, {stage: decoder, steps: 1}]",
        "--set", "rollout.batch_size=2", "--set", "rollout.group_size=2",
        "--set", "rollout.caption.max_new_tokens=8", "--set", "grpo.num_iterations=1",
        "--set", "eval.grid_images=0", "--set", "output.plot=false",
        "--set", f"rewards.functions={functions}",
    ]
    # From the repository root, as the README runs it: the relative plugin resolves against recipes/
    # (there is no plugins/ in the root), and the actors get that folder relative to their cwd.
    assert not (ROOT / "plugins").exists()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["encoder", "decoder"]
    names = ["clip", "think_format_reward", "shape_words", "shape_words_2", "trl_format"]
    for r in rows:
        assert sorted(k for k in r if k.startswith("reward_") and k not in ("reward_mean", "reward_std")) == sorted(
            f"reward_{n}_{s}" for n in names for s in ("mean", "std"))
        assert r["reward_think_format_reward_mean"] == 0.0  # captions of random models have no <think> block
        assert r["reward_trl_format_mean"] == 1.0  # it raises (and stops the run) unless the arguments are TRL's
        assert 0 <= r["reward_shape_words_mean"] <= 1 and r["reward_shape_words_mean"] == r["reward_shape_words_2_mean"]


def test_readme_specs_validate_and_resolve_in_the_reward_worker_alike(tmp_path, monkeypatch):
    """The README's relative specs, from a working directory that is not the recipe's folder: the
    recipe validates, and the real RewardWorker (as the driver starts it, with the recipe's folder)
    resolves the same files, names the metrics by function and passes TRL's arguments."""
    from rewards.actors import RewardWorker
    from rl.config import load_recipe

    monkeypatch.chdir(tmp_path)
    functions = ("[{name: 'plugins/my_reward.py:shape_words'}, {name: 'trl.rewards:think_format_reward'}, "
                 "{name: 'verl:plugins/my_reward.py:from_verl_example'}]")
    recipe = load_recipe(TINY, [f"rewards.functions={functions}", "rollout.group_size=2"])
    worker = RewardWorker(recipe, base_dir=str(TINY.parent))
    assert worker.names() == ["shape_words", "think_format_reward", "from_verl_example"]
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 0, 0))]
    batch = worker.score_rollout("decoder", ["a red circle", "<think>x</think> blue"], None, ["a", "b"], images,
                                 [None, None], 0, {"ground_truth": ["red", "red"], "references": [None, None],
                                                   "step": [7, 7], "images": [None, None]})  # those two are the stack's
    assert batch.per_reward == {  # G = 2 rows per image
        "shape_words": [2 / 3, 2 / 3, 0.5, 0.5],  # red, circle of "a red circle"; blue of "<think>x</think> blue"
        "think_format_reward": [0.0, 0.0, 1.0, 1.0],
        "from_verl_example": [1.0, 1.0, 0.0, 0.0],
    }
