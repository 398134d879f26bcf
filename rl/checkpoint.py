"""Checkpoints: a directory written under a temporary name and renamed when complete.

    runs/x/checkpoints/step-000012/
        adapters.safetensors   encoder LoRA, decoder LoRA, connector (keys `encoder.<peft name>`,
                               `decoder.<diffusers name>`, `connector.<name>`; what `rl.export` reads)
        state.safetensors      every other tensor: AdamW moments and step counts
                               (`learner.optimizer.state.<i>.exp_avg`), EMA, torch RNG states
        state.json             the JSON side of that state (param groups and their lr, LR scheduler,
                               decoder EMA, weight version, DeepSpeed counters, python/numpy RNG of
                               the driver and the learner), naming each tensor by its key in
                               state.safetensors
        trainer.json           step, schedule position (stage, step within it), data position,
                               last metrics per stage
        recipe.yaml            the recipe that produced it
        manifest.json          written last: size and sha256 of every file above

`save_checkpoint` writes `.tmp-step-000012-<pid>/`, fsyncs, and renames it; older checkpoints beyond
`keep_last` are deleted only after that rename, so a crash at any point leaves the previous
complete checkpoint in place. Checkpoints are ordered by the number in their name, parsed as an
integer (never by the name's sort order or mtime). `find_latest` walks from the newest and skips (and
reports) anything whose manifest is missing or does not match its files, e.g. a directory truncated
mid-copy, or that holds a NaN or infinite tensor. A NaN or infinite tensor is never written either:
`save_checkpoint` raises `CheckpointError` naming it, and `load_checkpoint` refuses one.

Only safetensors, JSON and YAML are written, and loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import yaml

PREFIX = "step-"
_NAME = re.compile(r"step-(\d+)")  # step-000012; fullmatch: step-12.bak is not a checkpoint
TMP_PREFIX = ".tmp-"
FORMAT = 1
MANIFEST = "manifest.json"
ADAPTERS = "adapters.safetensors"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
TRAINER_JSON = "trainer.json"
RECIPE_YAML = "recipe.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: plain tensors and JSON values."""

    path: str
    weights: dict[str, torch.Tensor]  # adapters + connector, as Models.trainable_state()
    state: dict[str, Any]  # {"learner": Learner.state_dict() minus weights, "driver": {"rng": ...}}
    trainer: dict[str, Any]  # trainer.json
    recipe: dict[str, Any]  # recipe.yaml

    @property
    def step(self) -> int:
        return int(self.trainer["step"])


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------
def save_checkpoint(root: str, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    trainer: dict[str, Any], recipe: dict[str, Any], keep_last: int = 2) -> str:
    """Write `root/step-{step:06d}` atomically; then prune to the newest `keep_last` complete ones.

    weights: adapters + connector; state: a tree of tensors and JSON values (optimizer, RNG, ...);
    trainer: JSON values; recipe: the recipe as JSON values.
    """
    from safetensors.torch import save_file

    tensors, skeleton = flatten_state(state)
    # before anything is written: weights that went NaN must not become a "good" checkpoint
    bad = nonfinite_tensor(weights, ADAPTERS) or nonfinite_tensor(tensors, STATE_TENSORS)
    if bad is not None:
        raise CheckpointError(f"refusing to write checkpoint step {step} under {root}: {bad}. The run diverged; "
                              f"the last complete checkpoint is {(list_checkpoints(root) or ['none'])[-1]}")
    os.makedirs(root, exist_ok=True)
    name = f"{PREFIX}{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f"{TMP_PREFIX}{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(tmp, ADAPTERS))
    save_file(tensors, os.path.join(tmp, STATE_TENSORS))
    _write_text(os.path.join(tmp, STATE_JSON), json.dumps(skeleton))
    _write_text(os.path.join(tmp, TRAINER_JSON), json.dumps({"format": FORMAT, **trainer}, indent=1))
    _write_text(os.path.join(tmp, RECIPE_YAML), yaml.safe_dump(recipe, sort_keys=False))
    files = {}
    for fname in (ADAPTERS, STATE_TENSORS, STATE_JSON, TRAINER_JSON, RECIPE_YAML):
        path = os.path.join(tmp, fname)
        _fsync_file(path)
        files[fname] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    # The manifest is the last file written: a directory without a valid one is incomplete.
    _write_text(os.path.join(tmp, MANIFEST), json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync_file(os.path.join(tmp, MANIFEST))
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step: keep the old one until the new is complete
        old = os.path.join(root, f"{TMP_PREFIX}old-{name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    # Keep the newest `keep_last` by step number, this one always among them. Anything numbered
    # above `step` is a later step of a timeline a resume went back from (find_latest skipped it as
    # broken): left alone, neither counted nor deleted.
    older = [p for p in list_checkpoints(root) if checkpoint_step(p) < step]
    for stale in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in half_written(root):  # from a process that died mid-save; ours is renamed
        shutil.rmtree(leftover, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# find and load
# ----------------------------------------------------------------------------------------------
def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under root, oldest first (manifest and file sizes checked, not hashes:
    cheap enough to run after every save)."""
    return [p for p in _numbered(root) if verify_checkpoint(p, hashes=False) is None]


def checkpoint_step(path: str) -> int | None:
    """The step of a `step-NNNNNN` directory, as an integer (None for any other name)."""
    m = _NAME.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def _numbered(root: str) -> list[str]:
    """Every `step-N` directory under root, by step number ascending (step-1000000 after
    step-999999, whatever the zero padding)."""
    if not os.path.isdir(root):
        return []
    paths = [os.path.join(root, n) for n in os.listdir(root) if checkpoint_step(n) is not None]
    return sorted(paths, key=checkpoint_step)


def nonfinite_tensor(tensors: dict[str, torch.Tensor], where: str) -> str | None:
    """'`key` in `where` has N non-finite values of M' for the first floating tensor holding a NaN
    or an infinity, or None when every one is finite."""
    for key, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"tensor {key!r} in {where} has {bad} non-finite values (NaN or inf) of {t.numel()}"
    return None


def check_finite(path: str) -> str | None:
    """Why the tensors of checkpoint `path` cannot be resumed from (a NaN or inf), or None."""
    from safetensors.torch import load_file

    for fname in (ADAPTERS, STATE_TENSORS):
        bad = nonfinite_tensor(load_file(os.path.join(path, fname)), fname)
        if bad is not None:
            return bad
    return None


def half_written(root: str) -> list[str]:
    """Temporary directories of saves that never reached their rename."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.startswith(TMP_PREFIX))


def verify_checkpoint(path: str, hashes: bool = True) -> str | None:
    """Why `path` is not a complete checkpoint, or None when every file matches its manifest
    (size, and sha256 unless `hashes` is False)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST} (it is written last: the save did not finish)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for fname, want in files.items():
        file = os.path.join(path, fname)
        if not os.path.isfile(file):
            return f"{fname} is missing"
        size = os.path.getsize(file)
        if size != want["bytes"]:
            return f"{fname} has {size} bytes, the manifest says {want['bytes']} (truncated?)"
        if hashes and sha256_file(file) != want["sha256"]:
            return f"{fname} does not match its sha256 in the manifest (corrupted)"
    return None


def find_latest(root: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint under root (or None) and every (path, reason) skipped on
    the way: half-written temporary directories and renamed ones that fail verification."""
    skipped = [(p, "half-written (never renamed)") for p in half_written(root)]
    for path in reversed(_numbered(root)):
        reason = verify_checkpoint(path) or check_finite(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def load_checkpoint(path: str, verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory (verified against its manifest first, unless the caller just
    did). Never unpickles."""
    from safetensors.torch import load_file

    reason = verify_checkpoint(path) if verify else None
    if reason is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {reason}")
    with open(os.path.join(path, STATE_JSON)) as f:
        skeleton = json.load(f)
    with open(os.path.join(path, TRAINER_JSON)) as f:
        trainer = json.load(f)
    with open(os.path.join(path, RECIPE_YAML)) as f:
        recipe = yaml.safe_load(f)
    if trainer.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {trainer.get('format')!r}, this code reads {FORMAT}")
    tensors, weights = load_file(os.path.join(path, STATE_TENSORS)), load_adapters(path)
    bad = nonfinite_tensor(weights, ADAPTERS) or nonfinite_tensor(tensors, STATE_TENSORS)
    if bad is not None:
        raise CheckpointError(f"cannot resume from {path}: {bad}; resume from an earlier checkpoint")
    state = unflatten_state(skeleton, tensors)
    return Checkpoint(path=path, weights=weights, state=state, trainer=trainer, recipe=recipe)


def load_adapters(path: str) -> dict[str, torch.Tensor]:
    """Adapters + connector of a checkpoint directory (no verification)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(path, ADAPTERS))


# ----------------------------------------------------------------------------------------------
# what a resume must check and restore
# ----------------------------------------------------------------------------------------------
def recipe_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two recipe trees (JSON values) differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                out.append(path)
            else:
                out += recipe_differences(saved[key], current[key], path)
        return out
    return [] if saved == current else [prefix]


def check_models_match(saved_recipe: dict[str, Any], recipe: dict[str, Any], path: str) -> None:
    """Refuse a resume whose recipe builds different models than the checkpoint was trained on:
    the saved adapters and optimizer state would not fit (or would silently mean something else)."""
    diffs = recipe_differences(saved_recipe.get("models", {}), recipe.get("models", {}), "models")
    if diffs:
        lines = [f"  {d}: checkpoint {_at(saved_recipe, d)!r}, recipe {_at(recipe, d)!r}" for d in diffs]
        raise CheckpointError(
            f"cannot resume from {path}: the recipe changes the models it was trained with:\n"
            + "\n".join(lines)
            + "\nput those fields back as they were, or train into a new output.dir "
            "(or pass --set output.resume=never to start over in this one)")


def schedule_position(stages: list[str], step: int) -> dict[str, Any]:
    """Where `step` (the next step to run) falls in the schedule: its stage and how many steps of
    that stage's current run came before it. `stage` is None past the end."""
    if step >= len(stages):
        return {"stage": None, "stage_step": 0}
    stage, k = stages[step], 0
    while step - k - 1 >= 0 and stages[step - k - 1] == stage:
        k += 1
    return {"stage": stage, "stage_step": k}


def seed_rng(seed: int) -> None:
    """Seed this process's python, numpy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) generator states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# tensors + JSON instead of pickle
# ----------------------------------------------------------------------------------------------
def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a tree of dicts/lists/tuples of tensors and JSON values into (tensors, skeleton).

    Tensors are keyed by their dotted path (`learner.optimizer.state.3.exp_avg`) and replaced in
    the skeleton by {"__tensor__": key}; tuples become {"__tuple__": [...]} and dicts with
    non-string keys {"__items__": [[key, value], ...]}, so `unflatten_state` gives back the same
    types (torch's optimizer state is keyed by int). Anything else is refused: no pickle fallback.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
            return {"__items__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, (np.integer, np.floating, np.bool_)):
            return node.item()
        raise CheckpointError(f"cannot checkpoint {path or 'the state'}: a {type(node).__name__} is "
                              f"neither a tensor nor a JSON value (checkpoints never pickle)")

    return tensors, walk(tree, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _at(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return "(absent)"
        tree = tree[key]
    return tree


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoint manifests; the shipped shapes models)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    _fsync_file(path)
