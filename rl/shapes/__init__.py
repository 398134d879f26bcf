"""The shapes world: the embedded demo world and test bed (DESIGN.md "Package map").

- `rl.shapes.world`: the scene generator with its ground truth (kinds, colours, sizes, cells),
  captions at three levels, and the exact caption scores (coverage, precision);
- `rl.shapes.source`: the world as a generated data source (`data.generator: shapes`, rl.data's
  `Generator`: scenes, caption words, exact per-caption metrics for rl.eval);
- `rl.shapes.pretrain`: pretraining of the world's tiny models (`python -m rl.shapes.pretrain RECIPE`;
  `pretrain.provider: shapes`), and `rl.shapes.shipped`: the shipped ones (rl/shapes/pretrained/);
- `rl.shapes.judge`: the fact checker (`VerifiableJudge`, `rewards.judge.backend: verifiable`).

The trainer (rl.train, rl.eval, rl.data, rl.learner, rl.models, rewards) never imports this package;
a recipe names its parts (rl/named.py).

This module re-exports the generator's public names (`from rl.shapes import generate_shapes`);
it imports neither torch nor the pretraining, which load only when named.
"""
from rl.shapes.world import (
    BACKGROUNDS,
    CELLS,
    COLORS,
    Fact,
    KINDS,
    METADATA_FILE,
    NUMBER_WORDS,
    PUNCTUATION,
    SIZES,
    SPLIT_BUCKETS,
    ShapeExample,
    ShapeObject,
    VOCABULARY,
    caption_length,
    caption_words,
    cell_bounds,
    color_counts,
    coverage,
    describe,
    fact_set,
    generate_shapes,
    layout_key,
    layout_split,
    load_shapes_folder,
    make_example,
    parse_caption,
    precision,
    render,
    repeats_phrase,
    save_shapes,
)

__all__ = [
    "BACKGROUNDS", "CELLS", "COLORS", "KINDS", "METADATA_FILE", "NUMBER_WORDS", "PUNCTUATION", "SIZES",
    "SPLIT_BUCKETS", "VOCABULARY", "Fact", "ShapeExample", "ShapeObject", "caption_length",
    "caption_words", "cell_bounds", "coverage", "describe", "fact_set", "generate_shapes", "layout_key",
    "layout_split", "load_shapes_folder", "make_example", "parse_caption", "precision", "render",
    "save_shapes",
    "color_counts",
    "repeats_phrase",
]
