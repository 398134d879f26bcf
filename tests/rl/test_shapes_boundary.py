"""The trainer does not import the shapes world (rl/shapes/): a recipe reaches it by name only
(data.generator, pretrain.provider, rewards.judge.backend), and a bad name is refused naming the field."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rl.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"

# In a fresh interpreter: import every trainer module, then go through a folder recipe's path as
# rl.train and rl.eval do (recipe, pretrained step, data, models, reward, judge, Unified-Bench rows).
SCRIPT = textwrap.dedent("""
    import sys
    import rl.train, rl.eval, rl.data, rl.learner, rl.checkpoint, rl.export, rl.warmup
    import rl.models.unified, rl.models.encoder, rl.models.decoder, rl.models.connector
    import rewards.api, rewards.clip, rewards.judge, rewards.format, rewards.references, rewards.actors
    import rollouts.actors, rollouts.captions, rollouts.trajectories
    assert "rl.shapes" not in sys.modules, "imported by the trainer modules"
    from rl.config import load_recipe
    from rl.eval import build_scorer, evaluate
    from rollouts.actors import RolloutWorker
    from rewards.judge import build_judge_reward

    recipe = load_recipe(sys.argv[1], ["data.source=" + sys.argv[2], "pretrain.enabled=false", "device=cpu",
                                      "rewards.functions=[{name: clip}]"])
    trainer = rl.train.Trainer(recipe)
    trainer._setup_pretrained()
    trainer._setup_data()
    worker = RolloutWorker(recipe)
    records = trainer.dataset.records[:2]
    rows, _ = evaluate(worker, build_scorer(recipe), records, seed=0)
    assert set(rows[0]) >= {"caption", "caption_length", "similarity"} and "coverage" not in rows[0]
    build_judge_reward("http", base_url="http://127.0.0.1:9", model="m")
    assert "rl.shapes" not in sys.modules, sorted(m for m in sys.modules if m.startswith("rl.shapes"))
    print("ok")
""")


def test_a_folder_recipe_never_imports_the_shapes_world(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY), str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("override, field", [
    ("data.generator=no_such_world", "data.generator"),
    ("data.generator=rl.no_such_module:make", "data.generator"),
    ("pretrain.provider=rl.shapes.pretrain:no_such_function", "pretrain.provider"),
])
def test_bad_names_are_refused_naming_the_field(override, field, capsys):
    with pytest.raises(RecipeError, match=field):
        load_recipe(TINY, [override])
    from rl.train import main

    assert main([str(TINY), "--set", override, "--output-dir", "/nonexistent-never-written"]) == 2
    assert field in capsys.readouterr().err


def test_a_named_generator_is_what_the_trainer_sees():
    # the shapes world through rl.data's Generator interface: its records, words and metrics
    from rl.data import load_dataset_from_config, load_generator, recipe_vocabulary
    from rl.shapes import VOCABULARY, generate_shapes

    recipe = load_recipe(TINY)
    world = load_generator(recipe.data.generator)
    assert recipe_vocabulary(recipe) == list(VOCABULARY)
    ds = load_dataset_from_config(None, generate={"n": 3, "seed": 5}, generator="rl.shapes.source:ShapesWorld")
    assert [r.image_id for r in ds] == [e.image_id for e in generate_shapes(3, 5)]
    ex = world.examples(1, seed=5, split="heldout", size=32, max_objects=3)[0]
    full, wrong = world.caption_metrics([ex.captions["full"], "a purple circle"], [ex, ex])
    assert full["coverage"] == 1.0 and full["precision"] == 1.0 and wrong["precision"] < 1.0
