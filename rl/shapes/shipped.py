"""The shapes world's shipped models: versioned weights in the package, checked by sha256 (issue 18).

    python -m rl.shapes.pretrain recipes/tiny.yaml --ship    # retrain every part; rewrite files + manifest

Pretraining on CPU gives different weights on different machines (thread counts, kernels), and so
different results after RL. The embedded default therefore runs on weights built once and shipped
in `rl/shapes/pretrained/` (package data: a non-editable install carries them), one folder per part
in the cache's layout:

    clip/model.safetensors            the reward's CLIP, image tower only (see below)
    clip_eval/model.safetensors       rl.eval's second CLIP (`clip_b`), image tower only
    encoder/                          model.safetensors, tiny_config.json
    decoder/                          transformer/, vae/ (diffusers layout), connector.safetensors
    manifest.json                     per file: sha256, bytes, part, the part's key and seed, the
                                      command that built it; per part: its spec and training stats

The VAE part is not shipped: the decoder folder carries the VAE it was trained with. The CLIPs
carry their image tower alone (`visual.*`, ~0.5 MB instead of 13 MB): the reward and rl.eval read
images only, and `rewards.clip.build_clip` loads such a file strictly into the image tower, the
text tower keeping its seeded random init.

When used (`shipped_parts`): `pretrain.shipped` is on and every part the recipe needs has the key
(rl.shapes.pretrain.part_key of its spec) the manifest records, i.e. the pretraining settings are the
ones shipped. Any other setting uses the cache as before, all parts from one place (the decoder is
trained on the encoder's hidden states: the two must come from one build).

Bad input (`check`): a file whose sha256 or size differs from the manifest is refused
(`ShippedModelError`: exit 2 in rl.train, naming the file and the rebuild command) before any model
or Ray starts. A missing file is never replaced by random weights: its part is rebuilt with a
progress line under `<cache root>/shipped-<manifest digest>/`, where the intact shipped parts are
copied first, so that a rebuilt decoder is trained on the shipped encoder.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rl.checkpoint import sha256_file

log = logging.getLogger("unified_grpo")

SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"
MANIFEST = "manifest.json"
SHIP_COMMAND = "python -m rl.shapes.pretrain recipes/tiny.yaml --ship"
IMAGE_TOWER = "visual."  # = rewards.clip.IMAGE_TOWER: the keys a shipped CLIP keeps

# The parts RL and rl.eval read, and each one's files relative to its folder (the cache's layout).
PART_FILES: dict[str, tuple[str, ...]] = {
    "clip": ("model.safetensors",),
    "clip_eval": ("model.safetensors",),
    "encoder": ("model.safetensors", "tiny_config.json"),
    "decoder": ("connector.safetensors", "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"),
}
CLIP_PARTS = ("clip", "clip_eval")


class ShippedModelError(ValueError):
    """A shipped model file differs from its manifest: refused (exit 2)."""


def shipped_dir(cfg) -> Path:
    """`pretrain.shipped_dir`, else the package's rl/shapes/pretrained/."""
    return Path(cfg.shipped_dir).expanduser() if cfg.shipped_dir else SHIPPED_DIR


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest in `root`, or None when there is none (nothing shipped there)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShippedModelError(f"pretrain: {path} is not valid JSON ({e}); restore it (git checkout) or "
                                f"rebuild the shipped models with `{SHIP_COMMAND}`") from None


def needed_parts(recipe) -> list[str]:
    """The shipped parts a recipe reads: both CLIPs (the second with pretrain.clip.eval_backbone),
    the encoder and the decoder."""
    return [n for n in PART_FILES if n != "clip_eval" or recipe.pretrain.clip.eval_backbone]


def shipped_parts(recipe) -> tuple[Path, dict[str, Any]] | None:
    """(folder, manifest) when the recipe uses the shipped models (module docstring), else None."""
    from rl.shapes.pretrain import part_key, part_specs

    if not recipe.pretrain.enabled or not recipe.pretrain.shipped:
        return None
    root = shipped_dir(recipe.pretrain)
    manifest = read_manifest(root)
    if manifest is None:
        return None
    specs, parts = part_specs(recipe), manifest.get("parts", {})
    if all(parts.get(n, {}).get("key") == part_key(specs[n]) for n in needed_parts(recipe)):
        return root, manifest
    return None


