"""The tiny encoder with dropout off, for the torchrun tests of train, pretrain and sft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture()
def without_dropout(tiny_encoder, tmp_path) -> Path:
    """The tiny encoder with dropout off: with it, one process and two draw different masks for the same text, so
    their trainings could only be compared statistically."""
    folder = tmp_path / "tiny-no-dropout"
    shutil.copytree(tiny_encoder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
