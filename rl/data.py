"""Image datasets for training: load once into memory, then iterate in resumable shuffled batches.

Sources (`load_dataset_from_config`):
- None: generate images with the recipe's `data.generator` (a `Generator`, named: `shapes` is the
  shapes world, rl/shapes/source.py; or any `module:function` returning one) from the `generate`
  kwargs. The embedded default recipe uses this, so a run needs no files.
- A local folder of images (.png .jpg .jpeg .webp .bmp, searched recursively), read through
  `datasets`' imagefolder builder: its splits (train/, test/, validation/ subfolders, or train-*,
  test-* file names; `split` picks one) and its `metadata.jsonl` / `metadata.csv` files (a
  `file_name` column, HF's convention; the shapes world's `save_shapes` writes one). Metadata columns
  become record data: `image_id`, `elements`, `captions` when present, the reference caption
  texts (`reference_column`, default `text` or `caption`) as `references`, and every other column
  in `columns` (passed to reward functions by name, as TRL passes dataset columns). Records are
  ordered by file path; an id is the path below the folder without its suffix.
- A folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
- A local folder of data files (parquet, arrow, csv, json) with an image column, read with
  `datasets.load_dataset(folder, split=split)`.
- A Hugging Face hub name ("owner/name"), read with `datasets.load_dataset` (offline: it must
  already be in the local cache when HF_HUB_OFFLINE=1).

A relative local path is relative to the current directory. Something that looks like a path
(starts with `.`, `~` or `/`, ends with `/`, has two slashes or a backslash, or names a folder that
exists below its first component) and is not there is refused as a missing folder at recipe load,
never tried as a Hub name; a Hub name is checked when loaded (a missing one, or one not in the local
cache when HF_HUB_OFFLINE=1, is a DataError naming it and the local folder it is not). Images that fail to
decode (corrupt, truncated, a header announcing a decompression bomb) are refused naming the file,
or with `on_bad_image="skip"` skipped, counted and logged.

Batching (`ImageDataset.batch_at`) is a pure function of a position counter (records consumed so
far), so a checkpoint stores one int and resumes on exactly the next batch:

    record at global position p = records[perm(seed, epoch=p // N)[p % N]]
"""
from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import logging

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
METADATA_FILES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv")  # imagefolder's (parquet too, unused here)
# A folder holding these (and no images) is passed to datasets.load_dataset as a local dataset.
DATA_FILE_EXTENSIONS: tuple[str, ...] = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
# save_to_disk writes these; their presence marks a folder as a saved datasets.Dataset(Dict).
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
DEFAULT_GENERATE: dict[str, Any] = {"n": 256, "seed": 0}


class DataError(ValueError):
    """A dataset source cannot be used; the message names the source and the field at fault."""


# ---------------------------------------------------------------------------------------------
# Generated worlds and per-caption metrics: the interface rl.eval and the models see
# ---------------------------------------------------------------------------------------------


class Generator(Protocol):
    """A generated image world (`data.generator`, used when data.source is null), e.g. the shapes
    world (rl/shapes/source.py). The trainer reaches it only through this interface."""

    vocabulary: Sequence[str]  # words of its captions: the tiny encoder's word-level tokenizer knows them

    def examples(self, n: int, seed: int, split: str = "train", **generate: Any) -> list:
        """`n` examples of `split` with `image` (PIL RGB), `image_id`, `elements`, `captions`
        (ground truth; `captions["full"]` the complete one); `generate`: data.generate's other kwargs."""

    def caption_metrics(self, captions: Sequence[str], examples: Sequence[Any]) -> list[dict[str, float]]:
        """Per-caption scores against the examples' ground truth (rl.eval's caption columns)."""


GENERATORS: dict[str, str] = {"shapes": "rl.shapes.source:ShapesWorld"}  # registered names -> module:factory


def load_generator(name: str, field: str = "data.generator") -> Generator:
    """The Generator a recipe names (registered name or `module:function` returning one); DataError
    naming `field` when it cannot be built."""
    from rl.named import UnknownName, resolve

    try:
        gen = resolve(name, GENERATORS, field)()
    except UnknownName as e:
        raise DataError(str(e)) from None
    missing = [a for a in ("vocabulary", "examples", "caption_metrics") if not hasattr(gen, a)]
    if missing:
        raise DataError(f"{field}: {name!r} returned {type(gen).__name__}, which lacks {', '.join(missing)} "
                        "(the rl.data.Generator interface)")
    return gen


