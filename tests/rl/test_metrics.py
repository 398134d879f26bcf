"""Reading metrics.jsonl while a run may still be writing it."""

from rl.metrics import read_metrics


def test_read_metrics_missing_file_and_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
