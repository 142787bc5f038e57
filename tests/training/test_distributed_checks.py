"""What data-parallel training refuses, and how a rank takes its share of a global batch (no processes needed)."""

from __future__ import annotations

import pytest

from tuneloop.config import PretrainRecipe, SftRecipe, load_config
from tuneloop.errors import TuneloopError
from tuneloop.training import mlm, sft
from tuneloop.training.distributed import World, check_recipe


def test_every_rank_gets_a_share_of_similar_lengths_and_a_rank_left_without_rows_a_weightless_stand_in():
    batch = [7, 3, 9, 1, 4]  # sorted by length, longest first
    assert [World(rank, 2).share(batch) for rank in (0, 1)] == [([7, 9, 4], 1.0), ([3, 1], 1.0)]
    assert World(2, 3).share([5, 6]) == ([5], 0.0)  # takes part in the step, adds nothing to it


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("train.batch_size=30", "train.batch_size=30 does not divide among 4 processes"),
        ("train.dp.epsilon=8", "train.dp (differentially private training) runs in one process"),
        ("data.kfold=3", "data.kfold (k-fold cross-validation) runs in one process"),
    ],
)
def test_what_cannot_run_distributed_is_refused_with_one_line(override, said, tmp_path):
    recipe = load_config(None, [f"registry.home={tmp_path}", "train.batch_size=32", override])
    with pytest.raises(TuneloopError, match=said.replace("(", r"\(").replace(")", r"\)")):
        check_recipe(recipe, World(0, 4))
    check_recipe(recipe, World())  # one process: all of it allowed


def test_pretrain_and_sft_under_torchrun_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TuneloopError, match="tuneloop pretrain trains in one process"):
        mlm.run(load_config(None, [f"registry.home={tmp_path}"], PretrainRecipe))
    with pytest.raises(TuneloopError, match="tuneloop sft trains in one process"):
        sft.run(load_config(None, [f"registry.home={tmp_path}"], SftRecipe))
    assert not any(tmp_path.iterdir())
