"""Unified-Bench on any image set (rl.eval unified-bench --data): a folder of PNGs written here,
the models before RL, an extra timm backbone with random weights; and how --checkpoint, --recipe and
--backbone resolve."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rl import eval as ub

ROOT = Path(__file__).resolve().parents[2]


def test_backbone_specs():
    assert ub.parse_backbone("ViT-B-32@openai") == {"model": "ViT-B-32", "pretrained": "openai"}
    assert ub.parse_backbone("timm:vit_small_patch14_dinov2.lvd142m@pretrained") == {
        "model": "timm:vit_small_patch14_dinov2.lvd142m", "pretrained": "pretrained"}
    assert ub.parse_backbone("timm:vit_small_patch14_dinov2?img_size=56&patch_size=14") == {
        "model": "timm:vit_small_patch14_dinov2", "pretrained": None, "img_size": 56, "patch_size": 14}


def test_checkpoint_none_alone_is_the_embedded_default_and_a_bad_run_dir_is_named(tmp_path):
    assert ub.resolve_recipe(None, None) == str(ROOT / "recipes" / "tiny.yaml")
    assert ub.resolve_recipe("x/step-000001", None) is None  # the checkpoint's own recipe.yaml
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ub.resolve_checkpoint(str(tmp_path))


def test_unified_bench_on_a_folder_of_pngs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNIFIED_GRPO_CACHE", str(tmp_path / "cache"))  # never pretrain into the user's cache
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    out, grid = tmp_path / "bench.json", tmp_path / "grid.png"
    rc = ub.main(["unified-bench", "--checkpoint", "none", "--recipe", str(ROOT / "recipes" / "tiny.yaml"),
                  "--set", "pretrain.enabled=false", "--set", "rollout.trajectory.eval_steps=2",
                  "--set", "rollout.caption.max_new_tokens=6", "--data", str(folder), "--n", "2",
                  "--backbone", "dino=timm:vit_small_patch14_dinov2?img_size=28", "--grid", str(grid), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["world"] == "data" and result["split"] == "train" and result["summary"]["n"] == 2
    assert result["backbones"] == ["clip", "dino"]
    assert [r["image_id"] for r in result["rows"]] == ["p0", "p1"]
    s = result["summary"]
    assert s["unified"] == pytest.approx((s["sim/clip"] + s["sim/dino"]) / 2)
    assert "coverage" not in s and s["caption_length"] >= 0
    assert grid.stat().st_size > 0
    table = capsys.readouterr().out
    assert "sim/dino" in table and f"data {folder}" in table
    # a missing --data fails before any model is built or pretrained (--checkpoint none alone: tiny.yaml)
    assert ub.main(["unified-bench", "--checkpoint", "none", "--data", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "cache").exists()
