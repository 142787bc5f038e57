"""Data-parallel training on torch.distributed: the same recipe, run folder and registry under torchrun.

`torchrun --nproc-per-node N -m tuneloop train …` (or `accelerate launch`, which sets the same environment)
starts N copies of the command; each joins one process group (gloo on CPUs, NCCL on GPUs). Every rank walks
the same global batches — the recipe's `train.batch_size`, whatever N is — and takes its share of each: every
N-th text of a batch already sorted by length, so the shares have similar lengths. DistributedDataParallel
averages the ranks' gradients, and each rank's loss is scaled so that this average is the gradient of the
whole batch's loss as one process computes it: N processes follow one process's training, up to the order of
floating-point sums. Rank 0 alone prepares the data, writes the run folder, logs, checkpoints, the report and
the registry row; validation is scored on shares and gathered, and rank 0's decision (keep the model, stop
early) is broadcast. A checkpoint records the global position (epoch, step in epoch), so a run resumes with the
same or a different number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tuneloop.config import ClassifierRecipe
from tuneloop.errors import TuneloopError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, rows: Sequence[int]) -> tuple[list[int], float]:
        """This rank's share of a global batch, and 1.0 — or, when the batch has fewer rows than there are ranks
        and none is left for this one, a stand-in row and 0.0: every rank must take part in every step."""
        mine = list(rows[self.rank :: self.size])
        return (mine, 1.0) if mine else ([rows[0]], 0.0)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        if not self.distributed:
            return value
        summed = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(summed)
        return float(summed.item())


ONE_PROCESS = World()
_joined_here: list[bool] = []  # whether join_world started the process group (and leave_world should end it)


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun and accelerate set WORLD_SIZE; none: 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TuneloopError(f"WORLD_SIZE='{os.environ['WORLD_SIZE']}' is not a number of processes") from None


def refuse_launch(command: str) -> None:
    """For a recipe that trains in one process only: under torchrun every rank would run all of it and write the
    same run folder and registry row."""
    if launched_world_size() > 1:
        raise TuneloopError(f"tuneloop {command} trains in one process: start it without torchrun")


def join_world() -> World:
    """Join the launcher's process group (once per process), or be the one process of a plain run."""
    if launched_world_size() <= 1:
        return ONE_PROCESS
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _joined_here.append(True)
    return World(dist.get_rank(), dist.get_world_size())


def current_world() -> World:
    """The world this process joined (one process when it joined none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return ONE_PROCESS


def leave_world() -> None:
    """Leave the process group this module joined (one a caller set up itself is the caller's to end)."""
    if _joined_here and dist.is_initialized():
        dist.destroy_process_group()
        _joined_here.clear()


def check_recipe(recipe: ClassifierRecipe, world: World) -> None:
    """What data-parallel training cannot do, said before anything is prepared or written."""
    if not world.distributed:
        return
    tc = recipe.train
    if tc.batch_size % world.size:
        raise TuneloopError(
            f"train.batch_size={tc.batch_size} does not divide among {world.size} processes: make it a multiple "
            f"of {world.size} (the global batch stays what the recipe says, whatever the number of processes)"
        )
    refused = {
        "train.dp (differentially private training)": tc.dp is not None,
        "several tasks (multi-task training)": len(recipe.tasks) > 1,
        "data.kfold (k-fold cross-validation)": bool(recipe.data.kfold),
    }
    for what, asked in refused.items():
        if asked:
            raise TuneloopError(f"{what} runs in one process: start it without torchrun")


def shard_loss(per_row: torch.Tensor, weight: float, normaliser: float, world: World) -> torch.Tensor:
    """This rank's part of the global batch loss: its rows' losses over the whole batch's normaliser, times the
    number of ranks, because DistributedDataParallel averages the ranks' gradients."""
    return per_row.sum() * (weight * world.size / normaliser)


def batch_normaliser(labels: np.ndarray, class_weights: torch.Tensor | None) -> float:
    """What a mean-reduced cross-entropy divides the batch's summed losses by: the rows, or their class weights."""
    if class_weights is None:
        return float(len(labels))
    return float(class_weights[torch.as_tensor(labels)].sum())
