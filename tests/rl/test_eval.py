"""Unified-Bench arithmetic (rl/eval.py) on hand-computed values, and its caption scores against the
shapes world's ground truth."""

import json
import math
from pathlib import Path

import pytest

from rl import eval as ub
from rl.config import load_recipe
from rl.shapes import ShapeObject, make_example

ROOT = Path(__file__).resolve().parents[2]


def rows():
    # Two images, two backbones. Hand values:
    #   clip:   (0.9 + 0.7) / 2 = 0.8      clip_b: (0.6 + 0.4) / 2 = 0.5
    #   unified = mean over backbones of the means = (0.8 + 0.5) / 2 = 0.65
    #   coverage (0.5 + 1.0) / 2 = 0.75, precision (1.0 + 0.5) / 2 = 0.75, length (4 + 12) / 2 = 8
    return [
        {"similarity": {"clip": 0.9, "clip_b": 0.6}, "coverage": 0.5, "precision": 1.0, "caption_length": 4},
        {"similarity": {"clip": 0.7, "clip_b": 0.4}, "coverage": 1.0, "precision": 0.5, "caption_length": 12},
    ]


def test_summary_means_per_backbone_and_unified_is_their_mean():
    s = ub.summarize(rows())
    assert s["n"] == 2
    assert s["sim/clip"] == pytest.approx(0.8)
    assert s["sim/clip_b"] == pytest.approx(0.5)
    assert s["unified"] == pytest.approx(0.65)
    assert s["coverage"] == pytest.approx(0.75)
    assert s["precision"] == pytest.approx(0.75)
    assert s["caption_length"] == pytest.approx(8.0)


def test_unified_is_mean_of_backbone_means_not_of_pooled_scores():
    # With equal image counts both orders agree; the definition is still per backbone first
    # (UAE table 1: "Overall" averages the backbone columns). One backbone: unified == its mean.
    one = [{"similarity": {"clip": v}, "coverage": 0.0, "precision": 1.0, "caption_length": 1} for v in (0.2, 0.4, 0.9)]
    s = ub.summarize(one)
    assert s["unified"] == pytest.approx(0.5) == pytest.approx(s["sim/clip"])


def test_empty_rows_give_nan_not_zero():
    s = ub.summarize([])
    assert s["n"] == 0 and math.isnan(s["unified"]) and math.isnan(s["coverage"])


def test_compare_is_after_minus_before_on_shared_keys():
    before = {"n": 64, "unified": 0.30, "coverage": 0.20, "caption_length": 5.0, "sim/clip": 0.4}
    after = {"n": 64, "unified": 0.45, "coverage": 0.55, "caption_length": 21.5}
    d = ub.compare(before, after)
    assert d == pytest.approx({"unified": 0.15, "coverage": 0.35, "caption_length": 16.5})
    assert "n" not in d and "sim/clip" not in d


def test_table_has_a_row_per_metric_and_signed_deltas():
    before, after = ub.summarize(rows()), ub.summarize(rows()[:1])
    table = ub.format_table({"before": before, "after": after, "delta": ub.compare(before, after)}, "title")
    lines = table.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["metric", "before", "after", "delta"]
    unified = next(line for line in lines if line.startswith("unified")).split()
    # before 0.65, after (0.9 + 0.6) / 2 = 0.75, delta +0.1
    assert unified[1:] == ["0.6500", "0.7500", "+0.1000"]
    json.dumps(before)  # summaries are plain JSON


def test_caption_scores_against_ground_truth():
    ex = make_example([ShapeObject("circle", "red", "large", "top left"),
                       ShapeObject("square", "blue", "small", "bottom right")], "x")
    # 2 objects -> 4 * 2 + 2 = 10 facts.
    short, full = ex.captions["short"], ex.captions["full"]
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")  # data.generator: shapes (the default)
    s_short, s_full, s_wrong = ub.score_captions([short, full, "a green circle"], [ex, ex, ex], recipe)
    assert s_short == {"coverage": 0.2, "precision": 1.0, "caption_length": 5,  # 2 kinds of 10; "a circle and a square"
                       "repeats": 0.0, "color_stated": 0, "color_correct": 0}
    assert s_full["coverage"] == 1.0 and s_full["precision"] == 1.0
    assert s_full["caption_length"] == len(full.replace(".", " ").split())
    # "a green circle": kind right (1/10), colour wrong -> precision 1/2
    assert s_wrong == {"coverage": 0.1, "precision": 0.5, "caption_length": 3,
                       "repeats": 0.0, "color_stated": 1, "color_correct": 0}
    assert s_full["color_stated"] == s_full["color_correct"] == 2
    # any image set (no generated world): the caption length alone, counted the same way
    assert ub.score_captions([full, "A red circle."], [ex, ex]) == [{"caption_length": s_full["caption_length"]},
                                                                 {"caption_length": 3}]


def test_counted_pairs_become_accuracies_and_true_caption_renders_are_summarised():
    # colour: 2 of 3 stated correct in row 1, 0 of 1 in row 2 -> (2 + 0) / (3 + 1) = 0.5, a ratio of
    # sums (the mean of per-row ratios would be 0.33); repeats is a plain mean (1 of 2 rows).
    rs = rows()
    rs[0].update(color_stated=3, color_correct=2, repeats=1.0, truth_similarity={"clip": 0.5, "clip_b": 0.3})
    rs[1].update(color_stated=1, color_correct=0, repeats=0.0, truth_similarity={"clip": 0.7, "clip_b": 0.1})
    s = ub.summarize(rs)
    assert s["color_accuracy"] == pytest.approx(0.5)
    assert "color_stated" not in s and "color_correct" not in s
    assert s["repeats"] == pytest.approx(0.5)
    assert s["truth_sim/clip"] == pytest.approx(0.6) and s["truth_sim/clip_b"] == pytest.approx(0.2)
    assert s["truth_unified"] == pytest.approx(0.4)
    nothing = ub.summarize([{**r, "color_stated": 0, "color_correct": 0} for r in rows()])
    assert math.isnan(nothing["color_accuracy"])
