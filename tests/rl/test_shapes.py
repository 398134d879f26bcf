"""The shapes world's ground truth is what is drawn, and captions read back into the same facts."""
import numpy as np
import pytest

from rl.shapes import (
    color_counts,
    repeats_phrase,
    BACKGROUNDS,
    CELLS,
    VOCABULARY,
    ShapeObject,
    cell_bounds,
    caption_length,
    caption_words,
    coverage,
    generate_shapes,
    layout_key,
    load_shapes_folder,
    make_example,
    parse_caption,
    precision,
    save_shapes,
)


@pytest.fixture(scope="module")
def examples():
    # Both sizes, up to 4 objects, both backgrounds: the cases the pixel checks must hold for.
    return (generate_shapes(60, seed=0)
            + generate_shapes(30, seed=1, size=64, max_objects=4, background="random"))


def _box_pixels(arr, box):
    x0, y0, x1, y1 = box
    return arr[y0:y1 + 1, x0:x1 + 1]


def test_drawn_pixels_match_ground_truth(examples):
    for ex in examples:
        arr = np.asarray(ex.image)
        bg = np.array(BACKGROUNDS[ex.background])
        drawn = np.zeros(arr.shape[:2], dtype=bool)  # pixels claimed by some object's box
        for obj in ex.objects:
            x0, y0, x1, y1 = obj.box
            patch = _box_pixels(arr, obj.box)
            is_obj = (patch == obj.rgb).all(-1)
            is_bg = (patch == bg).all(-1)
            # Inside the box: only the object's colour and background (no other object leaks in).
            assert (is_obj | is_bg).all(), ex.image_id
            # The centre pixel carries the object's colour, for every kind.
            assert tuple(arr[(y0 + y1) // 2, (x0 + x1) // 2]) == obj.rgb, (ex.image_id, obj)
            # The kind is visible: a square fills its box; the others leave the top corners empty.
            if obj.kind == "square":
                assert is_obj.all()
            else:
                assert is_bg[0, 0] and is_bg[0, -1], (ex.image_id, obj)
            if obj.kind == "triangle":
                assert is_obj[-1].all()  # the base is the full bottom row
            if obj.kind in ("triangle", "cross", "circle"):
                assert 0.3 < is_obj.mean() < 0.95, (ex.image_id, obj, is_obj.mean())
            # The box sits inside the object's cell.
            cx0, cy0, cx1, cy1 = cell_bounds(obj.cell, ex.image.width)
            assert cx0 <= x0 and cy0 <= y0 and x1 <= cx1 and y1 <= cy1
            drawn[y0:y1 + 1, x0:x1 + 1] = True
        # Everything outside the boxes is pure background.
        assert (arr[~drawn] == bg).all(), ex.image_id


def test_empty_cells_are_background_and_counts_match(examples):
    for ex in examples:
        arr = np.asarray(ex.image)
        bg = np.array(BACKGROUNDS[ex.background])
        occupied = set()
        for cell in CELLS:
            x0, y0, x1, y1 = cell_bounds(cell, ex.image.width)
            if not (arr[y0:y1 + 1, x0:x1 + 1] == bg).all():
                occupied.add(cell)
        assert occupied == {o.cell for o in ex.objects}, ex.image_id
        assert len(ex.objects) == len(occupied) == len(ex.elements["user"])
        assert len({o.kind for o in ex.objects}) == len(ex.objects)  # kinds are distinct
        n = len(ex.objects)
        assert ex.captions["full"].startswith(("one shape", "two shapes", "three shapes",
                                               "four shapes")[n - 1])


def test_generation_is_deterministic_and_seeds_differ():
    a = generate_shapes(20, seed=3)
    b = generate_shapes(20, seed=3)
    c = generate_shapes(20, seed=4)
    assert [x.image.tobytes() for x in a] == [x.image.tobytes() for x in b]
    assert [x.captions for x in a] == [x.captions for x in b]
    assert [x.image_id for x in a] == [f"train-3-{i:05d}" for i in range(20)]
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in c]
    assert len({x.image.tobytes() for x in a}) == 20  # no duplicates within a split


def test_splits_are_disjoint():
    # Same seed and different seeds: splits must never share a layout (hence an image).
    train = generate_shapes(300, seed=0, max_objects=2) + generate_shapes(300, seed=7,
                                                                          max_objects=2)
    heldout = generate_shapes(100, seed=0, max_objects=2, split="heldout")
    val = generate_shapes(100, seed=0, max_objects=2, split="val")
    keys = {name: {layout_key(e.objects, e.background) for e in exs}
            for name, exs in (("train", train), ("heldout", heldout), ("val", val))}
    assert not keys["train"] & keys["heldout"]
    assert not keys["train"] & keys["val"]
    assert not keys["val"] & keys["heldout"]
    assert not {e.image.tobytes() for e in train} & {e.image.tobytes() for e in heldout}
    assert heldout[0].image_id == "heldout-0-00000"


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        generate_shapes(1, seed=0, split="test")
    with pytest.raises(ValueError, match="max_objects"):
        generate_shapes(1, seed=0, max_objects=5)
    with pytest.raises(ValueError, match="kind"):
        ShapeObject("hexagon", "red", "large", "top")


def test_full_caption_parses_to_all_facts(examples):
    for ex in examples:
        assert parse_caption(ex.captions["full"]) == ex.fact_set()
        assert coverage(ex.captions["full"], ex) == 1.0
        assert precision(ex.captions["full"], ex) == 1.0
        assert coverage(ex.captions["short"], ex) < coverage(ex.captions["medium"], ex) < 1.0
        assert len(ex.fact_set()) == 4 * len(ex.objects) + 2


def test_coverage_hand_computed():
    ex = make_example([ShapeObject("circle", "red", "large", "top left"),
                       ShapeObject("square", "blue", "small", "bottom right")], "tiny")
    # Facts: 2 kinds + 2 colours + 2 sizes + 2 cells + count + background = 10.
    assert len(ex.fact_set()) == 10
    assert ex.captions == {
        "short": "a circle and a square",
        "medium": "a red circle and a blue square",
        "full": "two shapes on a black background. a large red circle at the top left. "
                "a small blue square at the bottom right.",
    }
    # kind(circle) + color(circle, red) = 2 of 10.
    assert coverage("a red circle", ex) == pytest.approx(0.2)
    # kind + size + cell right, colour wrong: 3 of 10; precision 3 true of 4 stated.
    assert coverage("A large blue circle at the top left.", ex) == pytest.approx(0.3)
    assert precision("A large blue circle at the top left.", ex) == pytest.approx(0.75)
    # short caption: the two kinds; plus the count: 3 of 10.
    assert coverage(ex.captions["short"], ex) == pytest.approx(0.2)
    assert coverage("two shapes: a circle and a square", ex) == pytest.approx(0.3)
    assert coverage("", ex) == 0.0
    assert parse_caption("a green triangle in the middle") == {
        ("kind", "triangle"), ("color", "triangle", "green"), ("cell", "triangle", "center")}


def test_caption_words_are_in_vocabulary(examples):
    vocab = set(VOCABULARY)
    for ex in examples:
        texts = list(ex.captions.values()) + [t for group in ex.elements.values() for t in group]
        for text in texts:
            words = caption_words(text)
            assert set(words) <= vocab, (text, set(words) - vocab)
            assert " ".join(words).replace(" .", ".").replace(" ,", ",") == text


def test_caption_words_and_length():
    assert caption_words("Two shapes. A red circle, at the top.") == [
        "two", "shapes", ".", "a", "red", "circle", ",", "at", "the", "top", "."]
    assert caption_length("Two shapes. A red circle, at the top.") == 8


def test_save_load_round_trip(tmp_path, examples):
    subset = examples[:5] + examples[-5:]
    save_shapes(subset, tmp_path)
    assert (tmp_path / "metadata.jsonl").is_file()
    loaded = load_shapes_folder(tmp_path)
    assert len(loaded) == len(subset)
    for a, b in zip(subset, loaded):
        assert a.image_id == b.image_id
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.objects == b.objects and a.background == b.background
        assert a.elements == b.elements and a.captions == b.captions
        assert a.fact_set() == b.fact_set()


def test_true_captions_never_repeat_and_state_true_colours():
    """The ground truth passes both caption checks: rl.eval's repeat and colour metrics can fail only
    for what the encoder states, never for the language itself."""
    for e in generate_shapes(200, seed=3, max_objects=4):
        for level in ("short", "medium", "full"):
            assert not repeats_phrase(e.captions[level]), e.captions[level]
        stated, correct = color_counts(e.captions["full"], e)
        assert stated == correct == len(e.objects)


def test_repeats_and_wrong_colours_are_found():
    e = next(x for x in generate_shapes(50, seed=1) if len(x.objects) == 2)
    assert repeats_phrase("three shapes on a three shapes on a")
    assert repeats_phrase("a red circle. a red circle.")
    assert repeats_phrase("a circle a circle")
    assert not repeats_phrase("a large white square at the top left. a large white triangle at the top right.")
    a, b = e.objects
    wrong = next(c for c in ("red", "green", "blue", "yellow", "white") if c != a.color)
    caption = f"a {wrong} {a.kind}. a {b.color} {b.kind}."
    assert color_counts(caption, e) == (2, 1)
    missing = next(k for k in ("circle", "square", "triangle", "cross") if k not in (a.kind, b.kind))
    assert color_counts(f"a {a.color} {missing}", e) == (1, 0)  # a colour for an absent shape is wrong
    assert color_counts("two shapes", e) == (0, 0)
