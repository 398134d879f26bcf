"""Dataset loading from every source kind, its error messages, and resumable batching."""
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rl.data import (
    DataError,
    ImageDataset,
    ImageRecord,
    check_source,
    load_dataset_from_config,
)
from rl.shapes import generate_shapes, save_shapes


def _solid(color, size=(8, 6)):
    return Image.new("RGB", size, color)


def test_folder_with_shapes_metadata(tmp_path):
    examples = generate_shapes(6, seed=0)
    save_shapes(examples, tmp_path)
    ds = load_dataset_from_config(str(tmp_path))
    assert check_source(str(tmp_path)) == "folder"
    assert len(ds) == 6
    by_id = {r.image_id: r for r in ds}
    for ex in examples:
        rec = by_id[ex.image_id]
        assert rec.elements == ex.elements and rec.captions == ex.captions
        assert np.array_equal(np.asarray(rec.image), np.asarray(ex.image))


def test_folder_recursive_sorted_rgb_resized_limited(tmp_path):
    (tmp_path / "b").mkdir()
    _solid((255, 0, 0)).save(tmp_path / "b" / "z.png")
    _solid((0, 255, 0)).convert("L").save(tmp_path / "a.JPG")  # grayscale, upper-case suffix
    _solid((0, 0, 255)).save(tmp_path / "c.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset_from_config(str(tmp_path), image_size=16)
    assert [r.image_id for r in ds] == ["a", "b/z", "c"]
    assert all(r.image.mode == "RGB" and r.image.size == (16, 16) for r in ds)
    assert ds[1].elements is None and ds[1].captions is None
    assert ds[1].image.getpixel((8, 8)) == (255, 0, 0)
    assert [r.image_id for r in load_dataset_from_config(str(tmp_path), limit=2)] == ["a", "b/z"]


def test_saved_hf_dataset_by_path(tmp_path):
    import datasets

    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ds = datasets.Dataset.from_dict({"image": [_solid(c) for c in colors], "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert check_source(str(tmp_path / "saved")) == "saved_dataset"
    loaded = load_dataset_from_config(str(tmp_path / "saved"))
    assert [r.image.getpixel((0, 0)) for r in loaded] == colors
    assert [r.image_id for r in loaded] == ["saved-000000", "saved-000001", "saved-000002"]
    assert len(load_dataset_from_config(str(tmp_path / "saved"), limit=2)) == 2

    # A saved DatasetDict: the split is selected, and a missing split is named.
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_dataset_from_config(str(tmp_path / "dd"), split="test")) == 1
    with pytest.raises(DataError, match="no split 'val'.*test, train|no split 'val'.*train, test"):
        load_dataset_from_config(str(tmp_path / "dd"), split="val")


def test_missing_image_column_lists_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"picture": [_solid((1, 2, 3))], "text": ["x"]}).save_to_disk(
        str(tmp_path / "saved"))
    for call in (lambda: check_source(str(tmp_path / "saved"), "image"),
                 lambda: load_dataset_from_config(str(tmp_path / "saved"))):
        with pytest.raises(DataError, match="image_column='image'.*picture, text"):
            call()
    assert len(load_dataset_from_config(str(tmp_path / "saved"), image_column="picture")) == 1


