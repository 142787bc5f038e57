"""What data-parallel training refuses, and how a rank takes its share of a global batch (no processes needed)."""

from __future__ import annotations

import pytest

from tuneloop.config import load_config
from tuneloop.errors import TuneloopError
from tuneloop.training.distributed import World, check_recipe, launched_world_size


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


def test_fsdp_needs_several_processes_and_is_refused_with_lora(tmp_path):
    sharded = load_config(None, [f"registry.home={tmp_path}", "train.strategy=fsdp"])
    with pytest.raises(TuneloopError, match="train.strategy=fsdp shards the model over several processes"):
        check_recipe(sharded, World())
    check_recipe(sharded, World(0, 2))
    with_lora = load_config(None, [f"registry.home={tmp_path}", "train.strategy=fsdp", "train.method=lora"])
    with pytest.raises(TuneloopError, match="train.method=lora with train.strategy=fsdp"):
        check_recipe(with_lora, World(0, 2))


def test_processes_started_by_mpirun_are_refused_instead_of_each_training_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(TuneloopError, match="started by mpirun"):
        launched_world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win: mpirun may have started torchrun itself
    assert launched_world_size() == 2


def test_every_rank_scores_as_many_rows_and_keeps_its_own():
    shares = [World(rank, 3).even_share(7) for rank in range(3)]
    assert [len(rows) for rows, _ in shares] == [3, 3, 3]
    assert sorted(int(row) for rows, real in shares for row in rows[:real]) == list(range(7))
    assert World(1, 2).even_share(1)[1] == 0 and len(World(1, 2).even_share(1)[0]) == 1


def test_leaving_the_world_frees_what_holds_the_process_group_before_ending_it(tmp_path, monkeypatch):
    """Regression: a two-process FSDP run's rank 1 aborted at exit ("terminate called without an active exception")
    on a busy machine. FSDP's hooks keep the sharded model in a reference cycle, which the garbage collector freed
    after the process group was gone or while the interpreter shut down; leave_world frees such cycles first."""
    import gc

    import torch.distributed as dist

    from tuneloop.training import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(distributed, "_joined_here", [True])
    seen = []

    class HoldsTheGroup:
        def __del__(self) -> None:
            seen.append(dist.is_initialized())

    cycle = HoldsTheGroup()
    cycle.itself = cycle  # only the garbage collector frees it
    del cycle
    gc.disable()  # as if no collection happened to run between the end of training and leave_world
    try:
        distributed.leave_world()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == [True]  # freed, and while the group was still there