def check(root: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """The files of parts `names` that are missing (paths relative to `root`); ShippedModelError
    naming the first file whose size or sha256 differs from the manifest."""
    files, missing = manifest.get("files", {}), []
    command = manifest.get("command", SHIP_COMMAND)
    for name in names:
        for rel in PART_FILES[name]:
            rel = f"{name}/{rel}"
            path, want = root / rel, files.get(rel)
            if want is None:
                raise ShippedModelError(f"pretrain: {root / MANIFEST} lists no {rel} (part {name}); rebuild the "
                                        f"shipped models with `{command}`")
            if not path.is_file():
                missing.append(rel)
                continue
            size, digest = path.stat().st_size, sha256_file(path)
            if size != want["bytes"] or digest != want["sha256"]:
                raise ShippedModelError(
                    f"pretrain: shipped model file {path} does not match {root / MANIFEST} (sha256 {digest[:16]}..., "
                    f"{size} bytes; expected {want['sha256'][:16]}..., {want['bytes']} bytes): refused. Restore it "
                    f"(`git checkout -- {path}`) or rebuild every shipped file with `{command}`; "
                    "pretrain.shipped: false uses the cache instead")
    return missing


def folder_paths(root: Path, eval_backbone: bool):
    """PretrainedPaths of a folder in the shipped (= cache, by part name) layout."""
    from rl.shapes.pretrain import PretrainedPaths

    return PretrainedPaths(
        clip=str(root / "clip" / "model.safetensors"),
        clip_eval=str(root / "clip_eval" / "model.safetensors") if eval_backbone else None,
        encoder=str(root / "encoder"), decoder=str(root / "decoder"),
        connector=str(root / "decoder" / "connector.safetensors"),
    )


def rebuild_root(recipe, manifest: dict[str, Any]) -> Path:
    """Where missing shipped parts are rebuilt: one folder per manifest under the cache root."""
    from rl.shapes.pretrain import cache_root

    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root(recipe.pretrain) / f"shipped-{digest}"


def resolve(recipe):
    """(PretrainedPaths, info per part) of the shipped models for `recipe`, or None when it does not
    use them. Verifies every file (ShippedModelError on a mismatch); rebuilds missing ones."""
    found = shipped_parts(recipe)
    if found is None:
        return None
    root, manifest = found
    names = needed_parts(recipe)
    info = {n: manifest["parts"][n].get("stats", {}) for n in names}
    missing = check(root, manifest, names)
    if not missing:
        log.info("pretrain: the shipped models %s (sha256 checked against %s)", root, MANIFEST)
        return folder_paths(root, recipe.pretrain.clip.eval_backbone), info
    return rebuild(recipe, root, manifest, names, missing), info


def rebuild(recipe, root: Path, manifest: dict[str, Any], names: list[str], missing: list[str]):
    """Missing shipped files: copy the intact parts into the rebuild folder as done parts, then let
    pretraining build the rest there (with its progress lines). Returns that folder's paths."""
    from rl.shapes.pretrain import DONE, is_done, part_dirs, pretrain

    out = rebuild_root(recipe, manifest)
    broken = sorted({rel.split("/")[0] for rel in missing})
    log.warning("pretrain: shipped file(s) missing: %s; rebuilding part(s) %s into %s (never random weights; "
                "`%s` rewrites the shipped files)", ", ".join(str(root / m) for m in missing), ", ".join(broken),
                out, manifest.get("command", SHIP_COMMAND))
    dirs = part_dirs(recipe, str(out))
    # intact parts, and the VAE an intact decoder carries (so that it is not trained for nothing)
    intact = [(n, root / n) for n in names if n not in broken]
    intact += [("vae", root / "decoder" / "vae")] if "decoder" not in broken else []
    for name, src in intact:
        if is_done(dirs[name]):
            continue
        tmp = dirs[name].with_name(f"{dirs[name].name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        (tmp / DONE).write_text(json.dumps({"part": name, "shipped": str(src),
                                            **manifest["parts"].get(name, {}).get("stats", {})}, indent=1))
        os.replace(tmp, dirs[name])
    paths, _ = pretrain(recipe, str(out))
    return paths


# ---------------------------------------------------------------------------------------------
# Writing the shipped files (`python -m rl.shapes.pretrain RECIPE --ship`)
# ---------------------------------------------------------------------------------------------


def write(recipe, built_root: str, info: dict[str, dict[str, Any]], command: str, dest: Path | None = None) -> dict:
    """Copy the parts built under `built_root` into the shipped folder (CLIPs cut to their image
    tower), then write manifest.json last. Files of the previous set are replaced; returns the manifest."""
    from safetensors.torch import load_file, save_file

    from rl.shapes.pretrain import part_dirs, part_key, part_specs

    dest = dest or shipped_dir(recipe.pretrain)
    specs, dirs = part_specs(recipe), part_dirs(recipe, built_root)
    names = needed_parts(recipe)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)  # no manifest while the files change: a half-written set is never used
    for name in PART_FILES:
        shutil.rmtree(dest / name, ignore_errors=True)
    files: dict[str, dict[str, Any]] = {}
    parts: dict[str, dict[str, Any]] = {}
    for name in names:
        key, seed = part_key(specs[name]), specs[name]["seed"]
        for rel in PART_FILES[name]:
            src, dst = dirs[name] / rel, dest / name / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name in CLIP_PARTS:  # the image tower alone: the text tower is never read
                state = load_file(str(src))
                save_file({k: v for k, v in state.items() if k.startswith(IMAGE_TOWER)}, str(dst))
            else:
                shutil.copyfile(src, dst)
            files[f"{name}/{rel}"] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size, "part": name,
                                      "key": key, "seed": seed, "command": command}
        stats = {k: v for k, v in info.get(name, {}).items() if k not in ("spec", "part")}
        parts[name] = {"key": key, "seed": seed, "spec": specs[name], "stats": stats}
    manifest = {
        "command": command,
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "parts": parts,
        "files": dict(sorted(files.items())),
    }
    tmp = dest / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, dest / MANIFEST)
    return manifest
