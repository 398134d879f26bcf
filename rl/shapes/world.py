"""Shapes world: small synthetic images whose contents are known exactly.

A scene is 1..`max_objects` flat-coloured shapes on a plain background, each in its own cell of a
3x3 grid (so shapes never overlap). Because we drew the image, we know every fact about it, which
lets tests and toy runs score captions exactly instead of with a learned judge:

    example = generate_shapes(1, seed=0)[0]
    example.captions["full"]   # "two shapes on a black background. a large red circle at the top
                               #  left. a small blue square at the bottom right."
    coverage("a red circle", example)   # fraction of example.fact_set() that the caption states

Design choices (why, not what):
- Kinds are distinct within one image, so "the circle" names exactly one object and the
  per-object facts ("the circle is red") are unambiguous. This caps `max_objects` at len(KINDS).
- The background is a dark colour and no palette colour is dark, so every drawn pixel is either
  pure background or exactly one object's colour (no anti-aliasing): the ground truth can be
  checked pixel by pixel.
- Splits are disjoint by construction: a scene's layout (background + objects, independent of
  image size) is hashed into 100 buckets and each split owns a fixed range of buckets
  (`SPLIT_BUCKETS`). A split's generator only keeps layouts from its own buckets, so "train" and
  "heldout" can never share an image, for any seeds.
- Captions use a small closed vocabulary (`VOCABULARY`) so a word-level tokenizer can be built
  from it and `parse_caption` can read captions back into facts.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# The closed world
# ---------------------------------------------------------------------------------------------

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Well-separated, all bright: none is close to a background colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 90, 255),
    "yellow": (245, 220, 30),
    "white": (255, 255, 255),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (100, 100, 100),
}

# Side of the shape as a fraction of the (smallest) cell width.
SIZES: dict[str, float] = {"small": 0.5, "large": 0.8}

# Reading order: row by row, left to right. Index i is row i // 3, column i % 3.
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")  # index k -> k + 1 shapes

# Each split owns buckets [lo, hi) of sha256(layout) % 100; see the module docstring.
SPLIT_BUCKETS: dict[str, tuple[int, int]] = {
    "train": (0, 80),
    "val": (80, 90),
    "heldout": (90, 100),
}

PUNCTUATION: tuple[str, ...] = (".", ",")

# Every word a caption (any level) or an element phrase can contain.
VOCABULARY: list[str] = sorted(
    set(KINDS)
    | set(COLORS)
    | set(BACKGROUNDS)
    | set(SIZES)
    | {w for cell in CELLS for w in cell.split()}
    | set(NUMBER_WORDS)
    | {"a", "and", "at", "the", "on", "background", "shape", "shapes", "is", "are", "there"}
    | set(PUNCTUATION)
)

Fact = tuple[str, ...]
"""An atomic fact. One of:
("kind", kind) | ("color", kind, color) | ("size", kind, size) | ("cell", kind, cell)
| ("count", number_word) | ("background", color)."""


# ---------------------------------------------------------------------------------------------
# Scene objects
# ---------------------------------------------------------------------------------------------


def cell_bounds(cell: str, image_size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel bounds (x0, y0, x1, y1) of a grid cell in an image_size x image_size image."""
    index = CELLS.index(cell)
    row, col = divmod(index, 3)
    edges = [round(i * image_size / 3) for i in range(4)]
    return edges[col], edges[row], edges[col + 1] - 1, edges[row + 1] - 1


