"""Crash-safe file writes: a temp file in the same directory, flush + fsync, then `os.replace`.

`os.replace` is atomic on POSIX and Windows when both paths are on one filesystem, which a sibling temp file
guarantees; a crash at any point leaves either the old file or the new one, never half of one. Every file a run
writes goes through here (`alignment.runs`, `alignment.cache`, the config writer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike, mode: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: without it a power cut can forget the new directory entry (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with _atomic_open(path, "w") as f:
        f.write(text)


def json_digest(obj: Any) -> str:
    """16 hex digits of sha256 over `obj` as canonical JSON: a fingerprint of data a cached file was computed from."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON, atomically; streamed, so a serializer error mid-way leaves the old file."""
    with _atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def atomic_replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing any old `dst`.

    A rename cannot replace a non-empty directory, so an old `dst` is first renamed aside; between the
    two renames `dst` is briefly absent (never half-written), and a crash there leaves `.old-*` behind.
    """
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
