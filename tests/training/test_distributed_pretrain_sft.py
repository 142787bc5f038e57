"""MLM pretraining and SFT under torchrun: two gloo processes on the tiny models follow one process's training
(same global batch: the same losses and final weights, within float tolerance), only rank 0 registers, and a
batch that does not divide among the processes is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import MOODS, Crash, launch, toy_rows
from tuneloop.config import PretrainRecipe, load_config
from tuneloop.registry import Registry
from tuneloop.training import mlm

pytestmark = pytest.mark.distributed

# The two runs differ only in the order floating-point sums are taken (a gradient summed over a batch in one
# process, or over two shares and then across processes).
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-4


def registered(home: Path, name: str, weights_file: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The one version a launch registered: its logged epochs and its weights."""
    registry = Registry(load_config(None, [f"registry.home={home}"]).registry)
    (version,) = registry.versions(name)  # one registration per launch: rank 0's
    folder = registry.folder(version)
    history = [json.loads(line) for line in (folder.root / "metrics.jsonl").read_text().splitlines()]
    return history, load_file(folder.model / weights_file)


def assert_same_training(one: tuple[list[dict], dict], two: tuple[list[dict], dict], logged: list[str]) -> None:
    (one_history, one_weights), (two_history, two_weights) = one, two
    assert [e["step"] for e in two_history] == [e["step"] for e in one_history]  # the same global batches
    for key in logged:
        np.testing.assert_allclose(
            [e[key] for e in two_history], [e[key] for e in one_history], atol=LOSS_TOLERANCE, err_msg=key
        )
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        np.testing.assert_allclose(two_weights[name], weight, atol=WEIGHT_TOLERANCE, err_msg=name)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    texts = [r["text"] for r in toy_rows(26, seed=2) + toy_rows(26, seed=3, topics=MOODS)]
    path.write_text("\n".join(texts), encoding="utf-8")
    return path


def pretrain_arguments(encoder: Path, corpus: Path, home: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        f"model.name={encoder}",
        f"pretrain.paths=[{corpus}]",
        f"registry.home={home}",
        "name=toy-mlm",
        "pretrain.block_size=32",
        "pretrain.batch_size=8",
        "pretrain.lr=1e-3",
        "pretrain.head_lr=1e-3",
        "pretrain.epochs=2",
        "pretrain.threads=1",
        "pretrain.precision=fp32",  # bf16 rounds each process's half-batch differently from the whole batch
        *extra,
    ]


def sft_arguments(model: Path, pairs: Path, home: Path, *extra: str) -> list[str]:
    return [
        "sft",
        f"sft.model={model}",
        f"sft.paths=[{pairs}]",
        f"registry.home={home}",
        "name=replies",
        "sft.epochs=2",
        "sft.batch_size=4",
        "sft.lr=1e-2",
        "sft.val_size=0.2",
        "sft.lora_dropout=0",
        "sft.threads=1",
        "sft.precision=fp32",  # bf16 rounds each process's half-batch differently from the whole batch
        *extra,
    ]


def test_pretraining_in_two_processes_follows_one_process_and_registers_once(without_dropout, corpus, tmp_path):
    one = launch(1, pretrain_arguments(without_dropout, corpus, tmp_path / "one"), tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, pretrain_arguments(without_dropout, corpus, tmp_path / "two"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("registered toy-mlm@1") == 1  # rank 0 reports; rank 1 says nothing

    assert_same_training(
        registered(tmp_path / "one", "toy-mlm", "model.safetensors"),
        registered(tmp_path / "two", "toy-mlm", "model.safetensors"),
        ["train_loss", "heldout_loss"],
    )
    assert len(list((tmp_path / "two").rglob("metrics.jsonl"))) == 1  # rank 1 wrote no run folder of its own


def test_pretraining_stopped_in_one_process_resumes_in_two_and_ends_where_an_uninterrupted_run_ends(
    without_dropout, corpus, tmp_path
):
    """The checkpoint holds the global position (mid-epoch here) and the masking generator, not a rank's."""
    whole = launch(1, pretrain_arguments(without_dropout, corpus, tmp_path / "whole"), tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    arguments = pretrain_arguments(without_dropout, corpus, tmp_path / "home", "pretrain.checkpoint_every=3")

    def crash(state: dict) -> None:
        if state["global_step"] == 6:  # in the second epoch, just after a checkpoint
            raise Crash

    with pytest.raises(Crash):
        mlm.run(load_config(None, arguments[1:], PretrainRecipe), show_progress=False, step_callback=crash)
    resumed = launch(2, [*arguments[:1], "--resume", "latest", *arguments[1:]], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_same_training(
        registered(tmp_path / "whole", "toy-mlm", "model.safetensors"),
        registered(tmp_path / "home", "toy-mlm", "model.safetensors"),
        ["train_loss", "heldout_loss"],
    )


@pytest.mark.parametrize(
    ("method", "weights_file"), [("full", "model.safetensors"), ("lora", "adapter_model.safetensors")]
)
def test_sft_in_two_processes_follows_one_process_and_registers_once(
    tiny_lm, pairs_file, tmp_path, method, weights_file
):
    one = launch(1, sft_arguments(tiny_lm, pairs_file, tmp_path / "one", f"sft.method={method}"), tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, sft_arguments(tiny_lm, pairs_file, tmp_path / "two", f"sft.method={method}"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("registered replies@1") == 1

    assert_same_training(
        registered(tmp_path / "one", "replies", weights_file),
        registered(tmp_path / "two", "replies", weights_file),
        ["train_loss", "heldout_loss"],
    )
    assert len(list((tmp_path / "two").rglob("metrics.jsonl"))) == 1


@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_a_batch_that_does_not_divide_among_the_processes_is_refused_before_anything_is_written(
    command, tiny_encoder, tiny_lm, corpus, pairs_file, tmp_path
):
    home = tmp_path / "home"
    arguments = (
        pretrain_arguments(tiny_encoder, corpus, home, "pretrain.batch_size=7")
        if command == "pretrain"
        else sft_arguments(tiny_lm, pairs_file, home, "sft.batch_size=7")
    )
    refused = launch(2, arguments, tmp_path)
    assert refused.returncode != 0
    assert f"{command}.batch_size=7 does not divide among 2 processes" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout
    assert not home.exists() or not list(home.rglob("*"))