@dataclass(frozen=True)
class ShapeObject:
    """One shape. `kind`, `color`, `size`, `cell` are names from KINDS, COLORS, SIZES, CELLS."""

    kind: str
    color: str
    size: str
    cell: str
    image_size: int = 32

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("color", self.color, tuple(COLORS)),
            ("size", self.size, tuple(SIZES)),
            ("cell", self.cell, CELLS),
        ):
            if value not in allowed:
                raise ValueError(f"ShapeObject.{name}={value!r}; allowed: {', '.join(allowed)}")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bbox (x0, y0, x1, y1): a square centred in the object's cell."""
        cx0, cy0, cx1, cy1 = cell_bounds(self.cell, self.image_size)
        cell_w = min(cx1 - cx0 + 1, cy1 - cy0 + 1)
        side = max(3, int(SIZES[self.size] * cell_w + 0.5))
        x0 = cx0 + (cx1 - cx0 + 1 - side) // 2
        y0 = cy0 + (cy1 - cy0 + 1 - side) // 2
        return x0, y0, x0 + side - 1, y0 + side - 1

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "color": self.color, "size": self.size, "cell": self.cell}

    def draw(self, draw: ImageDraw.ImageDraw) -> None:
        x0, y0, x1, y1 = self.box
        fill = self.rgb
        if self.kind == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif self.kind == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif self.kind == "triangle":
            # Apex at the top middle, base along the bottom edge of the box.
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        elif self.kind == "cross":
            side = x1 - x0 + 1
            bar = side // 3
            if (side - bar) % 2:  # keep the bars centred: same parity as the side
                bar += 1
            m = (side - bar) // 2
            draw.rectangle([x0 + m, y0, x0 + m + bar - 1, y1], fill=fill)
            draw.rectangle([x0, y0 + m, x1, y0 + m + bar - 1], fill=fill)


@dataclass
class ShapeExample:
    """A generated image with its ground truth.

    elements: ReaDe grouping used by the caption reward:
        {"user": ["a circle", ...], "detail": ["the circle is red", ...],
         "supplementary": ["the circle is at the top left", ..., "there are two shapes", ...]}
    captions: {"short": kinds only, "medium": kinds + colours, "full": every fact}.
    """

    image: Image.Image
    objects: list[ShapeObject]
    image_id: str
    elements: dict[str, list[str]]
    captions: dict[str, str]
    background: str = "black"

    def fact_set(self) -> set[Fact]:
        return fact_set(self.objects, self.background)


def fact_set(objects: list[ShapeObject], background: str = "black") -> set[Fact]:
    """Atomic facts of a scene: kind, color, size, cell per object, the count, the background.

    len(fact_set) == 4 * len(objects) + 2.
    """
    facts: set[Fact] = {("count", NUMBER_WORDS[len(objects) - 1]), ("background", background)}
    for obj in objects:
        facts |= {
            ("kind", obj.kind),
            ("color", obj.kind, obj.color),
            ("size", obj.kind, obj.size),
            ("cell", obj.kind, obj.cell),
        }
    return facts


