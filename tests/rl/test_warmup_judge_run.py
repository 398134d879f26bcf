"""`python -m rl.train recipes/unified_tiny_judge.yaml` end to end (slow): the warm-up stage, then
stage 1 and encoder GRPO rewarded by CLIP and the judge, once on the embedded default (the shapes
world's elements) and once on a folder of PNGs whose metadata.jsonl carries a reference caption per
image (elements extracted by the judge, cached); then `rl.eval unified-bench --checkpoint RUN_DIR
--data FOLDER` on that run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/unified_tiny_judge.yaml"
FAST = ["--set", "schedule.warmup_steps=2", "--set", "schedule.phases=[{stage: encoder, steps: 2}, {stage: decoder, steps: 1}]",
        "--set", "eval.grid_images=0"]


def run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def check_run(out_dir):
    r = rows(out_dir)
    assert [x["stage"] for x in r] == ["warmup", "warmup", "cold_start", "encoder", "encoder", "decoder"]
    assert all(np.isfinite(x["loss"]) for x in r if x["stage"] == "warmup")
    for x in r:
        if x["stage"] in ("encoder", "decoder"):
            assert np.isfinite(x["reward_clip_mean"]) and np.isfinite(x["reward_judge_mean"]), x
    return r


def write_folder(folder: Path, n: int = 8):
    folder.mkdir()
    rng = np.random.default_rng(0)
    meta = []
    for i in range(n):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        meta.append({"file_name": f"img{i}.png", "text": f"A noisy picture number {i}. Its colours are random."})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")


@pytest.mark.slow
def test_embedded_default_with_warmup_clip_and_judge(tmp_path):
    out = run("rl.train", RECIPE, "--output-dir", str(tmp_path / "run"), *FAST)
    assert out.returncode == 0, out.stderr[-3000:]
    check_run(tmp_path / "run")
    assert len(list((tmp_path / "run" / "cache").glob("warmup-captions-*/*.json"))) == 8  # 2 steps x 4 images


@pytest.mark.slow
def test_folder_data_with_extracted_references_then_unified_bench(tmp_path):
    folder = tmp_path / "images"
    write_folder(folder)
    out = run("rl.train", RECIPE, "--output-dir", str(tmp_path / "run"), *FAST, "--set", f"data.source={folder}",
              "--set", "rewards.judge.references=extract", "--set", "rewards.judge.column=text")
    assert out.returncode == 0, out.stderr[-3000:]
    check_run(tmp_path / "run")
    extracted = list((tmp_path / "run" / "cache").glob("judge-elements-*/*.json"))
    assert len(extracted) == 8
    assert json.loads(extracted[0].read_text())["elements"]["detail"][1] == "Its colours are random."
    grid, js = tmp_path / "grid.png", tmp_path / "bench.json"
    out = run("rl.eval", "unified-bench", "--checkpoint", str(tmp_path / "run"), "--data", str(folder), "--n", "3",
              "--backbone", "dino=timm:vit_small_patch14_dinov2?img_size=56", "--grid", str(grid), "--out", str(js))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(js.read_text())
    assert result["checkpoint"].endswith("step-000006") and result["summary"]["n"] == 3
    assert set(result["backbones"]) == {"clip", "dino"} and "unified" in result["summary"]
    assert "coverage" not in result["summary"] and grid.stat().st_size > 0
    assert "sim/dino" in out.stdout
