"""The shipped shapes-world models (rl/shapes/shipped.py): the files in the repo are the ones the
manifest names, the embedded default runs on them, a changed file is refused with exit 2 before Ray
starts, and a missing one is rebuilt (never replaced by random weights)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config import load_recipe
from rl.shapes import pretrain as P
from rl.shapes import shipped as S

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny.yaml"
FAST = [  # a few steps of every part (tests/rl/test_pretrain.py)
    "pretrain.workers=1",
    "pretrain.clip.steps=2", "pretrain.clip.batch_size=8",
    "pretrain.vae.steps=2", "pretrain.vae.batch_size=4",
    "pretrain.encoder.steps=2", "pretrain.encoder.batch_size=4",
    "pretrain.encoder.vision_steps=2", "pretrain.encoder.vision_batch_size=4",
    "pretrain.decoder.steps=2", "pretrain.decoder.batch_size=4", "pretrain.decoder.pool_size=8",
]


def test_the_manifest_names_exactly_the_shipped_files_and_tiny_yaml_uses_them():
    # Fails when weights are committed without their manifest (or the reverse), or when a default
    # pretraining setting changed without rebuilding: run `python -m rl.shapes.pretrain recipes/tiny.yaml --ship`.
    manifest = json.loads((S.SHIPPED_DIR / S.MANIFEST).read_text())
    on_disk = {p.relative_to(S.SHIPPED_DIR).as_posix() for p in S.SHIPPED_DIR.rglob("*")
               if p.is_file() and p.name != S.MANIFEST}
    assert on_disk == set(manifest["files"])
    for rel, f in manifest["files"].items():
        path = S.SHIPPED_DIR / rel
        assert (path.stat().st_size, S.sha256_file(path)) == (f["bytes"], f["sha256"]), rel
        assert f["key"] == manifest["parts"][f["part"]]["key"] and f["command"] == manifest["command"]
    assert manifest["total_bytes"] == sum(f["bytes"] for f in manifest["files"].values()) < 8 * 2**20  # a few MB
    recipe = load_recipe(TINY)
    assert S.shipped_parts(recipe) is not None, "recipes/tiny.yaml's part keys differ from the shipped ones"
    assert S.check(S.SHIPPED_DIR, manifest, S.needed_parts(recipe)) == []
    # the CLIPs carry their image tower alone (the text tower is never read)
    from safetensors import safe_open

    with safe_open(str(S.SHIPPED_DIR / "clip" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("visual.") for k in f.keys())


def test_a_changed_shipped_file_is_refused_by_rl_train_before_ray(tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(S.SHIPPED_DIR, shipped)
    bad = shipped / "decoder" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    bad.write_bytes(bytes(data))
    out = tmp_path / "run"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "rl.train", str(TINY), "--output-dir", str(out), "--max-steps", "1",
         "--set", f"pretrain.shipped_dir={shipped}"],
        cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert str(bad) in err and "python -m rl.shapes.pretrain recipes/tiny.yaml --ship" in err
    assert "Traceback" not in err and not (out / "actors.json").exists()  # refused before any actor
    assert time.time() - t0 < 120


def test_ship_writes_a_checked_set_and_a_missing_file_is_rebuilt(tmp_path, caplog):
    import torch

    from rl.models.unified import build_models

    from rewards.clip import ClipReward, tiny_clip_config
    from rl.learner import make_clip_reward

    shipped, cache, built = tmp_path / "shipped", tmp_path / "cache", tmp_path / "built"
    sets = [*FAST, f"pretrain.shipped_dir={shipped}", f"pretrain.cache_dir={cache}", "device=cpu"]
    assert P.main([str(TINY), "--ship", "--out", str(built), *[a for s in sets for a in ("--set", s)]]) == 0
    manifest = json.loads((shipped / S.MANIFEST).read_text())
    assert manifest["command"].startswith(f"python -m rl.shapes.pretrain {TINY} --ship --set pretrain.workers=1")
    assert not cache.exists()  # --ship trains where told (or in a fresh folder), never in the cache

    # all files present: the recipe runs on the shipped folder itself, and its models load (strictly)
    r = load_recipe(TINY, sets)
    P.prepare_recipe(r)
    assert r.models.decoder.path == str(shipped / "decoder") and r.models.clip.checkpoint.startswith(str(shipped))
    assert r.eval.backbones["clip_b"] == str(shipped / "clip_eval" / "model.safetensors")
    build_models(r, torch.device("cpu"))
    # the CLIP cut to its image tower embeds exactly as the whole one it was cut from
    images = [e.image for e in P.examples(P.world_of(r), 3, seed=1)]
    whole = ClipReward(tiny_clip_config(image_size=32), checkpoint=P.pretrained_paths(r, str(built)).clip)
    assert torch.equal(make_clip_reward(r).embed(images), whole.embed(images))

    # a missing file: its part is rebuilt under the cache, on the shipped encoder, with a progress line
    gone = shipped / "decoder" / "transformer" / "diffusion_pytorch_model.safetensors"
    kept = gone.read_bytes()
    gone.unlink()
    r = load_recipe(TINY, sets)
    with caplog.at_level("INFO", logger="unified_grpo"):
        P.prepare_recipe(r)
    assert f"shipped file(s) missing: {gone}" in caplog.text and "pretrain decoder step" in caplog.text
    assert "pretrain encoder step" not in caplog.text  # the intact shipped encoder is reused, not retrained
    rebuilt = Path(r.models.decoder.path)
    assert rebuilt.parent == S.rebuild_root(r, manifest) and P.is_done(rebuilt)
    assert (rebuilt / "transformer" / "diffusion_pytorch_model.safetensors").is_file() and not gone.exists()
    enc = Path(r.models.encoder.path) / "model.safetensors"
    assert S.sha256_file(enc) == manifest["files"]["encoder/model.safetensors"]["sha256"]
    build_models(r, torch.device("cpu"))

    # a missing CLIP alone: only it is trained (the VAE comes with the intact decoder)
    gone.write_bytes(kept)
    shutil.rmtree(S.rebuild_root(r, manifest))
    (shipped / "clip" / "model.safetensors").unlink()
    r = load_recipe(TINY, sets)
    caplog.clear()
    with caplog.at_level("INFO", logger="unified_grpo"):
        P.prepare_recipe(r)
    trained = {line.split("training ")[1].split("-")[0] for line in caplog.text.splitlines() if "pretrain: training " in line}
    assert trained == {"clip"} and Path(r.models.clip.checkpoint).parent.parent == S.rebuild_root(r, manifest)