def test_empty_hf_dataset_is_an_error(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [_solid((1, 2, 3))]}).select([])
    ds.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty"):
        load_dataset_from_config(str(tmp_path / "empty"))


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_source(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_from_config(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no images found in .*empty.*\.png, \.jpg"):
        load_dataset_from_config(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no images found"):
        check_source(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    _solid((0, 0, 0)).save(tmp_path / "bad" / "good.png")
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset_from_config(str(tmp_path / "bad"))


def test_check_source_kinds(monkeypatch, tmp_path):
    assert check_source(None) == "generate"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_source("someone/some-dataset") == "hub"  # not downloaded, just accepted: recipes validate offline
    with pytest.raises(DataError, match=r"cannot load dataset 'someone/some-dataset' split 'train' \(no local folder "
                                        r"'someone/some-dataset' in .*read as a Hub name\) \(HF_HUB_OFFLINE=1"):
        load_dataset_from_config("someone/some-dataset")  # loading names it, and the folder it is not
    # What can only be a path is never tried as a Hub name: a typo below an existing folder too.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for typo in ("./no/such/folder", "data/imags", "imags/", "a/b/c", "photo.png"):
        with pytest.raises(DataError, match=f"folder '{typo}' does not exist"):
            check_source(typo)


def test_generated_source():
    ds = load_dataset_from_config(None, generate={"n": 5, "seed": 2}, image_size=64)
    assert len(ds) == 5 and ds.source == "shapes"
    assert ds[0].image.size == (64, 64)
    assert ds[0].image_id == "train-2-00000" and ds[0].captions["full"]
    with pytest.raises(DataError, match="generate"):
        load_dataset_from_config(None, generate={"n": 2, "seed": 0, "split": "test"})


def _ids(batch):
    return [r.image_id for r in batch]


def test_batches_deterministic_and_resumable():
    ds = ImageDataset([ImageRecord(_solid((i, 0, 0)), f"r{i}") for i in range(7)])
    it = ds.batches(batch_size=3, seed=5)
    seen = [_ids(next(it)) for _ in range(6)]  # 18 records: crosses two epoch boundaries
    assert it.position == 18
    # Each batch is a pure function of its position.
    assert seen == [_ids(ds.batch_at(3 * k, 3, 5)) for k in range(6)]
    # Resuming at a saved position continues exactly.
    resumed = ds.batches(batch_size=3, seed=5, start=9)
    assert [_ids(next(resumed)) for _ in range(3)] == seen[3:]
    # Every epoch visits every record once.
    flat = [i for b in seen for i in b]
    assert sorted(flat[:7]) == sorted(flat[7:14]) == sorted(f"r{i}" for i in range(7))
    assert flat[:7] != flat[7:14]  # a fresh permutation per epoch
    # The same seed repeats; another seed shuffles differently.
    assert _ids(ds.batch_at(0, 7, 5)) == flat[:7]
    assert _ids(ds.batch_at(0, 7, 6)) != flat[:7]


def test_empty_dataset_rejected():
    with pytest.raises(DataError, match="empty"):
        ImageDataset([])


# ---------------------------------------------------------------------------------------------
# Image folders through datasets' imagefolder: splits, metadata, bad images
# ---------------------------------------------------------------------------------------------


def _bomb_png(path):
    """A valid 1x1 PNG whose header announces 100000 x 100000 pixels (a decompression bomb)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))


def test_imagefolder_splits_metadata_references_and_columns(tmp_path):
    for split, colors in (("train", [(255, 0, 0), (0, 255, 0)]), ("test", [(0, 0, 255)])):
        (tmp_path / split).mkdir()
        rows = []
        for i, c in enumerate(colors):
            _solid(c).save(tmp_path / split / f"{i}.png")
            rows.append(f'{{"file_name": "{i}.png", "text": "{split} caption {i}", "score": {i}}}')
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    train = load_dataset_from_config(str(tmp_path))  # split "train" by default: test/ stays out
    assert [r.image_id for r in train] == ["train/0", "train/1"]
    assert [r.references for r in train] == [["train caption 0"], ["train caption 1"]]
    assert [r.columns for r in train] == [{"text": "train caption 0", "score": 0}, {"text": "train caption 1", "score": 1}]
    assert [r.texts for r in train] == [{"text": "train caption 0"}, {"text": "train caption 1"}]  # string columns
    test = load_dataset_from_config(str(tmp_path), split="test")
    assert [(r.image_id, r.image.getpixel((0, 0)), r.references) for r in test] == [
        ("test/0", (0, 0, 255), ["test caption 0"])]
    with pytest.raises(DataError, match="no split 'validation'; available splits: (train, test|test, train)"):
        load_dataset_from_config(str(tmp_path), split="validation")
    with pytest.raises(DataError, match="reference_column='caption'.*text, score"):
        load_dataset_from_config(str(tmp_path), reference_column="caption")
    # An image without a metadata row: datasets would drop it silently; refused, naming it.
    _solid((9, 9, 9)).save(tmp_path / "train" / "extra.png")
    with pytest.raises(DataError, match=r"1 image\(s\) have no row in train/metadata.jsonl \(first: train/extra.png\)"):
        load_dataset_from_config(str(tmp_path))


def test_imagefolder_root_metadata_over_split_folders(tmp_path):
    """One metadata.jsonl above train/ and test/: each split gets its own rows only; a row naming a
    file that does not exist is an image that fails to decode, named."""
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        _solid((1, 1, 1)).save(tmp_path / split / f"{split}.png")
    rows = ['{"file_name": "train/train.png", "text": "tr"}', '{"file_name": "test/test.png", "text": "te"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert [(r.image_id, r.references) for r in load_dataset_from_config(str(tmp_path))] == [("train/train", ["tr"])]
    assert [(r.image_id, r.references) for r in load_dataset_from_config(str(tmp_path), split="test")] == [
        ("test/test", ["te"])]
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows + ['{"file_name": "train/gone.png", "text": "x"}']) + "\n")
    with pytest.raises(DataError, match=r"cannot read image .*train/gone.png: FileNotFoundError"):
        load_dataset_from_config(str(tmp_path))


def test_imagefolder_metadata_csv_captions(tmp_path):
    for i in range(3):
        _solid((i, 0, 0)).save(tmp_path / f"im{i}.jpg")
    (tmp_path / "metadata.csv").write_text("file_name,caption\nim0.jpg,a red square\nim1.jpg,b\nim2.jpg,c\n")
    ds = load_dataset_from_config(str(tmp_path), limit=2)
    assert [(r.image_id, r.references) for r in ds] == [("im0", ["a red square"]), ("im1", ["b"])]


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "bomb"])
def test_bad_images_fail_naming_the_file_or_are_skipped_and_counted(tmp_path, caplog, kind):
    _solid((1, 2, 3)).save(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    if kind == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif kind == "truncated":
        _solid((4, 5, 6), size=(64, 64)).save(bad)
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        _bomb_png(bad)
    with pytest.raises(DataError, match=r"cannot read image .*bad.png: .*on_bad_image: skip"):
        load_dataset_from_config(str(tmp_path))
    with caplog.at_level("WARNING", logger="rl.data"):
        ds = load_dataset_from_config(str(tmp_path), on_bad_image="skip")
    assert [r.image_id for r in ds] == ["good"]
    assert "skipped 1 image(s)" in caplog.text and "bad.png" in caplog.text
    (tmp_path / "good.png").unlink()
    with pytest.raises(DataError, match="none of its 1 image"):
        load_dataset_from_config(str(tmp_path), on_bad_image="skip")


def test_folder_of_json_without_images_names_the_files(tmp_path):
    (tmp_path / "rows.json").write_text('[{"a": 1, "b": "x"}]')
    assert check_source(str(tmp_path)) == "dataset_files"
    with pytest.raises(DataError, match=r"no column image_column='image'; available columns: a, b \(read from rows.json"):
        load_dataset_from_config(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Through `python -m rl.train`: bad data is exit 2 naming it, before Ray starts
# ---------------------------------------------------------------------------------------------


def _bad_sources(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    _solid((1, 2, 3)).save(corrupt / "ok.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    _bomb_png(bomb / "huge.png")
    json_only = tmp_path / "json_only"
    json_only.mkdir()
    (json_only / "rows.json").write_text('[{"caption": "x"}]')
    return [  # (data.source, what the message must name)
        (str(corrupt), r"cannot read image .*corrupt/broken.png"),
        (str(bomb), r"cannot read image .*bomb/huge.png: DecompressionBombError"),
        (str(json_only), r"no column image_column='image'.*read from rows.json"),
        ("imags/", r"data source folder 'imags/' does not exist"),  # a typo'd relative path
        ("someone/no-such-dataset", r"cannot load dataset 'someone/no-such-dataset'.*no local folder.*HF_HUB_OFFLINE=1"),
        ("imags", r"cannot load dataset 'imags'.*no local folder 'imags' in "),  # a typo without a slash
    ]


def test_train_refuses_bad_data_with_exit_2_before_ray(tmp_path, monkeypatch, capsys):
    import ray

    from rl.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tiny = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
    for i, (source, message) in enumerate(_bad_sources(tmp_path)):
        out = tmp_path / f"run{i}"
        rc = main([str(tiny), "--output-dir", str(out), "--set", "pretrain.enabled=false",
                   "--set", "rewards.functions=[{name: clip}]", "--set", f"data.source={source}"])
        err = capsys.readouterr().err
        assert rc == 2, (source, err[-2000:])
        assert re.search(message, err), (source, err[-2000:])
        assert not ray.is_initialized() and not (out / "actors.json").exists()
