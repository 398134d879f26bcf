"""bench/gpu_step.py, the script a GPU runs at full size, runs here on the CPU at depth 1: the paper
recipe's cold-start, encoder and decoder steps on the published widths, learner and rollout worker
in one process (the default suite's small variant of the dry run; the slow test runs rl.train)."""

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_step_script_runs_each_stage_on_cpu_at_depth_one(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "bench" / "gpu_step.py")
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    rows = gpu_step.main(["--device", "cpu", "--depth", "1", "--image-size", "64", "--encoder-image-size", "56",
                          "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8",
                          "--zero-stage", "2", "--json", str(tmp_path / "out.json")])
    assert [r["stage"] for r in rows] == ["build", "warmup", "cold_start", "encoder", "decoder"]
    for r in rows[1:]:
        assert math.isfinite(r["loss"]) and r["update_s"] > 0 and r["peak_gib"] > 0, r
    out = capsys.readouterr().out
    assert "device: CPU; depth 1; 64 px" in out and "decoder" in out
    assert (tmp_path / "out.json").exists()
