"""Data-parallel training on torch.distributed: the same recipe, run folder and registry under torchrun.

`torchrun --nproc-per-node N -m tuneloop train …` starts N copies of the command; each joins one gloo process
group (the recipes train on CPUs; `pretrain` and `sft` follow the same rules with their own batches). Every rank walks
the same global batches — the recipe's `train.batch_size`, whatever N is — and takes its share of each: every
N-th text of a batch already sorted by length, so the shares have similar lengths. DistributedDataParallel
averages the ranks' gradients, and each rank's loss is scaled so that this average is the gradient of the
whole batch's loss as one process computes it: N processes follow one process's training, up to the order of
floating-point sums. Rank 0 alone prepares the data, writes the run folder, logs, checkpoints, the report and
the registry row; validation is scored on shares and gathered, and rank 0's decision (keep the model, stop
early) is broadcast. A checkpoint records the global position (epoch, step in epoch), so a run resumes with the
same or a different number of processes.

`train.strategy=fsdp` shards instead of replicating (torch's `fully_shard`): each encoder layer, the encoder and
the head keep 1/N of their weights, gradients and optimizer state on each rank and gather a layer's weights just
before using it, for an encoder too large for one process's memory. The steps are the same as DDP's — the
gradients are averaged in a reduce-scatter — so the same semantics hold; checkpoints hold full (unsharded)
weights and optimizer state, so an FSDP run resumes with any number of processes.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    OptimizerStateType,
    StateDictOptions,
    ValueType,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from tuneloop.config import ClassifierRecipe
from tuneloop.errors import TuneloopError, first_line

T = TypeVar("T")


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

    def even_share(self, count: int) -> tuple[np.ndarray, int]:
        """This rank's positions among `count` rows to score, padded by repeating its first to the same number on
        every rank, and how many are its own: FSDP gathers a layer's weights from all ranks for every forward
        pass, so every rank must run as many. Every rank gets at least one row."""
        mine = np.arange(count)[self.rank :: self.size]
        padded = -(-count // self.size) or 1
        first = mine[:1] if len(mine) else np.zeros(1, dtype=int)
        return np.concatenate([mine, np.repeat(first, padded - len(mine))]), len(mine)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def on_rank_zero(self, work: Callable[[], T]) -> T | None:
        """`work()` done by rank 0 alone while the other ranks wait (its result on rank 0, None elsewhere). Rank
        0's failure is every rank's — its message raised on the others — so none waits for what will not come."""
        if not self.main:
            failed = self.broadcast(None)
            if failed is not None:
                raise TuneloopError(failed)
            return None
        try:
            done = work()
        except Exception as exc:
            self.broadcast(first_line(exc) or type(exc).__name__)
            raise
        self.broadcast(None)
        return done

    def from_rank_zero(self, make: Callable[[], T]) -> T:
        """`make()` done by rank 0 alone (as `on_rank_zero`), its result on every rank."""
        made: T = self.broadcast(self.on_rank_zero(make))  # rank 0's, where it was made
        return made

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


# What MPI launchers (mpirun, and `accelerate launch` for several CPU processes, which goes through it) set
# instead of torchrun's WORLD_SIZE.
_MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun and accelerate's GPU launch set WORLD_SIZE; none: 1)."""
    mpi_sizes = [os.environ.get(name, "") for name in _MPI_WORLD_SIZE]
    if "WORLD_SIZE" not in os.environ and any(size.isdigit() and int(size) > 1 for size in mpi_sizes):
        # Each MPI process would otherwise train alone and register its own version.
        raise TuneloopError(
            "started by mpirun (or accelerate's multi-CPU launch): tuneloop joins torchrun's process group; "
            "start it with torchrun --nproc-per-node N -m tuneloop …"
        )
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TuneloopError(f"WORLD_SIZE='{os.environ['WORLD_SIZE']}' is not a number of processes") from None


def join_world(backend: str = "gloo") -> World:
    """Join the launcher's process group (once per process), or be the one process of a plain run. gloo moves CPU
    tensors (pretraining and sft, and the objects every recipe's ranks exchange); a classifier that trains on GPUs
    asks for NCCL beside it ("cpu:gloo,cuda:nccl")."""
    if launched_world_size() <= 1:
        return ONE_PROCESS
    if not dist.is_initialized():
        dist.init_process_group(backend)
        _joined_here.append(True)
    return World(dist.get_rank(), dist.get_world_size())


def current_world() -> World:
    """The world this process joined (one process when it joined none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return ONE_PROCESS


def leave_world() -> None:
    """Leave the process group this module joined (one a caller set up itself is the caller's to end).

    Whatever still holds the group goes first: a DDP or FSDP model in a reference cycle (FSDP's hooks make one)
    would otherwise be freed by a later garbage collection — after the group, or while the interpreter shuts
    down, when the gloo threads finishing its last collectives wait for an interpreter lock that is gone and the
    process aborts ("terminate called without an active exception")."""
    if _joined_here and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        _joined_here.clear()


def check_batch_divides(setting: str, batch_size: int, world: World) -> None:
    """Every process takes an equal share of each global batch."""
    if world.distributed and batch_size % world.size:
        raise TuneloopError(
            f"{setting}={batch_size} does not divide among {world.size} processes: make it a multiple of "
            f"{world.size} (the global batch stays what the recipe says, whatever the number of processes)"
        )


def check_recipe(recipe: ClassifierRecipe, world: World) -> None:
    """What data-parallel training cannot do, said before anything is prepared or written."""
    tc = recipe.train
    if tc.strategy == "fsdp" and not world.distributed:
        raise TuneloopError(
            "train.strategy=fsdp shards the model over several processes: start it with torchrun "
            "--nproc-per-node N (N ≥ 2), or train in one process with train.strategy=ddp"
        )
    if tc.strategy == "fsdp" and tc.method == "lora":
        raise TuneloopError(
            "train.method=lora with train.strategy=fsdp: LoRA's few trainable weights need no sharding; "
            "use train.strategy=ddp"
        )
    check_batch_divides("train.batch_size", tc.batch_size, world)
    if not world.distributed:
        return
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


def shard_model(model: nn.Module, encoder: nn.Module) -> None:
    """FSDP: shard `model` in place over the process group — each of the encoder's layers (the blocks its
    `_no_split_modules` names) one unit, gathered only while it runs, then the rest of the encoder and each other
    child (the head) — so that a rank holds 1/N of the weights between uses."""
    blocks = set(getattr(encoder, "_no_split_modules", None) or [])
    for module in list(encoder.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(encoder)
    for child in model.children():
        if child is not encoder and any(True for _ in child.parameters()):
            fully_shard(child)


# Full (unsharded) state, gathered on rank 0 only and kept in CPU memory: what a checkpoint or a saved model holds.
_FULL_ON_RANK_ZERO = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model: nn.Module) -> dict[str, ValueType]:
    """An FSDP model's whole weights on rank 0 (an empty dict on the other ranks); every rank must call it."""
    return get_model_state_dict(model, options=_FULL_ON_RANK_ZERO)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerStateType:
    """An FSDP optimizer's whole state, keyed by parameter name, on rank 0; every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK_ZERO)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: OptimizerStateType) -> None:
    """Each rank takes its shard of a whole optimizer state (as `full_optimizer_state` wrote it)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