def recipe_vocabulary(recipe) -> list[str]:
    """Extra words of the tiny encoder's tokenizer: the generated world's caption words
    (data.source null), none for other data (the prompt's words only)."""
    if recipe.data.source is not None:
        return []
    return list(load_generator(recipe.data.generator).vocabulary)


def caption_length(text: str) -> int:
    """Words in a caption, punctuation not counted ("A red circle." -> 3)."""
    return sum(1 for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()) if w[0].isalnum())


def caption_metrics(captions: Sequence[str], examples: Sequence[Any], generator: Generator | None = None
                    ) -> list[dict[str, float]]:
    """rl.eval's per-caption scores: a generated world's own (exact, against its ground truth), else,
    for any image set, the caption length in words."""
    if generator is not None:
        return generator.caption_metrics(captions, examples)
    return [{"caption_length": caption_length(c)} for c in captions]


@dataclass
class ImageRecord:
    """One training image. elements / captions are ground truth when the source has them; texts
    are the source's string columns by name; references the reference caption texts
    (`reference_column`); columns every column of the source but the image and those above."""

    image: Image.Image  # RGB
    image_id: str
    elements: dict | None = None
    captions: dict | None = None
    texts: dict[str, str] | None = None
    references: list[str] | None = None
    columns: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class ImageDataset(Sequence[ImageRecord]):
    """An in-memory list of ImageRecords with deterministic, resumable shuffled batching."""

    def __init__(self, records: list[ImageRecord], source: str = "memory"):
        if not records:
            raise DataError(f"dataset {source!r} is empty")
        self.records = list(records)
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):  # int -> ImageRecord, slice -> list[ImageRecord]
        return self.records[index]

    def __repr__(self) -> str:
        return f"ImageDataset(source={self.source!r}, n={len(self)})"

    def indices_at(self, position: int, batch_size: int, seed: int) -> list[int]:
        """Record indices of the batch starting at `position` (records consumed so far).

        Each epoch is a fresh permutation drawn from (seed, epoch); a batch may straddle two
        epochs, so every record is seen exactly once per epoch.
        """
        if position < 0 or batch_size < 1:
            raise ValueError(f"position={position} must be >= 0 and batch_size={batch_size} >= 1")
        n = len(self.records)
        return [int(_permutation(n, seed, p // n)[p % n])
                for p in range(position, position + batch_size)]

    def batch_at(self, position: int, batch_size: int, seed: int) -> list[ImageRecord]:
        """The batch starting at `position`; a pure function of its arguments."""
        return [self.records[i] for i in self.indices_at(position, batch_size, seed)]

    def batches(self, batch_size: int, seed: int, start: int = 0) -> BatchIterator:
        """Infinite iterator of batches starting at position `start`; see BatchIterator."""
        return BatchIterator(self, batch_size, seed, start)


class BatchIterator(Iterator[list[ImageRecord]]):
    """Infinite batches. `position` is the number of records consumed; save it in a checkpoint
    and resume with `dataset.batches(batch_size, seed, start=position)`."""

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, start: int = 0):
        self.dataset, self.batch_size, self.seed, self.position = dataset, batch_size, seed, start

    def __next__(self) -> list[ImageRecord]:
        batch = self.dataset.batch_at(self.position, self.batch_size, self.seed)
        self.position += self.batch_size
        return batch


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _is_path_like(source: str) -> bool:
    """A string that can only mean a local path (a hub name is "name" or "owner/name"): absolute,
    starting with `.` or `~`, ending with `/`, two slashes or a backslash, a file suffix of an image
    or data file, or "a/b" whose first part is a local folder (a typo below an existing folder)."""
    first = source.split("/", 1)[0]
    return (os.path.isabs(source) or source.startswith((".", "~")) or source.endswith("/")
            or source.count("/") > 1 or "\\" in source
            or Path(source).suffix.lower() in IMAGE_EXTENSIONS + DATA_FILE_EXTENSIONS
            or ("/" in source and Path(first).is_dir()))


def _iter_image_files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in _SAVED_DATASET_MARKERS)


def _no_images_message(folder: Path) -> str:
    return (f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            f"recursively); point `source` at a folder of images, a saved datasets folder, "
            f"or a hub dataset name")


