"""Writes that are all or nothing: a file or folder is only ever the complete old or the complete new one.

Everything is written under a unique temporary name beside its target and renamed into place, so a crash
leaves at most a `.NAME.<random>.tmp` leftover, and two processes writing the same target (a server and a
benchmark) never write into each other's staging copy.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _beside(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.{suffix}")


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` to write; it replaces `target` when the block ends without an error
    and is removed when it does not."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _beside(target, "tmp")
    try:
        yield staging
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(target: Path, text: str) -> None:
    with atomic_file(target) as staging:
        staging.write_text(text, encoding="utf-8")


def create_once(target: Path, text: str, mode: int = 0o600) -> bool:
    """Write `target` whole unless it already exists; True when this call made it.

    Of processes racing to make it exactly one does, and none ever reads it half-written: the text is written
    beside it and hard-linked into place, which fails when the target is already there.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _beside(target, "tmp")
    try:
        staging.touch(mode=mode)
        staging.write_text(text, encoding="utf-8")
        os.link(staging, target)
    except FileExistsError:
        return False
    finally:
        staging.unlink(missing_ok=True)
    return True


def write_dir_atomically(write: Callable[[Path], None], target: Path) -> None:
    """Call `write(staging)` to fill a fresh folder, then swap it in for `target` by renames.

    Between the two renames `target` is briefly absent (the old folder is beside it under a `.old` name); it
    is never half written.
    """
    staging, previous = _beside(target, "tmp"), _beside(target, "old")
    try:
        write(staging)
        if target.exists():
            target.rename(previous)
        staging.rename(target)
    finally:
        for leftover in (staging, previous):
            shutil.rmtree(leftover, ignore_errors=True)


def fsync_directory(folder: Path) -> None:
    """Make a folder's entries (a file created or renamed in it) survive a power cut."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(root: Path) -> None:
    """Make every file and folder under `root` survive a power cut (before a database row points at them)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(folder))
