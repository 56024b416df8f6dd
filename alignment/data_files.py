"""Reading a dataset source into named tables: local files (JSONL / JSON / parquet / CSV), `save_to_disk`
directories or hub ids, all through `datasets`, and typed column reads whose errors name the file and row.

`alignment.adapters` turns the tables into records, one function per dataset.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.records import RecordError


@dataclass(frozen=True)
class Part:
    """One loaded table: one local file, or one split of a hub / `save_to_disk` dataset."""

    split: str  # "train" / "validation" / "test"
    where: str  # what errors name: the file path, or "hub-id[split]"
    rows: Any  # datasets.Dataset


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# File-name words that name a split, as in the hub's conventions (train-00000-of-00001.parquet).
_SPLIT_WORDS = {"train": "train", "test": "test", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation"}


def load_parts(source: str, config: str | None = None) -> list[Part]:
    """Load `source` (local file, local directory, `save_to_disk` directory, or hub id) into Parts,
    ordered train, validation, test, so the records come out the same whatever form the source has.

    config: the table to read, for datasets published as several (PRISM's "survey" and
    "conversations"): the hub config name, or for a local directory the file stem (`survey.jsonl`)
    or a subfolder (`survey/train/0000.parquet`, the hub's parquet export).
    """
    order = {"train": 0, "validation": 1, "test": 2}
    return sorted(_load(source, config), key=lambda p: (order.get(p.split, 3), p.split, p.where))


def _load(source: str, config: str | None) -> list[Part]:
    import datasets  # ~1.3 s; imported only when an adapter runs

    path = Path(source)
    if path.is_file():
        if config is not None:
            raise RecordError(f"{source}: expected a directory holding the '{config}' table, got a file")
        return [Part(_split_of(path), str(path), read_file(path))]
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _parts_of(datasets.load_from_disk(str(path)), str(path))
        return [Part(_split_of(f), str(f), read_file(f)) for f in _data_files(path, config)]
    try:
        loaded = datasets.load_dataset(source, config)
    except Exception as e:  # offline, unknown id, bad config: all one line for the user
        raise RecordError(f"{source}: not a local path, and the hub could not load it ({_one_line(e)})") from None
    return _parts_of(loaded, source)


def read_file(path: Path):
    """One local file -> datasets.Dataset, through the builder its extension names."""
    import datasets

    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise RecordError(f"{path}: unsupported file type (use {', '.join(_BUILDERS)})")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        raise RecordError(f"{path}: cannot be read as {builder} ({_one_line(e)})") from None


def _data_files(directory: Path, config: str | None) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.suffix in _BUILDERS and p.is_file())
    files = [p for p in files if not any(s.startswith(".") for s in p.relative_to(directory).parts)]
    if config is not None:
        files = [p for p in files if p.stem == config or config in p.relative_to(directory).parts[:-1]]
    if not files:
        table = f"'{config}' " if config else ""
        raise RecordError(f"{directory}: no {table}data files ({', '.join(_BUILDERS)})")
    return files


def _parts_of(loaded, name: str) -> list[Part]:
    """A Dataset or DatasetDict -> Parts named `name[split]`."""
    if hasattr(loaded, "items"):
        return [Part(split, f"{name}[{split}]", ds) for split, ds in loaded.items()]
    return [Part("train", name, loaded)]


def _split_of(path: Path) -> str:
    """The split a file holds: a split word in its name (train-00000-of-00001.parquet), or its folder
    named after one (the hub's parquet export, default/train/0000.parquet); "train" when neither."""
    words = [*re.split(r"[^a-z]+", path.stem.lower()), path.parent.name.lower()]
    return next((_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS), "train")


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# Row access with one-line errors.

_KINDS = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,), "list": (list,),
          "id": (str, int)}


def require_columns(part: Part, columns: list[str]) -> None:
    present = part.rows.column_names
    for column in columns:
        if column not in present:
            shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
            raise RecordError(f"{part.where}: missing column {column!r} (has: {shown})")


def read_column(row: dict, key: str, kind: str, where: str, required: bool = False, label: str | None = None) -> Any:
    """row[key] checked against `kind`; None for a missing value (null / NaN) unless `required`."""
    value = row.get(key)
    if isinstance(value, float) and math.isnan(value):
        value = None
    name = label or f"column {key!r}"
    if value is None and not required:
        return None
    # bool is an int subclass: a True label or score is a bug in the data, not 1.
    if not isinstance(value, _KINDS[kind]) or (isinstance(value, bool) and kind != "boolean"):
        article = "an" if kind[0] in "aeiou" else "a"
        got = "None" if value is None else type(value).__name__
        raise RecordError(f"{where}: {name} must be {article} {kind}, got {got}")
    return value
