"""Folder writes that are all or nothing: `target` is only ever the complete old or the complete new folder.

Between the two renames `target` is briefly absent (the old folder is at `target.old`); it is never half
written.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_dir_atomically(write: Callable[[Path], None], target: Path) -> None:
    """Call `write(staging)` to fill a fresh folder, then swap it in for `target` by renames."""
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    write(staging)
    previous = target.with_name(target.name + ".old")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    if previous.exists():
        shutil.rmtree(previous)


def write_text_atomically(target: Path, text: str) -> None:
    """Write a file under a temporary name, then rename it over `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique staging name: two processes writing the same file (a server and a benchmark) never collide.
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(target)
