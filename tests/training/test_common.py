"""What the recipes share: the weight-decay rule, progress without a terminal, metrics without TensorBoard,
which run folders stay."""

from __future__ import annotations

import io
import json
import re
import sys

import torch
from rich.console import Console
from torch import nn

from tuneloop.config import load_config
from tuneloop.registry import VersionFolder
from tuneloop.training import classification
from tuneloop.training.common import MetricsLog, TrainingProgress, parameter_groups


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)


def test_weights_decay_and_biases_norms_and_frozen_parameters_do_not():
    block = Block()
    decayed, plain = parameter_groups(block, lr=1e-3, weight_decay=0.01)
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert [id(p) for p in decayed["params"]] == [id(block.dense.weight)]
    assert {id(p) for p in plain["params"]} == {
        id(block.dense.bias),
        id(block.LayerNorm.weight),
        id(block.LayerNorm.bias),
        id(block.norm.weight),
        id(block.norm.bias),
        id(block.frozen.bias),
    }
    skipped = parameter_groups(block, 1e-3, 0.01, skip=[block.dense.weight])
    assert all(id(p) != id(block.dense.weight) for g in skipped for p in g["params"])


def test_without_a_terminal_progress_is_a_line_every_twentieth_of_the_run_with_the_time_left():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with TrainingProgress("training", total=100, console=console) as progress:
        for step in range(100):
            progress.step(1.0 / (step + 1), "epoch 1/1")
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 20
    assert re.fullmatch(r"epoch 1/1: step 5/100 \(5%\), loss 0\.200, 0:\d\d elapsed, 0:\d\d left", lines[0]), lines[0]
    assert lines[-1].startswith("epoch 1/1: step 100/100 (100%)")
    quiet = io.StringIO()
    with TrainingProgress("training", total=10, show=False, console=Console(file=quiet)) as progress:
        progress.step(0.5)
    assert quiet.getvalue() == ""


def test_metrics_are_logged_as_json_lines_with_or_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    folder = VersionFolder(tmp_path / "run")
    folder.root.mkdir()
    metrics = MetricsLog(folder)
    metrics.record({"epoch": 1, "step": 3, "train_loss": torch.tensor(0.5).item()})
    metrics.close()
    assert [json.loads(line) for line in folder.metrics.read_text().splitlines()] == [
        {"epoch": 1, "step": 3, "train_loss": 0.5}
    ]
    assert not folder.tensorboard.exists()


def test_registered_runs_beyond_keep_checkpoints_are_deleted_and_unfinished_ones_never(tiny_overrides, home):
    """Regression: every run folder (model copy and a checkpoint with the optimiser's state) stayed forever."""
    config = load_config(None, [*tiny_overrides, "train.epochs=1", "train.keep_checkpoints=1"])
    runs = home / "runs"
    unfinished = VersionFolder(runs / "toy-20250101-000000-000000")  # what --resume continues
    (unfinished.checkpoints).mkdir(parents=True)
    (unfinished.checkpoints / "state.pt").write_bytes(b"resumable")
    first = classification.run(config, show_progress=False)
    second = classification.run(config, show_progress=False)
    finished = sorted(r.name for r in runs.iterdir() if (r / "registered-as.txt").is_file())
    assert len(finished) == 1 and (runs / finished[0] / "registered-as.txt").read_text().strip() == "toy@2"
    assert (runs / finished[0] / "checkpoint").is_dir()  # the kept run can still be looked into
    assert (unfinished.checkpoints / "state.pt").read_bytes() == b"resumable"
    for outcome in (first, second):  # what the outcome points at is the registered version, complete
        assert (outcome.folder.model / "classifier.json").is_file() and outcome.report_html.is_file()
    assert not list(runs.glob(".deleting-*"))

    classification.run(load_config(None, [*tiny_overrides, "train.epochs=1"]), show_progress=False)  # keep 0
    assert sorted(r.name for r in runs.iterdir()) == [unfinished.root.name]


def test_a_deletion_cut_short_leaves_nothing_that_looks_like_a_run(tiny_overrides, home, monkeypatch):
    config = load_config(None, [*tiny_overrides, "train.epochs=1"])
    runs = home / "runs"
    leftover = runs / ".deleting-0123"  # renamed out of the runs' pattern, then the process died
    (leftover / "checkpoint").mkdir(parents=True)
    classification.run(config, show_progress=False)
    assert not leftover.exists() and list(runs.iterdir()) == []


class Payload:
    """What a crafted checkpoint could carry: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_is_more_than_tensors_is_refused_and_runs_nothing(tmp_path):
    """Regression: checkpoints were loaded with weights_only=False, so a crafted run folder ran code."""
    import pytest

    from tuneloop.errors import TuneloopError
    from tuneloop.training.common import load_checkpoint

    folder = VersionFolder(tmp_path / "run")
    folder.checkpoints.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "rng": Payload(str(marker))}, folder.checkpoints / "trainer.pt")
    with pytest.raises(TuneloopError, match="holds more than tensors and plain values"):
        load_checkpoint(folder, "trainer.pt")
    assert not marker.exists()


def test_a_run_killed_while_being_registered_is_not_resumed_into_a_second_version(tiny_overrides, home, monkeypatch):
    """Review finding: a crash between the registry's commit and the run's mark left a run that --resume
    latest continued and registered again."""
    import pytest

    from tuneloop.errors import TuneloopError
    from tuneloop.training import common

    config = load_config(None, [*tiny_overrides, "train.epochs=1"])

    class Killed(BaseException):
        pass

    def killed_after_commit(*args, **kwargs):
        raise Killed  # as if the process died right after the registry committed

    real_prune = common.prune_finished_runs
    monkeypatch.setattr(
        common,
        "write_text_atomically",
        lambda path, text: path.write_text(text) if text == common.REGISTERING else killed_after_commit(),
    )
    with pytest.raises(Killed):
        classification.run(config, show_progress=False)
    monkeypatch.undo()
    [run] = [r for r in (home / "runs").iterdir()]
    assert (run / "registered-as.txt").read_text() == common.REGISTERING
    with pytest.raises(TuneloopError, match="no run of 'toy' to resume"):
        classification.run(config, resume="latest", show_progress=False)
    with pytest.raises(TuneloopError, match="stopped while it was being registered"):
        classification.run(config, resume=run, show_progress=False)
    assert real_prune(config, 0) == []  # not finished as far as pruning goes either: it is left for a person
