"""Artifacts that one stage builds for others, built once per config and shared by every process.

    world_dir = cached_artifact("world", world_cfg, lambda out: build_world(world_cfg, out))

returns `runs/cache/world-<config_hash(world_cfg)>/`. The first caller builds it; later callers (and
parallel ones, e.g. the cells of a sweep) reuse it. A build runs under a file lock
(`runs/cache/world-<hash>.lock`) in a temporary sibling directory, which receives `config.yaml` (the
resolved config) and the `DONE` marker and is then renamed into place, so a reader either sees no
directory or a complete one. A build that raises leaves nothing behind; one that is killed leaves its
temporary directory, which the next build of the same artifact removes.

Delete a cache directory to force a rebuild; the code that builds an artifact is not part of the key,
so after changing it, delete the stale `runs/cache/<kind>-*` by hand.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from alignment.config import config_hash, save_config

log = logging.getLogger(__name__)

MARKER = "DONE"
RESERVED = ("config.yaml", MARKER)  # written by cached_artifact itself


def artifact_dir(kind: str, cfg: Any, *, runs_dir: str | os.PathLike = "runs") -> Path:
    """Where `cached_artifact(kind, cfg, ...)` puts its artifact: `runs_dir/cache/<kind>-<config_hash(cfg)>`.

    The cache directory is resolved through symlinks: a sweep links `runs/<sweep>/cache` to `runs/cache`, and the
    paths of artifacts enter the keys of the artifacts built from them (the discriminators' `policy` and `data`), so
    both spellings must name the same directory, or the sweep would rebuild what the main job cached."""
    return (Path(runs_dir) / "cache").resolve() / f"{kind}-{config_hash(cfg)}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def cached_artifact(
    kind: str, cfg: Any, build: Callable[[Path], None], *, runs_dir: str | os.PathLike = "runs"
) -> Path:
    """The complete artifact directory for (`kind`, `cfg`), calling `build(tmp_dir)` first if there is none.

    `build` writes its files into the directory it is given; it must not write `config.yaml` or `DONE`.
    """
    target = artifact_dir(kind, cfg, runs_dir=runs_dir)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to build %s", target)
        lock.acquire()
    try:
        if is_complete(target):  # built by whoever held the lock before us
            return target
        if target.exists():  # a directory without marker: never made by us; do not build over it silently
            raise FileExistsError(f"{target} exists but has no {MARKER} marker; delete it to rebuild")
        _build_into(target, cfg, build)
    finally:
        lock.release()
    return target


def _build_into(target: Path, cfg: Any, build: Callable[[Path], None]) -> None:
    # Under the lock no one else is building this artifact: a temporary directory left beside it is the remains of
    # a build that was killed (SIGKILL leaves no chance to clean up), and would otherwise stay on disk forever.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        log.info("removing %s, left by a build that did not finish", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log.info("building %s", target)
        build(tmp)
        written = [name for name in RESERVED if (tmp / name).exists()]
        if written:
            raise ValueError(f"build for {target.name} wrote {written}; those names are reserved for the cache")
        save_config(cfg, tmp / "config.yaml")
        (tmp / MARKER).write_text("complete\n")
        os.replace(tmp, target)  # target does not exist (checked under the lock), so the rename is atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
