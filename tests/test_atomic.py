"""All-or-nothing writes: a failure mid-write leaves the old content and no leftover; a success replaces it."""

from __future__ import annotations

import pytest

from tuneloop.atomic import atomic_file, write_dir_atomically, write_text_atomically


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "deep" / "cache.json"
    write_text_atomically(target, "old")
    with pytest.raises(RuntimeError), atomic_file(target) as staging:
        staging.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    write_text_atomically(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["cache.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"

    def write(version: str, fail: bool = False):
        def fill(staging):
            staging.mkdir()
            (staging / "weights").write_text(version)
            if fail:
                raise OSError("disk full")

        return fill

    write_dir_atomically(write("v1"), target)
    with pytest.raises(OSError):
        write_dir_atomically(write("v2", fail=True), target)
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no half-written staging folder left behind
    write_dir_atomically(write("v3"), target)
    assert (target / "weights").read_text() == "v3" and [p.name for p in tmp_path.iterdir()] == ["model"]