def _saved_dataset_columns(folder: Path) -> dict[str, list[str]]:
    """{split: columns} read from save_to_disk's json files, without loading any data."""
    def columns(info_file: Path) -> list[str]:
        features = json.loads(info_file.read_text()).get("features") or {}
        return list(features)

    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        return {s: columns(folder / s / "dataset_info.json") for s in splits
                if (folder / s / "dataset_info.json").is_file()}
    if (folder / "dataset_info.json").is_file():
        return {"": columns(folder / "dataset_info.json")}
    return {}


def check_source(source: str | None, image_column: str = "image") -> str:
    """Cheap validation for recipe-validation time; reads no images and downloads nothing.

    Returns the kind of source: "generate", "folder", "saved_dataset", "dataset_files" (a local
    folder of parquet/arrow/csv/json files for datasets.load_dataset) or "hub".
    Raises DataError when the source cannot work.
    """
    if source is None:
        return "generate"
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"data source {source!r} is a file; expected a folder of images, "
                            f"a folder written by datasets' save_to_disk, or a hub dataset name")
        if _is_saved_dataset(path):
            for split, cols in _saved_dataset_columns(path).items():
                if cols and image_column not in cols:
                    where = f" (split {split!r})" if split else ""
                    raise DataError(f"dataset {source!r}{where} has no column "
                                    f"image_column={image_column!r}; available columns: "
                                    f"{', '.join(cols)}")
            return "saved_dataset"
        if any(True for _ in _iter_image_files(path)):
            return "folder"
        if any(p.suffix.lower() in DATA_FILE_EXTENSIONS and p.name not in METADATA_FILES
               for p in path.rglob("*") if p.is_file()):
            return "dataset_files"
        raise DataError(_no_images_message(path))
    if _is_path_like(source):
        raise DataError(f"data source folder {source!r} does not exist (relative to the current directory "
                        f"{os.getcwd()})")
    # A Hub name is accepted without a network call (recipes naming one validate offline); loading
    # it (rl.train's data setup, before Ray) names a missing or, offline, an uncached one.
    return "hub"


def _prepare(image: Image.Image, image_size: int | None) -> Image.Image:
    image = image.convert("RGB")
    if image_size is not None and image.size != (image_size, image_size):
        # A plain square resize: aspect ratio is not kept (the shapes world is square anyway).
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


# Everything PIL raises for a file it cannot (or refuses to) decode: truncated or corrupt data,
# an unknown format, and a header announcing more than 2 x Image.MAX_IMAGE_PIXELS pixels (a
# decompression bomb: refused before any pixel is allocated).
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, TypeError, EOFError,
                  Image.DecompressionBombError)


def _decode(value: Any) -> Image.Image:
    """A datasets image cell (PIL image, {"bytes", "path"} dict, path string or array) -> a fully
    decoded RGB image. Raises one of _DECODE_ERRORS."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (np.ndarray, list)):
        return Image.fromarray(np.asarray(value, dtype=np.uint8)).convert("RGB")
    if isinstance(value, Image.Image):
        value.load()
        return value.convert("RGB")
    if not isinstance(value, (str, io.BytesIO)):
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    with Image.open(value) as im:
        im.load()
        return im.convert("RGB")


def _cell_name(value: Any) -> str | None:
    """The file an image cell came from, when it says."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return value if isinstance(value, str) else None


def _imagefolder_files(folder: Path) -> dict[str, list[str]]:
    """data_files per split for datasets' imagefolder builder: its own split inference (train/,
    test/ ... folders, or train-*, test-* file names), plus the metadata.jsonl / metadata.csv files
    in the folder of a split's image or above it that the inference left out (a root metadata.jsonl
    beside `train-*.png` files matches no split pattern, and datasets would silently drop it)."""
    import datasets

    builder = datasets.load_dataset_builder("imagefolder", data_dir=str(folder))
    files = {str(split): [str(f) for f in fs] for split, fs in (builder.config.data_files or {}).items()}
    metadata = [p for name in METADATA_FILES for p in folder.rglob(name)]
    for split, fs in files.items():
        dirs = {d for f in fs for d in Path(f).parents if d == folder or folder in d.parents}
        fs += [str(m) for m in metadata if m.parent in dirs and str(m) not in fs]
    return files


