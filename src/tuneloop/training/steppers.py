"""How one optimiser step is taken, one class per strategy behind the loop's `Stepper` interface:

- `ReplicatedStepper`: one process, or DDP under torchrun, through Accelerate's `Accelerator`, which places the
  model on the device, wraps it in DistributedDataParallel when there are several processes, and scales fp16
  losses; on a CPU with gloo as on GPUs with NCCL.
- `ShardedStepper`: FSDP (torch's `fully_shard`), each process keeping 1/N of the weights, gradients and optimizer
  state; checkpoints and saved models hold the whole, gathered on rank 0.
- `PrivateStepper`: DP-SGD with Opacus (private.py): Poisson batches, each text's gradient clipped, noise added.

The first two share `GradientStepper`: a forward pass over this process's share of the batch, the task's loss
terms summed, backward, clipping, an optimiser step.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from tuneloop.config import ClassifierRecipe
from tuneloop.evaluate.schema import PrivacyReport
from tuneloop.models.classifier import TextClassifier, pad_right
from tuneloop.profiling import stage
from tuneloop.training.devices import DevicePlan
from tuneloop.training.distributed import (
    World,
    full_optimizer_state,
    full_weights,
    load_full_optimizer_state,
    shard_model,
)
from tuneloop.training.loop import Task
from tuneloop.training.losses import BatchShare, StepInputs

# Builds the run's AdamW over the model's parameters as they are when it is called (after sharding, on the device).
OptimizerFactory = Callable[[], torch.optim.Optimizer]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, grouped: bool = True) -> list[list[int]]:
    """Shuffled batches of similar-length examples, so dynamic padding wastes little compute.

    Sorting within mega-batches of 50 batches keeps most of the randomness of a full shuffle.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if not grouped:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega].tolist(), key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class GradientStepper:
    """A plain gradient step over each task's loss terms; subclasses say where the model lives and how its
    gradients are reduced and its state gathered."""

    optimizer: torch.optim.Optimizer
    module: torch.nn.Module  # what the first task's forward pass runs through (a DDP wrapper, a sharded model)

    def __init__(
        self,
        model: TextClassifier,
        plan: DevicePlan,
        world: World,
        recipe: ClassifierRecipe,
        pad_id: int,
        make_optimizer: OptimizerFactory,
    ):
        self.model, self.plan, self.world, self.pad_id = model, plan, world, pad_id
        self.batch_size, self.seed = recipe.train.batch_size, recipe.train.seed
        self.grouped, self.grad_clip = recipe.train.length_grouping, recipe.train.grad_clip
        self.module = self.place(model)
        self.optimizer = make_optimizer()  # over the parameters as placed (on the device, or sharded)

    def place(self, model: TextClassifier) -> torch.nn.Module:
        """Put the model where it trains; returns what the first task's forward pass runs through."""
        raise NotImplementedError

    def steps_per_epoch(self, tasks: list[Task]) -> int:
        return sum(-(-len(task.train_ids) // self.batch_size) for task in tasks)

    def epoch_batches(self, tasks: list[Task], epoch: int) -> list[tuple[Task, list[int]]]:
        """Every task's batches for one epoch, interleaved in a seeded random order, so that no task's data
        comes in one block at the end of an epoch (where the learning rate is lowest)."""
        seed = self.seed + epoch
        batches = [
            (task, batch)
            for task in tasks
            for batch in length_grouped_batches([len(x) for x in task.train_ids], self.batch_size, seed, self.grouped)
        ]
        if len(tasks) == 1:
            return batches
        return [batches[i] for i in np.random.default_rng(seed).permutation(len(batches))]

    def forward(self, module: torch.nn.Module, ids: list[list[int]]) -> torch.Tensor:
        """fp32 logits of tokenised texts through `module`, on the device, under the run's autocast."""
        with stage("data"):
            input_ids, mask = pad_right(ids, self.pad_id)
            input_ids, mask = self.plan.to_device(input_ids), self.plan.to_device(mask)
        with stage("forward"), self.plan.autocast():
            logits: torch.Tensor = module(input_ids, mask)
            return logits.float()

    def step(self, task: Task, batch: list[int], step: int) -> float:
        """One optimiser step on `batch` of `task`; returns the batch's mean first loss term (for the log)."""
        share = BatchShare.of(batch, self.world)
        # Other tasks' heads (one process only) and off-topic messages run through the bare classifier: a DDP
        # wrapper's forward may run once per backward pass, and its gradient hooks see every parameter anyway.
        module = self.module if task.classifier is self.model else task.classifier
        logits = self.forward(module, [task.train_ids[i] for i in share.rows])
        inputs = StepInputs(task.train_labels, share, logits, step, lambda ids: self.forward(task.classifier, ids))
        parts = [term(inputs) for term in task.terms]
        loss = torch.stack([term.weight * part for term, part in zip(task.terms, parts, strict=True)]).sum()
        with stage("backward"):
            self.backward(loss)
        with stage("optimizer"):
            self.clip_and_step()
        return share.whole(parts[0])

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def privacy(self) -> PrivacyReport | None:
        return None  # what a private run spent; a plain one promises nothing

    def clip_and_step(self) -> None:
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class ReplicatedStepper(GradientStepper):
    """One process, or a whole copy of the model in each of torchrun's processes (DDP), through Accelerate."""

    def place(self, model: TextClassifier) -> torch.nn.Module:
        self.accelerator = accelerator_for(self.plan)
        placed: torch.nn.Module = self.accelerator.prepare_model(model)
        return placed

    @functools.cached_property
    def stepping(self) -> torch.optim.Optimizer:
        """Accelerate's wrapper of the optimizer, which steps through the gradient scaler in fp16 (the schedule
        drives the optimizer itself)."""
        wrapped: torch.optim.Optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        return wrapped

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_and_step(self) -> None:
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.accelerator.clip_grad_norm_(trainable, self.grad_clip)  # unscales fp16 gradients first
        self.stepping.step()
        self.stepping.zero_grad(set_to_none=True)

    def model_to_save(self) -> TextClassifier | None:
        return self.model if self.world.main else None

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "private": None}

    def load_checkpoint_state(self, saved: dict[str, Any], mid_epoch: bool) -> None:
        self.stepping.load_state_dict(saved["optimizer"])  # moved to the device with the parameters


class ShardedStepper(GradientStepper):
    """FSDP: each process keeps its shard of every layer, gathered just before the layer runs; rank 0 also keeps a
    whole copy to save the model from."""

    def place(self, model: TextClassifier) -> torch.nn.Module:
        self.whole_copy = copy.deepcopy(model).cpu() if self.world.main else None  # where the saved model goes
        model.to(self.plan.device)
        shard_model(model, model.encoder)
        return model

    def model_to_save(self) -> TextClassifier | None:
        weights = full_weights(self.model)  # every rank takes part in gathering the shards
        if self.whole_copy is not None:
            self.whole_copy.load_state_dict(weights)
        return self.whole_copy

    def checkpoint_state(self) -> dict[str, Any]:
        # Whole weights and optimizer state, so that a run resumes on any number of processes.
        return {
            "model": full_weights(self.model),
            "optimizer": full_optimizer_state(self.model, self.optimizer),
            "private": None,
        }

    def load_checkpoint_state(self, saved: dict[str, Any], mid_epoch: bool) -> None:
        load_full_optimizer_state(self.model, self.optimizer, saved["optimizer"])


def accelerator_for(plan: DevicePlan) -> Accelerator:
    """Accelerate for this run's device and precision. Its settings are process-wide, so a process that trains
    again (a test session, a notebook) with another precision starts them afresh."""
    AcceleratorState._reset_state()  # the partial state (which processes there are) is kept
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(plan.precision, "no")
    return Accelerator(cpu=not plan.on_gpu, mixed_precision=mixed)
