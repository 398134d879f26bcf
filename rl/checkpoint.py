"""Checkpoints: a directory written under a temporary name and renamed when complete.

`checkpoints/step-000012/` holds `adapters.safetensors` (encoder LoRA, decoder LoRA, connector;
keys prefixed `encoder.`, `decoder.`, `connector.`), `trainer.json` (step, stage, version) and
`recipe.yaml`. A directory without the final rename (`.tmp-...`) is never taken for a checkpoint.
Only safetensors and JSON are written: loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import yaml

PREFIX = "step-"


def save_checkpoint(root: str, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    recipe: dict[str, Any], keep_last: int = 2) -> str:
    """Write `root/step-{step:06d}` atomically; prune to the newest `keep_last` complete ones."""
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{PREFIX}{step:06d}")
    tmp = os.path.join(root, f".tmp-{PREFIX}{step:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "adapters.safetensors"))
    with open(os.path.join(tmp, "trainer.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(tmp, "recipe.yaml"), "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step: keep the old one until the new is complete
        old = final + f".old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX) and ".old-" not in n
                   and os.path.exists(os.path.join(root, n, "trainer.json")))
    return [os.path.join(root, n) for n in names]


def load_adapters(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapters.safetensors"))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
