"""Data-parallel training under torchrun: two gloo processes on the tiny model follow one process's training
(same global batch: the same loss curve and final weights, within float tolerance), only rank 0 writes and
registers, and what cannot run distributed is refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from helpers import toy_rows
from tuneloop.config import load_config
from tuneloop.registry import Registry

pytestmark = pytest.mark.distributed

TORCHRUN = Path(sys.executable).with_name("torchrun")
# Tolerances: the two runs differ only in the order floating-point sums are taken (a gradient summed over a
# batch in one process, or over two halves and then across processes).
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture()
def without_dropout(tiny_encoder, tmp_path) -> Path:
    """The tiny encoder with dropout off (and the head's, below): with it, one process and two draw different masks
    for the same text, so their trainings could only be compared statistically."""
    folder = tmp_path / "tiny-no-dropout"
    shutil.copytree(tiny_encoder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def overrides(encoder: Path, data: Path, home: Path, *extra: str) -> list[str]:
    return [
        f"model.name={encoder}",
        f"data.path={data}",
        f"registry.home={home}",
        "name=toy",
        "train.epochs=2",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.head_lr=1e-2",
        "model.max_length=32",
        "train.threads=1",
        "train.bf16=false",
        "model.dropout=0",
        "serving.runtime=torch",
        *extra,
    ]


def launch(processes: int, arguments: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = (
        [str(TORCHRUN), "--standalone", "--nproc-per-node", str(processes), "-m", "tuneloop"]
        if processes > 1
        else [sys.executable, "-m", "tuneloop"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELOOP_HOME": str(tmp_path / "unused-home")}
    return subprocess.run([*command, *arguments], capture_output=True, text=True, env=env, timeout=600)


def trained(home: Path) -> tuple[list[dict], dict[str, np.ndarray], Registry]:
    registry = Registry(load_config(None, [f"registry.home={home}"]).registry)
    (version,) = registry.versions("toy")  # one registration per launch: rank 0's
    folder = registry.folder(version)
    history = [json.loads(line) for line in (folder.root / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(folder.model / "model.safetensors")
    return history, weights, registry


@pytest.fixture()
def toy_data(tmp_path) -> Path:
    path = tmp_path / "toy.csv"
    pd.DataFrame(toy_rows(per_label=25, seed=4)).to_csv(path, index=False)
    return path


def test_two_processes_follow_one_process_and_only_rank_zero_registers(without_dropout, toy_data, tmp_path):
    one = launch(1, ["train", *overrides(without_dropout, toy_data, tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, ["train", *overrides(without_dropout, toy_data, tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("registered toy@1") == 1  # rank 0 reports; rank 1 says nothing

    one_history, one_weights, _ = trained(tmp_path / "one")
    two_history, two_weights, registry = trained(tmp_path / "two")
    assert [e["step"] for e in two_history] == [e["step"] for e in one_history]  # the same global batches
    np.testing.assert_allclose(
        [e["train_loss"] for e in two_history], [e["train_loss"] for e in one_history], atol=LOSS_TOLERANCE
    )
    assert [e["val_macro_f1"] for e in two_history] == pytest.approx([e["val_macro_f1"] for e in one_history])
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        np.testing.assert_allclose(two_weights[name], weight, atol=WEIGHT_TOLERANCE, err_msg=name)
    # Rank 1 wrote no run folder of its own: the home holds the one registered version's.
    runs = [p for p in (tmp_path / "two").rglob("metrics.jsonl")]
    assert len(runs) == 1 and registry.versions("toy")[0].stage == "candidate"


def test_a_batch_that_does_not_divide_among_the_processes_is_refused_before_anything_is_written(
    without_dropout, toy_data, tmp_path
):
    home = tmp_path / "home"
    refused = launch(2, ["train", *overrides(without_dropout, toy_data, home, "train.batch_size=7")], tmp_path)
    assert refused.returncode != 0
    assert "train.batch_size=7 does not divide among 2 processes" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout
    assert not list(home.rglob("metrics.jsonl"))


def test_bad_data_on_rank_zero_stops_every_rank_with_its_message(without_dropout, tmp_path):
    data = tmp_path / "bad.csv"
    pd.DataFrame({"message": ["hello"] * 30, "label": ["a", "b"] * 15}).to_csv(data, index=False)
    refused = launch(2, ["train", *overrides(without_dropout, data, tmp_path / "home")], tmp_path)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "text" in said and "column" in said and "Traceback" not in refused.stdout


def test_a_run_with_a_killed_rank_resumes_with_another_number_of_processes(without_dropout, tmp_path):
    """SIGKILL one of two ranks mid-run (torchrun then stops the other): nothing is registered; `--resume latest`
    in one process finishes the run from its last checkpoint, and ends where an uninterrupted run ends."""
    import psutil

    data = tmp_path / "more.csv"
    pd.DataFrame(toy_rows(per_label=300, seed=6)).to_csv(data, index=False)
    extra = ("train.epochs=2", "train.checkpoint_every=4", "train.patience=5")
    whole = launch(1, ["train", *overrides(without_dropout, data, tmp_path / "whole", *extra)], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    home = tmp_path / "home"
    arguments = ["train", *overrides(without_dropout, data, home, *extra)]
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "tuneloop", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(home.rglob("trainer.pt")) and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.02)
    ranks = psutil.Process(launcher.pid).children()
    assert launcher.poll() is None and len(ranks) == 2, "the run ended before a rank could be killed"
    ranks[-1].kill()
    assert launcher.wait(timeout=120) != 0
    assert not Registry(load_config(None, [f"registry.home={home}"]).registry).versions("toy")

    resumed = launch(1, ["train", "--resume", "latest", *overrides(without_dropout, data, home)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, resumed_weights, _ = trained(home)
    _, whole_weights, _ = trained(tmp_path / "whole")
    for name, weight in whole_weights.items():
        np.testing.assert_allclose(resumed_weights[name], weight, atol=WEIGHT_TOLERANCE, err_msg=name)
