"""The shapes world as a generated data source of rl.data (`data.generator: shapes`, the default
when `data.source` is null): its scenes, the words of its captions, and its exact caption metrics.

rl.data, rl.eval and the models never import this module; a recipe names it (rl/named.py), and
rl.data's `Generator` interface is all they see:

    world = ShapesWorld()
    world.examples(4, seed=0, split="heldout", size=32, max_objects=3)  # records with ground truth
    world.vocabulary                                                    # the tiny tokenizer's words
    world.caption_metrics(["a red circle"], examples[:1])               # coverage, precision, length
"""
from __future__ import annotations

from typing import Any, Sequence

from rl.shapes.world import (VOCABULARY, ShapeExample, caption_length, color_counts, coverage, generate_shapes,
                             precision, repeats_phrase)


class ShapesWorld:
    """rl.data.Generator for the shapes world (rl/shapes/world.py)."""

    name = "shapes"
    vocabulary: Sequence[str] = tuple(VOCABULARY)
    metrics: tuple[str, ...] = ("coverage", "precision", "caption_length", "repeats", "color_stated", "color_correct")

    def examples(self, n: int, seed: int, split: str = "train", **generate: Any) -> list[ShapeExample]:
        """`n` scenes of `split` (train | val | heldout, disjoint by layout); `generate`: the other
        kwargs of generate_shapes (size, max_objects)."""
        return generate_shapes(n, seed, split=split, **generate)

    def caption_metrics(self, captions: Sequence[str], examples: Sequence[ShapeExample]) -> list[dict[str, float]]:
        """Exact scores against each scene's ground truth: coverage (recall of its facts),
        precision (share of stated facts that are true), caption length in words, repeats (1 when
        the caption repeats a phrase, world.repeats_phrase), and the colours it gives shapes,
        stated and correct (world.color_counts; rl.eval sums them into `color_accuracy`)."""
        rows = []
        for c, e in zip(captions, examples):
            stated, correct = color_counts(c, e)
            rows.append({"coverage": coverage(c, e), "precision": precision(c, e), "caption_length": caption_length(c),
                         "repeats": float(repeats_phrase(c)), "color_stated": stated, "color_correct": correct})
        return rows
