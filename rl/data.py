"""Image datasets for training: load once into memory, then iterate in resumable shuffled batches.

Sources (`load_dataset_from_config`):
- None: generate a shapes world (rl/shapes.py) from the `generate` kwargs. The embedded default
  recipe uses this, so a run needs no files.
- A local folder of images (.png .jpg .jpeg .webp .bmp, searched recursively, sorted by path).
  A `metadata.jsonl` at its root (as written by `rl.shapes.save_shapes`, `file_name` keyed like
  HF imagefolder) supplies `elements` and `captions`.
- A folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
- A local folder of data files (parquet, arrow, csv, json) with an image column, read with
  `datasets.load_dataset(folder, split=split)`.
- A Hugging Face hub name ("owner/name"), read with `datasets.load_dataset` (offline: it must
  already be in the local cache when HF_HUB_OFFLINE=1).

Batching (`ImageDataset.batch_at`) is a pure function of a position counter (records consumed so
far), so a checkpoint stores one int and resumes on exactly the next batch:

    record at global position p = records[perm(seed, epoch=p // N)[p % N]]
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
# A folder holding these (and no images) is passed to datasets.load_dataset as a local dataset.
DATA_FILE_EXTENSIONS: tuple[str, ...] = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
# save_to_disk writes these; their presence marks a folder as a saved datasets.Dataset(Dict).
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
DEFAULT_GENERATE: dict[str, Any] = {"n": 256, "seed": 0}


class DataError(ValueError):
    """A dataset source cannot be used; the message names the source and the field at fault."""


@dataclass
class ImageRecord:
    """One training image. elements / captions are ground truth when the source has them."""

    image: Image.Image  # RGB
    image_id: str
    elements: dict | None = None
    captions: dict | None = None
    texts: dict | None = None  # the source's string columns (metadata.jsonl fields), by name: `text_columns`


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
    """A string that can only mean a local path (a hub name is "name" or "owner/name")."""
    return (os.path.isabs(source) or source.startswith((".", "~"))
            or source.count("/") > 1 or "\\" in source)


def _iter_image_files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _image_files(folder: Path) -> list[Path]:
    return sorted(_iter_image_files(folder), key=lambda p: p.relative_to(folder).as_posix())


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
        if any(p.suffix.lower() in DATA_FILE_EXTENSIONS and p.name != METADATA_FILE
               for p in path.rglob("*") if p.is_file()):
            return "dataset_files"
        raise DataError(_no_images_message(path))
    if _is_path_like(source):
        raise DataError(f"data source folder {source!r} does not exist")
    return "hub"  # a hub name: accepted without a network call


def _prepare(image: Image.Image, image_size: int | None) -> Image.Image:
    image = image.convert("RGB")
    if image_size is not None and image.size != (image_size, image_size):
        # A plain square resize: aspect ratio is not kept (the shapes world is square anyway).
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image file {path}: {e}") from e


def _read_metadata(folder: Path) -> dict[str, dict]:
    """file_name (relative posix path) -> metadata row, from metadata.jsonl if present."""
    meta_file = folder / METADATA_FILE
    if not meta_file.is_file():
        return {}
    rows = {}
    with open(meta_file) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{meta_file} line {line_no} is not JSON: {e}") from e
            if "file_name" not in row:
                raise DataError(f"{meta_file} line {line_no} has no 'file_name' field")
            rows[Path(row["file_name"]).as_posix()] = row
    return rows


def text_columns(row: dict) -> dict | None:
    """A row's string fields (text columns such as `text` or `caption`) but the file name and id, which
    `rewards.judge.references: column | extract` read as `record.texts[column]`. (Issue 17, warm branch:
    a small, separate addition; the loader itself belongs to the data work.)"""
    out = {k: v for k, v in row.items() if isinstance(v, str) and k not in ("file_name", "image_id")}
    return out or None


def _load_folder(folder: Path, limit: int | None, image_size: int | None) -> list[ImageRecord]:
    files = _image_files(folder)
    if not files:
        raise DataError(_no_images_message(folder))
    if limit is not None:
        files = files[:limit]
    metadata = _read_metadata(folder)
    records = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        row = metadata.get(rel, {})
        records.append(ImageRecord(
            image=_prepare(_open_image(path), image_size),
            image_id=row.get("image_id", rel.rsplit(".", 1)[0]),
            elements=row.get("elements"),
            captions=row.get("captions"),
            texts=text_columns(row),
        ))
    return records


def _to_pil(value: Any, where: str) -> Image.Image:
    """A datasets image cell (PIL image, {"bytes", "path"} dict, path string or array) -> PIL."""
    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return Image.open(io.BytesIO(value["bytes"]))
            if value.get("path"):
                return Image.open(value["path"])
        if isinstance(value, str):
            return Image.open(value)
        if isinstance(value, (np.ndarray, list)):
            return Image.fromarray(np.asarray(value, dtype=np.uint8))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, TypeError) as e:
        raise DataError(f"cannot read image at {where}: {e}") from e
    raise DataError(f"cannot read image at {where}: unsupported value of type "
                    f"{type(value).__name__}")


def _load_hf(source: str, *, image_column: str, split: str, limit: int | None,
             image_size: int | None, cache_dir: str | None) -> list[ImageRecord]:
    import datasets  # imported here: it is slow to import and not needed for folders

    path = Path(source).expanduser()
    try:
        if path.is_dir() and _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types; all mean "cannot use this source"
        offline = " (HF_HUB_OFFLINE is set: the dataset must already be in the local cache)" \
            if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise DataError(f"cannot load dataset {source!r} split {split!r}{offline}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {source!r} has no split {split!r}; available splits: "
                            f"{', '.join(ds)}")
        ds = ds[split]
    if image_column not in ds.column_names:
        raise DataError(f"dataset {source!r} has no column image_column={image_column!r}; "
                        f"available columns: {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise DataError(f"dataset {source!r} split {split!r} is empty")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    name = path.name if path.exists() else source.replace("/", "_")
    records = []
    for i, row in enumerate(ds):
        where = f"{source!r} row {i} column {image_column!r}"
        try:
            image = _prepare(_to_pil(row[image_column], where), image_size)
        except DataError:
            raise
        except (OSError, ValueError) as e:  # lazily decoded images fail on convert()
            raise DataError(f"cannot read image at {where}: {e}") from e
        image_id = row.get("image_id")
        records.append(ImageRecord(
            image=image,
            image_id=str(image_id) if image_id is not None else f"{name}-{i:06d}",
            elements=row.get("elements") if isinstance(row.get("elements"), dict) else None,
            captions=row.get("captions") if isinstance(row.get("captions"), dict) else None,
            texts=text_columns({k: v for k, v in row.items() if k != image_column}),
        ))
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
) -> ImageDataset:
    """Load every image of `source` into memory as RGB (see the module docstring for sources).

    limit: keep the first `limit` records (folders: by sorted path) before decoding the rest.
    image_size: square side to resize to with bicubic filtering; None keeps the original size.
    generate: kwargs of rl.shapes.generate_shapes when source is None (default
        DEFAULT_GENERATE; `split` is used unless generate names one).
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}; must be >= 1 or None")
    if source is None:
        from rl.shapes import generate_shapes

        kwargs = {**DEFAULT_GENERATE, "split": split, **(generate or {})}
        if limit is not None:
            kwargs["n"] = min(kwargs["n"], limit)
        try:
            examples = generate_shapes(**kwargs)
        except (TypeError, ValueError) as e:
            raise DataError(f"cannot generate shapes with generate={generate!r}: {e}") from e
        records = [ImageRecord(_prepare(ex.image, image_size), ex.image_id, ex.elements,
                               ex.captions) for ex in examples]
        return ImageDataset(records, source="shapes")

    kind = check_source(source, image_column)
    if kind == "folder":
        records = _load_folder(Path(source).expanduser(), limit, image_size)
    else:
        records = _load_hf(source, image_column=image_column, split=split, limit=limit,
                           image_size=image_size, cache_dir=cache_dir)
    return ImageDataset(records, source=source)
