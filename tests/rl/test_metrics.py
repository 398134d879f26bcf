"""Reading metrics.jsonl while a run may still be writing it."""

from rl.metrics import read_metrics


def test_read_metrics_missing_file_and_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


# ----------------------------------------------------------------------------------------------
# per-reward statistics and the completions table (issue #16)
# ----------------------------------------------------------------------------------------------
import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rl.metrics import MetricsLogger, completions_table, reward_stats, tag  # noqa: E402


def test_reward_stats_are_trls_nanmean_and_nanstd():
    from trl.trainer.utils import nanstd

    per_reward = {"clip": [0.1, None, 0.3, 0.45, 0.2], "len_bonus": [1.0, 2.0, None, None, 4.0], "one": [None, 3.0]}
    stats = reward_stats(per_reward)
    for name, scores in per_reward.items():
        x = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float64)
        assert stats[f"reward_{name}_mean"] == pytest.approx(float(torch.nanmean(x)), abs=1e-12)
        if name != "one":
            assert stats[f"reward_{name}_std"] == pytest.approx(float(nanstd(x)), abs=1e-7)  # TRL: float32 inside
    assert stats["reward_one_std"] == 0.0  # one score: TRL's NaN, here 0
    assert math.isnan(reward_stats({"none": [None, None]})["reward_none_mean"])
    assert tag("reward_len_bonus_std") == "rewards/len_bonus/std" and tag("reward_mean") == "reward/mean"
    assert tag("captions") is None


def test_completions_table_rows_and_tensorboard_text(tmp_path):
    rows = completions_table(7, ["img-a", "img-b"], ["a | red", "b", "c", "d"], 2,
                             {"clip": [0.5, None, 0.25, 1.0]}, [1.0, -1.0, 0.0, 0.5], limit=3)
    assert [(r["image_id"], r["caption"], r["rewards"]["clip"], r["advantage"]) for r in rows] == [
        ("img-a", "a | red", 0.5, 1.0), ("img-a", "b", None, -1.0), ("img-b", "c", 0.25, 0.0)]
    with pytest.raises(ValueError, match="captions"):
        completions_table(0, ["x"], ["a", "b", "c"], 2, {}, [0.0, 0.0, 0.0])
    logger = MetricsLogger(str(tmp_path), tensorboard=True)
    logger.log_completions(rows)
    logger.close()
    assert [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()] == rows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("completions/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 7 and "| img-a | a \\| red | 0.5000 | 1.0000 |" in text
