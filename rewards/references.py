"""Reference elements for the judged caption reward, attached to every training image before a run.

ReaDe's reward (rewards/judge.py, eq. 3-4) scores a caption by the share of an image's reference
elements it supports, grouped as U / S / Z ({"user", "detail", "supplementary"}). Where they come
from is `rewards.judge.references` (rl/config.py JudgeConfig):

- `elements`: the dataset's own (the shapes world's ground truth; a folder's metadata.jsonl
  `elements`; a `datasets` column `elements`);
- `column`: a text column holding the elements (`parse_element_text`);
- `extract`: a text column holding a reference caption, from which the judge extracts the elements
  (ReaDe appendix D.2; `rewards.judge.extract_elements`), cached per image on disk.

`attach_references` runs in the driver before Ray starts: an image without references is refused
there (`ReferencesError`, naming the field and the image), never scored as a silent NaN, and an
unreachable judge endpoint ends the run before anything trains.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from rewards.judge import GROUPS, JudgeError, check_endpoint, extract_elements


class ReferencesError(ValueError):
    """A judge reward without usable references, or an unreachable judge: the message names the field."""


def parse_element_text(text: Any) -> dict[str, list[str]]:
    """A text column's elements: a JSON object of the groups (`user`, `detail`, `supplementary`), a
    JSON list (all `detail`), or plain text with one element per line or per `;` (all `detail`)."""
    if isinstance(text, dict):
        value: Any = text
    else:
        text = str(text or "").strip()
        try:
            value = json.loads(text) if text[:1] in "[{" and text else None
        except ValueError:
            value = None
        if value is None:
            parts = [p.strip(" -*\t") for line in text.splitlines() for p in line.split(";")]
            return {"user": [], "detail": [p for p in parts if p], "supplementary": []}
    if isinstance(value, list):
        return {"user": [], "detail": [str(v).strip() for v in value if str(v).strip()], "supplementary": []}
    unknown = set(value) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown element group(s) {sorted(unknown)}; allowed: {', '.join(GROUPS)}")
    return {g: [str(v).strip() for v in value.get(g) or [] if str(v).strip()] for g in GROUPS}


def _column_text(record, column: str) -> Any:
    """The text column `column` of a record: `record.texts[column]` (rl/data.py: a source's string
    columns), else `record.captions[column]` (the shapes world's `short` / `medium` / `full`), or None."""
    texts = getattr(record, "texts", None) or {}
    return texts[column] if column in texts else (record.captions or {}).get(column)


class ElementCache:
    """One JSON per image ({"image_id", "text_sha", "elements"}) in `folder`; an entry whose reference
    text changed since is extracted again. Written to a temporary name, then renamed."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, image_id: str) -> Path:
        return self.folder / f"{hashlib.sha1(image_id.encode()).hexdigest()[:20]}.json"

    def get(self, image_id: str, text: str) -> dict | None:
        path = self._path(image_id)
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        ok = row.get("image_id") == image_id and row.get("text_sha") == _sha(text)
        return row["elements"] if ok else None

    def put(self, image_id: str, text: str, elements: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(image_id)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"image_id": image_id, "text_sha": _sha(text), "elements": elements}))
        os.replace(tmp, path)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def element_cache_dir(recipe) -> Path:
    """`<rewards.judge.cache_dir or output.dir/cache>/judge-elements-<key>`, key over the judge and column."""
    j = recipe.rewards.judge
    key = hashlib.sha256(json.dumps(j.key(), sort_keys=True).encode()).hexdigest()[:12]
    root = j.cache_dir or os.path.join(recipe.output.dir, "cache")
    return Path(root).expanduser() / f"judge-elements-{key}"


def attach_references(recipe, records: Sequence[Any], batch: int = 64) -> dict[str, Any]:
    """Set `record.elements` of every record from `rewards.judge.references`; {} when no judge reward
    is named. Returns what was done (for the log). Raises ReferencesError."""
    rewards = recipe.rewards
    mode = rewards.reference_source(recipe.data.source)
    if mode is None:
        return {}
    j = rewards.judge
    judge = None
    if any(f.name == "judge" for f in rewards.functions) and j.backend == "http":
        try:
            check_endpoint(j.base_url, os.environ.get(j.api_key_env), timeout=min(10.0, j.timeout))
        except JudgeError as e:
            raise ReferencesError(f"rewards.judge.base_url: {e}") from None
    if mode == "elements":
        for r in records:
            if not r.elements or not any(r.elements.get(g) for g in GROUPS):
                raise ReferencesError(
                    f"rewards.judge.references: elements: image {r.image_id!r} of data.source "
                    f"{recipe.data.source!r} has no reference elements; give every image `elements` (metadata.jsonl) "
                    "or set references: column / extract with rewards.judge.column")
        return {"references": "elements", "images": len(records)}
    column = j.column
    texts = []
    for r in records:
        text = _column_text(r, column)
        if text is None or not str(text).strip():
            have = sorted({**(r.captions or {}), **(getattr(r, "texts", None) or {})})
            raise ReferencesError(f"rewards.judge.column: image {r.image_id!r} has no text in column {column!r} "
                                  f"(its text columns: {have or 'none'})")
        texts.append(text)
    if mode == "column":
        for r, text in zip(records, texts):
            try:
                r.elements = parse_element_text(text)
            except ValueError as e:
                raise ReferencesError(f"rewards.judge.column: image {r.image_id!r}, column {column!r}: {e}") from None
            if not any(r.elements.values()):
                raise ReferencesError(f"rewards.judge.column: image {r.image_id!r}: no elements in column {column!r}")
        return {"references": f"column {column}", "images": len(records)}
    # extract: by the judge, cached per image
    from rewards.judge import judge_from_config

    cache = ElementCache(element_cache_dir(recipe))
    texts = [str(t) for t in texts]
    todo = [k for k, (r, t) in enumerate(zip(records, texts)) if cache.get(r.image_id, t) is None]
    if todo:
        judge = judge_from_config(j).backend
        for lo in range(0, len(todo), batch):
            chunk = todo[lo: lo + batch]
            try:
                found = extract_elements(judge, [texts[k] for k in chunk])
            except JudgeError as e:
                raise ReferencesError(f"rewards.judge: element extraction failed: {e}") from None
            for k, elements in zip(chunk, found):
                cache.put(records[k].image_id, texts[k], elements)
    for r, t in zip(records, texts):
        r.elements = cache.get(r.image_id, t)
        if not any(r.elements.values()):
            raise ReferencesError(f"rewards.judge.references: extract: the judge found no element in image "
                                  f"{r.image_id!r}'s column {column!r}: {t[:120]!r}")
    return {"references": f"extracted from column {column}", "images": len(records), "extracted_now": len(todo),
            "cache": str(cache.folder)}