def _load_folder(folder: Path, *, split: str, cache_dir: str | None) -> Any:
    """The `split` of an image folder as a datasets.Dataset, through datasets' imagefolder builder
    (splits, metadata.jsonl / metadata.csv columns). Every image file of the split must have a
    metadata row when the split has metadata: datasets would drop the others silently."""
    import datasets

    files = _imagefolder_files(folder)
    if split not in files:
        raise DataError(f"image folder {str(folder)!r} has no split {split!r}; available splits: {', '.join(files)} "
                        f"(datasets' imagefolder: train/, test/, validation/ subfolders or train-*, test-* file "
                        f"names; set data.split)")
    try:
        ds = datasets.load_dataset("imagefolder", data_files={split: files[split]}, split=split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (bad metadata, mixed formats)
        raise DataError(f"cannot read image folder {str(folder)!r} split {split!r}: {type(e).__name__}: {e}") from e
    images = {str(Path(f).resolve()) for f in files[split] if Path(f).suffix.lower() in IMAGE_EXTENSIONS}
    paths = [str(Path(c["path"]).resolve()) if c and c.get("path") else None
             for c in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    # A metadata file above the split folders lists every split's files: keep this split's rows (and
    # rows naming no existing file, so that decoding names them), drop the other splits' images.
    keep = [i for i, p in enumerate(paths) if p is None or p in images or not os.path.isfile(p)]
    if len(keep) < len(paths):
        ds = ds.select(keep)
    missing = sorted(images - set(paths))
    if missing:
        meta = [f for f in files[split] if Path(f).name in METADATA_FILES]
        raise DataError(f"image folder {str(folder)!r} split {split!r}: {len(missing)} image(s) have no row in "
                        f"{', '.join(os.path.relpath(m, folder) for m in meta)} (first: "
                        f"{os.path.relpath(missing[0], folder)}); add a row with its file_name, or move the file out")
    return ds


def _open_hf(source: str, *, split: str, cache_dir: str | None) -> Any:
    """A saved-to-disk dataset, a folder of data files or a Hub dataset, as one datasets.Dataset."""
    import datasets  # imported here: it is slow to import

    path = Path(source).expanduser()
    try:
        if path.is_dir() and _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types; all mean "cannot use this source"
        offline = " (HF_HUB_OFFLINE=1: a Hub dataset must already be in the local cache)" \
            if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        where = "" if path.exists() else f" (no local folder {source!r} in {os.getcwd()}, so it was read as a Hub name)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"cannot load dataset {source!r} split {split!r}{where}{offline}: {type(e).__name__}: "
                        f"{first}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {source!r} has no split {split!r}; available splits: "
                            f"{', '.join(ds)}")
        ds = ds[split]
    return ds


def _records(ds: Any, source: str, *, root: Path | None, image_column: str, reference_column: str | None,
             limit: int | None, image_size: int | None, on_bad_image: str,
             data_dir: Path | None = None) -> list[ImageRecord]:
    """ImageRecords from a datasets.Dataset: images decoded here (one place for every decode
    failure: refused, or skipped and counted, per `on_bad_image`), `image_id`, `elements` and
    `captions` columns read when present, the reference texts from `reference_column` (None: `text`
    or `caption`, imagefolder's caption columns), every other column kept in `columns`. Rows of a
    folder (`root`) are ordered by their file's path below it, ids are that path without suffix."""
    import datasets

    if image_column not in ds.column_names:
        files = ""
        if data_dir is not None:
            data = sorted(p.name for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in DATA_FILE_EXTENSIONS)
            files = f" (read from {', '.join(data[:5])}{', ...' if len(data) > 5 else ''}; no image files in the folder)"
        raise DataError(f"dataset {source!r} has no column image_column={image_column!r}; "
                        f"available columns: {', '.join(ds.column_names)}{files}")
    if len(ds) == 0:
        raise DataError(f"dataset {source!r} is empty")
    if reference_column is not None and reference_column not in ds.column_names:
        raise DataError(f"dataset {source!r} has no column data.reference_column={reference_column!r}; "
                        f"available columns: {', '.join(ds.column_names)}")
    ref_col = reference_column or next((c for c in ("text", "caption") if c in ds.column_names), None)
    if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decoded below, failures counted
    cells = ds[image_column]
    order = list(range(len(ds)))
    if root is not None:
        rel = [os.path.relpath(_cell_name(c) or "", root) for c in cells]
        order.sort(key=lambda i: Path(rel[i]).as_posix())
    name = root.name if root is not None else Path(source).name if Path(source).expanduser().exists() \
        else source.replace("/", "_")
    records, skipped = [], []
    for i in order:
        if limit is not None and len(records) == limit:
            break
        row = ds[i]
        file = _cell_name(cells[i])
        where = f"{file}" if file and root is not None else f"{source!r} row {i} column {image_column!r}" + (
            f" ({file})" if file else "")
        try:
            image = _prepare(_decode(cells[i]), image_size)
        except _DECODE_ERRORS as e:
            if on_bad_image != "skip":
                raise DataError(f"cannot read image {where}: {type(e).__name__}: {e} (data.on_bad_image: skip "
                                f"skips such images)") from e
            skipped.append(f"{where} ({type(e).__name__}: {e})")
            continue
        if row.get("image_id") is not None:
            image_id = str(row["image_id"])
        elif root is not None and file:
            image_id = Path(os.path.relpath(file, root)).with_suffix("").as_posix()
        else:
            image_id = f"{name}-{i:06d}"
        refs = row.get(ref_col) if ref_col else None
        columns = {k: v for k, v in row.items() if k not in (image_column, "image_id", "elements", "captions")}
        records.append(ImageRecord(
            image=image, image_id=image_id,
            elements=row.get("elements") if isinstance(row.get("elements"), dict) else None,
            captions=row.get("captions") if isinstance(row.get("captions"), dict) else None,
            texts={k: v for k, v in columns.items() if isinstance(v, str)} or None,
            references=[refs] if isinstance(refs, str) else list(refs) if refs else None,
            columns=columns,
        ))
    if skipped:
        logger.warning("data: skipped %d image(s) of %r that failed to decode (data.on_bad_image: skip); "
                       "first: %s", len(skipped), source, skipped[0])
    if not records:
        raise DataError(f"dataset {source!r}: none of its {len(skipped)} image(s) could be decoded; first: "
                        f"{skipped[0]}")
    return records


def load_dataset_from_config(
    source: str | None,
    *,
    image_column: str = "image",
    split: str = "train",
    limit: int | None = None,
    image_size: int | None = None,
    generate: dict | None = None,
    cache_dir: str | None = None,
    reference_column: str | None = None,
    on_bad_image: str = "fail",
    generator: str = "shapes",
) -> ImageDataset:
    """Load every image of `source` into memory as RGB (see the module docstring for sources).

    limit: keep the first `limit` records (folders: by sorted path) before decoding the rest.
    image_size: square side to resize to with bicubic filtering; None keeps the original size.
    generate: kwargs of the generator's `examples` when source is None (default DEFAULT_GENERATE;
        `split` is used unless generate names one).
    generator: the `data.generator` name used when source is None (load_generator).
    reference_column: the column of reference caption texts (None: `text` or `caption` if present).
    on_bad_image: "fail" (an image that does not decode is a DataError naming it) or "skip"
        (skipped, counted and logged).
    """
    if on_bad_image not in ("fail", "skip"):
        raise DataError(f"on_bad_image={on_bad_image!r}; must be 'fail' or 'skip'")
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}; must be >= 1 or None")
    if source is None:
        world = load_generator(generator)
        kwargs = {**DEFAULT_GENERATE, "split": split, **(generate or {})}
        if limit is not None:
            kwargs["n"] = min(kwargs["n"], limit)
        try:
            examples = world.examples(**kwargs)
        except (TypeError, ValueError) as e:
            raise DataError(f"data.generator {generator!r}: cannot generate with generate={generate!r}: {e}") from e
        records = [ImageRecord(_prepare(ex.image, image_size), ex.image_id, ex.elements,
                               ex.captions) for ex in examples]
        return ImageDataset(records, source=generator)

    kind = check_source(source, image_column)
    path = Path(source).expanduser()
    if kind == "folder":
        ds, root, column = _load_folder(path, split=split, cache_dir=cache_dir), path, "image"
    else:
        ds, root, column = _open_hf(source, split=split, cache_dir=cache_dir), None, image_column
    records = _records(ds, source, root=root, image_column=column, reference_column=reference_column,
                       limit=limit, image_size=image_size, on_bad_image=on_bad_image,
                       data_dir=path if kind == "dataset_files" else None)
    return ImageDataset(records, source=source)
