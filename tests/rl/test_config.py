"""The recipe schema: defaults, overrides, and errors that name the field before anything starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl.config import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"


def write(tmp_path, tree) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def tiny_tree() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_tiny_recipe_validates_and_lists_three_stages():
    r = load_recipe(TINY)
    stages = r.stages()
    assert {"cold_start", "encoder", "decoder"} <= set(stages)
    assert stages[0] == "cold_start"


def test_defaults_come_from_the_papers():
    r = Recipe()
    assert r.rollout.trajectory.noise_level == 0.7  # Flow-GRPO
    assert r.rollout.trajectory.num_steps == 10 and r.rollout.trajectory.eval_steps == 40
    assert r.grpo.adv_clip == 5.0
    assert r.models.decoder.adapter.r == 32 and r.models.decoder.adapter.alpha == 64
    assert r.grpo.encoder.epsilon == 0.2


def test_overrides_and_max_steps(tmp_path):
    r = load_recipe(TINY, ["rollout.group_size=3", "grpo.encoder.lr=0.5"], output_dir=str(tmp_path), max_steps=2)
    assert r.rollout.group_size == 3 and r.grpo.encoder.lr == 0.5
    assert r.output.dir == str(tmp_path)
    assert len(r.stages()) == 2


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t: t["rollout"].update(group_size=-2), "rollout.group_size"),
        (lambda t: t["rollout"].update(bacth_size=2), "rollout.bacth_size"),  # unknown field (typo)
        (lambda t: t["grpo"]["encoder"].update(lr="fast"), "grpo.encoder.lr"),
        (lambda t: t["models"]["encoder"].update(path="/nonexistent/enc"), "models.encoder.path"),
        (lambda t: t["data"].update(source="/nonexistent/images"), "data.source"),
        (lambda t: t["rewards"].update(functions=[{"name": "no_such_reward"}]), "rewards.functions.0.name"),
        (lambda t: t["rollout"]["trajectory"].update(sde_window=50), "sde_window"),
        (lambda t: t["output"].update(wandb_project="x"), "output.wandb_project"),  # wandb not installed
        (lambda t: t.setdefault("resources", {}).update(learner_workers=3), "resources.learner_workers"),
        # 4 images x 8 captions = 32 rows: 3 does not divide them
        (lambda t: t.setdefault("learner", {}).update(micro_batch_size=3), "learner.micro_batch_size"),
        (lambda t: t.setdefault("learner", {}).update(micro_batch_size=0), "learner.micro_batch_size"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, edit, field):
    tree = tiny_tree()
    edit(tree)
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, tree))
    assert field in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(TINY, ["rollout.group_size"])


def test_cli_exits_2_before_anything_starts_and_writes_nothing(tmp_path):
    tree = tiny_tree()
    tree["rollout"]["group_size"] = 0
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "rl.train", str(write(tmp_path, tree)), "--output-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "rollout.group_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 4  # one readable message, not a dump
    assert not out.exists()