def _join(phrases: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(objects: list[ShapeObject], background: str = "black") -> tuple[dict, dict]:
    """(elements, captions) for a scene; objects are described in reading order of their cells."""
    objects = sorted(objects, key=lambda o: CELLS.index(o.cell))
    n = len(objects)
    count = NUMBER_WORDS[n - 1]
    shapes_word = "shape" if n == 1 else "shapes"
    elements = {
        "user": [f"a {o.kind}" for o in objects],
        "detail": [line for o in objects
                   for line in (f"the {o.kind} is {o.color}", f"the {o.kind} is {o.size}")],
        "supplementary": [f"the {o.kind} is at the {o.cell}" for o in objects] + [
            f"there {'is' if n == 1 else 'are'} {count} {shapes_word}",
            f"the background is {background}",
        ],
    }
    full = [f"{count} {shapes_word} on a {background} background."] + [
        f"a {o.size} {o.color} {o.kind} at the {o.cell}." for o in objects
    ]
    captions = {
        "short": _join([f"a {o.kind}" for o in objects]),
        "medium": _join([f"a {o.color} {o.kind}" for o in objects]),
        "full": " ".join(full),
    }
    return elements, captions


def render(objects: list[ShapeObject], background: str = "black", size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_obj = obj if obj.image_size == size else ShapeObject(
            obj.kind, obj.color, obj.size, obj.cell, size)
        draw_obj.draw(draw)
    return image


def make_example(objects: list[ShapeObject], image_id: str, background: str = "black",
                 size: int = 32) -> ShapeExample:
    objects = sorted(objects, key=lambda o: CELLS.index(o.cell))
    elements, captions = describe(objects, background)
    return ShapeExample(render(objects, background, size), objects, image_id, elements, captions,
                        background)


# ---------------------------------------------------------------------------------------------
# Captions: tokenisation, parsing, scoring
# ---------------------------------------------------------------------------------------------


def caption_words(text: str) -> list[str]:
    """Lowercase word tokens with punctuation split off: "A red circle." -> [a, red, circle, .]"""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def caption_length(text: str) -> int:
    """Number of words, punctuation not counted."""
    return sum(1 for w in caption_words(text) if w[0].isalnum())


_PLURALS = {k + ("es" if k.endswith("s") else "s"): k for k in KINDS}
_VERTICAL = {"top", "bottom"}
_HORIZONTAL = {"left", "right"}
_CENTER = {"center", "centre", "middle"}


def _parse_phrase(words: list[str]) -> set[Fact]:
    """Facts stated by one phrase such as "a large red circle at the top left"."""
    kinds = [_PLURALS.get(w, w) for w in words if _PLURALS.get(w, w) in KINDS]
    facts: set[Fact] = set()
    if "background" in words:
        colors = [w for w in words if w in BACKGROUNDS]
        if colors:
            facts.add(("background", colors[0]))
    for i, w in enumerate(words):
        if w in NUMBER_WORDS and i + 1 < len(words) and words[i + 1] in ("shape", "shapes"):
            facts.add(("count", w))
    if not kinds:
        return facts
    kind = kinds[0]  # one object per phrase; extra kind words are ignored (best effort)
    facts.add(("kind", kind))
    # The first colour / size word wins, so piling up attribute words does not buy coverage.
    color = next((w for w in words if w in COLORS), None)
    size = next((w for w in words if w in SIZES), None)
    if color:
        facts.add(("color", kind, color))
    if size:
        facts.add(("size", kind, size))
    vertical = next((w for w in words if w in _VERTICAL), None)
    horizontal = next((w for w in words if w in _HORIZONTAL), None)
    if vertical or horizontal:
        cell = " ".join(w for w in (vertical, horizontal) if w)
        facts.add(("cell", kind, cell))
    elif any(w in _CENTER for w in words):
        facts.add(("cell", kind, "center"))
    return facts


def parse_caption(text: str) -> set[Fact]:
    """Read a caption in the shapes language back into atomic facts (see `Fact`), best effort.

    The caption is split into phrases at ".", "," and "and"; each phrase describes at most one
    object (its first kind word) plus any count ("two shapes") or background ("black background").
    """
    facts: set[Fact] = set()
    phrase: list[str] = []
    for w in caption_words(text) + ["."]:
        if w in (".", ",", ";", "and"):
            facts |= _parse_phrase(phrase)
            phrase = []
        else:
            phrase.append(w)
    return facts


def coverage(caption: str, example: ShapeExample) -> float:
    """Recall of ground-truth facts: |parse(caption) & facts| / |facts|, in [0, 1]."""
    truth = example.fact_set()
    return len(parse_caption(caption) & truth) / len(truth)


def precision(caption: str, example: ShapeExample) -> float:
    """Fraction of the caption's parsed facts that are true (1.0 when it states nothing)."""
    stated = parse_caption(caption)
    if not stated:
        return 1.0
    return len(stated & example.fact_set()) / len(stated)


def color_counts(caption: str, example: ShapeExample) -> tuple[int, int]:
    """(stated, correct) colours of shapes: the caption's ("color", kind, colour) facts, and how
    many of them are true (a colour given to a shape the scene does not have is wrong). Summed over
    captions, correct / stated is issue 18's "colour words correct in stated shapes"."""
    stated = [f for f in parse_caption(caption) if f[0] == "color"]
    return len(stated), len(set(stated) & example.fact_set())


def repeats_phrase(caption: str, min_words: int = 2) -> bool:
    """True when the caption repeats itself: a run of at least `min_words` tokens (punctuation
    counted) followed at once by the same run ("three shapes on a three shapes on a ...",
    "a red circle. a red circle."), or one sentence stated twice. The shapes world's FULL captions
    never do: each shape's sentence names a distinct kind and cell."""
    words = caption_words(caption)
    n = len(words)
    for size in range(min_words, n // 2 + 1):
        for i in range(n - 2 * size + 1):
            if words[i:i + size] == words[i + size:i + 2 * size]:
                return True
    sentences = [s.strip() for s in " ".join(words).split(".") if s.strip()]
    return len(sentences) != len(set(sentences))


# ---------------------------------------------------------------------------------------------
# Generation, saving, loading
# ---------------------------------------------------------------------------------------------


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def layout_key(objects: list[ShapeObject], background: str) -> str:
    """Canonical text of a scene, independent of image size and object order."""
    parts = sorted(f"{o.cell}:{o.kind}:{o.color}:{o.size}" for o in objects)
    return background + "|" + "|".join(parts)


def layout_split(objects: list[ShapeObject], background: str) -> str:
    """The one split that owns this layout (see SPLIT_BUCKETS)."""
    bucket = _stable_int(layout_key(objects, background)) % 100
    return next(s for s, (lo, hi) in SPLIT_BUCKETS.items() if lo <= bucket < hi)


def generate_shapes(n: int, seed: int, size: int = 32, max_objects: int = 3,
                    split: str = "train", background: str = "black") -> list[ShapeExample]:
    """n distinct scenes, deterministic in (seed, split); splits never share a layout.

    background: a name from BACKGROUNDS, or "random" to draw one per image from BACKGROUNDS.
    image_id: f"{split}-{seed}-{i:05d}".
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLIT_BUCKETS)}")
    if not 1 <= max_objects <= len(KINDS):
        raise ValueError(f"max_objects={max_objects}; must be 1..{len(KINDS)} "
                         f"(kinds are distinct within an image)")
    if background != "random" and background not in BACKGROUNDS:
        raise ValueError(f"background={background!r}; allowed: random, {', '.join(BACKGROUNDS)}")
    if size < 12:
        raise ValueError(f"size={size}; must be >= 12 so every shape is at least 3 pixels wide")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, _stable_int(split) & 0xFFFFFFFF])
    examples: list[ShapeExample] = []
    seen: set[str] = set()
    color_names, size_names = list(COLORS), list(SIZES)
    max_tries = 200 * n + 1000  # guards against asking for more scenes than the split holds
    for _ in range(max_tries):
        if len(examples) == n:
            break
        k = int(rng.integers(1, max_objects + 1))
        kinds = rng.choice(len(KINDS), size=k, replace=False)
        cells = rng.choice(len(CELLS), size=k, replace=False)
        objects = [
            ShapeObject(KINDS[kind], color_names[rng.integers(len(color_names))],
                        size_names[rng.integers(len(size_names))], CELLS[cell], size)
            for kind, cell in zip(kinds, cells)
        ]
        bg = (list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
              if background == "random" else background)
        key = layout_key(objects, bg)
        if key in seen or layout_split(objects, bg) != split:
            continue
        seen.add(key)
        examples.append(make_example(objects, f"{split}-{seed}-{len(examples):05d}", bg, size))
    if len(examples) < n:
        raise ValueError(f"could only make {len(examples)} distinct {split} scenes of {n} asked "
                         f"(max_objects={max_objects}); raise max_objects or lower n")
    return examples


METADATA_FILE = "metadata.jsonl"


def save_shapes(examples: list[ShapeExample], folder: str | Path) -> Path:
    """Write {image_id}.png per example plus metadata.jsonl (one JSON object per image).

    The metadata uses the `file_name` key of the Hugging Face imagefolder convention.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / METADATA_FILE, "w") as f:
        for ex in examples:
            file_name = f"{ex.image_id}.png"
            ex.image.save(folder / file_name)
            f.write(json.dumps({
                "file_name": file_name,
                "image_id": ex.image_id,
                "background": ex.background,
                "objects": [o.to_dict() for o in ex.objects],
                "elements": ex.elements,
                "captions": ex.captions,
            }) + "\n")
    return folder


def load_shapes_folder(folder: str | Path) -> list[ShapeExample]:
    """Read back a folder written by save_shapes, in metadata order."""
    folder = Path(folder)
    examples = []
    with open(folder / METADATA_FILE) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            with Image.open(folder / row["file_name"]) as im:
                image = im.convert("RGB")
            objects = [ShapeObject(**o, image_size=image.width) for o in row["objects"]]
            examples.append(ShapeExample(image, objects, row["image_id"], row["elements"],
                                         row["captions"], row.get("background", "black")))
    return examples
