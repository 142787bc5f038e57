"""The classifier's training loop, written out top to bottom: epochs of batches, one optimiser step each,
validation macro-F1 after each epoch (and every `train.eval_every` steps), the best model kept, early stopping,
and checkpoints from which `--resume` continues bit for bit.

The loop does not know how a step is taken — in one process or several, on a CPU or a GPU, privately or not —
nor which losses are summed: a `Stepper` (steppers.py) takes the step and each task's loss terms (losses.py) are
summed there. Everything the loop itself changes lives in one `LoopState`, saved into checkpoints as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.metrics import f1_score
from transformers import PreTrainedTokenizerBase

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import TrainConfig
from tuneloop.evaluate.schema import PrivacyReport
from tuneloop.models.classifier import TextClassifier, predict_proba, save_task_heads
from tuneloop.models.trained_rows import plain_embeddings
from tuneloop.profiling import Profiler
from tuneloop.registry import VersionFolder
from tuneloop.training.common import HistoryEntry, MetricsLog, TrainingProgress, rng_state, save_checkpoint
from tuneloop.training.distributed import World
from tuneloop.training.losses import StepInputs

log = logging.getLogger(__name__)

CHECKPOINT = "trainer.pt"


class LossTerm(Protocol):
    """A part of the loss (losses.py): its weight in the sum, and its value on one step."""

    weight: float

    def __call__(self, inputs: StepInputs) -> torch.Tensor: ...


@dataclass
class Task:
    """One labelled set, the head that learns it and the loss terms it is trained with; a multi-task run trains
    several on one encoder. The first term's value is what the log shows as the training loss."""

    name: str
    classifier: TextClassifier
    train_ids: list[list[int]]
    train_labels: np.ndarray
    val_texts: list[str]
    val_labels: np.ndarray
    terms: list[LossTerm]
    # The training text each row of train_ids reads (several rows per long text under truncation=windows).
    owners: np.ndarray | None = None


@dataclass
class LoopState:
    """Where the loop is and what it has seen; a checkpoint holds it as it is."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_f1: float | None = None
    best_epoch: int = -1
    best_step: int | None = None
    improved_in_epoch: bool = False
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[HistoryEntry] = field(default_factory=list)
    train_seconds: float = 0.0
    # The epoch's loss so far, so that a resumed epoch reports its whole mean loss.
    epoch_loss_sum: float = 0.0
    epoch_texts: int = 0
    # How the checkpoint's optimizer state is laid out: by parameter position (ddp) or by name (fsdp).
    strategy: str = "ddp"

    @classmethod
    def restored(cls, saved: dict[str, Any]) -> LoopState:
        """A checkpoint's state (fields added since it was written keep their defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})

    @property
    def epoch_loss(self) -> float:
        return self.epoch_loss_sum / max(self.epoch_texts, 1)


class Stepper(Protocol):
    """How a step is taken (steppers.py): one process or DDP through Accelerate, FSDP, or DP-SGD with Opacus."""

    optimizer: torch.optim.Optimizer

    def steps_per_epoch(self, tasks: list[Task]) -> int: ...

    def epoch_batches(self, tasks: list[Task], epoch: int) -> list[tuple[Task, list[int]]]: ...

    def step(self, task: Task, batch: list[int], step: int) -> float: ...

    def model_to_save(self) -> TextClassifier | None: ...

    def checkpoint_state(self) -> dict[str, Any]: ...

    def load_checkpoint_state(self, saved: dict[str, Any], mid_epoch: bool) -> None: ...

    def privacy(self) -> PrivacyReport | None: ...


# Called with the loop's state, the model and its tokenizer every `callback_every` steps and after each epoch;
# benchmarks score the test set during training with it, tests crash a run at a chosen step.
StepCallback = Callable[[LoopState, TextClassifier, PreTrainedTokenizerBase], None]


@dataclass
class Training:
    """One run's parts, which the loop drives and never changes."""

    settings: TrainConfig
    tasks: list[Task]
    stepper: Stepper
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: PreTrainedTokenizerBase
    run: VersionFolder
    world: World
    profiler: Profiler | None = None
    callback: StepCallback | None = None
    callback_every: int = 0
    min_steps: int = 0  # early stopping may stop the loop only after this many steps
    smoothing: int = 1  # the validation scores the kept model and early stopping follow (smoothed_score)

    @property
    def model(self) -> TextClassifier:
        return self.tasks[0].classifier


def fit(training: Training, state: LoopState, show_progress: bool) -> LoopState:
    """Train until the last epoch or early stopping; returns the final state (the best model is in run/model)."""
    tc, world = training.settings, training.world
    total_steps = training.stepper.steps_per_epoch(training.tasks) * tc.epochs
    metrics = MetricsLog(training.run) if world.main else None
    _train_mode(training)
    if not tc.epochs and not state.history:  # a run of no epochs keeps, and scores, the model it starts with
        _score_point(training, state, metrics, {})
        checkpoint(training, state)  # and can be resumed, as after an epoch, if it stops before it is registered
    with TrainingProgress("training", total_steps, state.global_step, show_progress and world.main) as progress:
        while state.epoch < tc.epochs and not state.stopped_early:
            epoch = state.epoch
            batches = training.stepper.epoch_batches(training.tasks, epoch)
            if state.step_in_epoch == 0:
                state.epoch_loss_sum, state.epoch_texts = 0.0, 0
            epoch_start = time.perf_counter()
            for index in range(state.step_in_epoch, len(batches)):
                started = time.perf_counter()
                task, batch = batches[index]
                state.epoch_loss_sum += training.stepper.step(task, batch, state.global_step) * len(batch)
                training.scheduler.step()
                if training.profiler:
                    training.profiler.step()
                state.train_seconds += time.perf_counter() - started
                state.global_step += 1
                state.step_in_epoch = index + 1
                state.epoch_texts += len(batch)
                progress.step(state.epoch_loss, f"epoch {epoch + 1}/{tc.epochs}")
                if tc.eval_every and state.global_step % tc.eval_every == 0 and index + 1 < len(batches):
                    _score_point(training, state, metrics, {})
                if state.global_step % tc.checkpoint_every == 0:
                    checkpoint(training, state)
                if training.callback and training.callback_every and state.global_step % training.callback_every == 0:
                    _call_back(training, state)
            entry = _score_point(training, state, metrics, {"epoch_seconds": time.perf_counter() - epoch_start})
            log.info("epoch %d: %s", epoch + 1, entry)
            state.bad_epochs = 0 if state.improved_in_epoch else state.bad_epochs + 1
            state.improved_in_epoch = False
            state.epoch, state.step_in_epoch = epoch + 1, 0
            checkpoint(training, state)
            if training.callback:
                _call_back(training, state)
            if state.bad_epochs >= tc.patience and state.global_step >= training.min_steps:
                state.stopped_early = True
                checkpoint(training, state)
                log.info("early stop: no validation improvement for %d epochs", tc.patience)
    if metrics:
        metrics.close()
    return state


def _score_point(training: Training, state: LoopState, metrics: MetricsLog | None, extra: HistoryEntry) -> HistoryEntry:
    """A line of the training history: the loss so far, the learning rate and the validation score."""
    entry: HistoryEntry = {
        "epoch": state.epoch + 1,
        "step": state.global_step,
        "train_loss": state.epoch_loss,
        "lr": float(training.scheduler.get_last_lr()[0]),  # a float (torch types it as one or a tensor)
        **extra,
        "train_seconds": state.train_seconds,
    }
    validate(training, state, entry)
    state.history.append(entry)
    if metrics:
        metrics.record(entry)
    return entry


def validate(training: Training, state: LoopState, entry: HistoryEntry) -> None:
    """Score the validation split into `entry`; keep the model if it is the best so far (or if there is no
    validation split, in which case the latest model is kept)."""
    improved, criterion = True, None
    scored = [task for task in training.tasks if len(task.val_texts)]
    if scored:
        scores = {
            task.name: validation_macro_f1(
                task.classifier, training.tokenizer, task.val_texts, task.val_labels, training.world
            )
            for task in scored
        }
        if len(training.tasks) > 1:
            entry.update({f"val_macro_f1/{name}": value for name, value in scores.items()})
        f1 = float(np.mean(list(scores.values())))
        criterion = smoothed_score(
            [h["val_macro_f1"] for h in state.history if "val_macro_f1" in h], f1, training.smoothing
        )
        entry["val_macro_f1"] = f1
        if training.smoothing > 1:
            entry["val_macro_f1_smoothed"] = criterion
        improved = state.best_f1 is None or criterion > state.best_f1
    if improved:
        state.best_f1 = criterion
        state.best_epoch = state.epoch + 1
        state.best_step = state.global_step
        state.improved_in_epoch = True
        whole = training.stepper.model_to_save()  # every process takes part in gathering a sharded model
        if whole is not None:
            write_dir_atomically(lambda folder: _save_model(training, whole, folder), training.run.model)
    _train_mode(training)


def smoothed_score(earlier: list[float], latest: float, window: int) -> float:
    """The mean of the latest validation score and the `window` − 1 before it. With one or two validation texts
    per label a single score moves by whole points with every text, and the best of many noisy scores is mostly
    luck; a mean over neighbouring points follows the trend (window 1: the latest score alone)."""
    kept = earlier[-(window - 1) :] if window > 1 else []
    return float(np.mean([*kept, latest]))


def validation_macro_f1(
    model: TextClassifier, tokenizer: PreTrainedTokenizerBase, texts: list[str], label_ids: np.ndarray, world: World
) -> float:
    """Macro-F1 on the validation texts, each process predicting its share; rank 0's figure, on every rank."""
    mine, real = world.even_share(len(texts))
    predicted = predict_proba(model, tokenizer, [texts[i] for i in mine]).argmax(1)[:real]
    shares = world.gather((mine[:real], predicted))
    rows = np.concatenate([rows for rows, _ in shares])
    said = np.concatenate([said for _, said in shares])
    f1 = f1_score(label_ids[rows], said, average="macro", labels=range(len(model.spec.labels)), zero_division=0)
    return float(world.broadcast(f1))


def _save_model(training: Training, whole: TextClassifier, folder: Path) -> None:
    with plain_embeddings(whole.torch_encoder):
        whole.save(folder, training.tokenizer)
    heads = {task.name: task.classifier for task in training.tasks[1:]}
    if heads:
        save_task_heads(folder, heads)


def checkpoint(training: Training, state: LoopState) -> None:
    """Everything a resumed run needs, written by rank 0 (every process takes part in gathering its parts)."""
    parts = training.stepper.checkpoint_state()
    if not training.world.main:
        return
    save_checkpoint(
        training.run,
        CHECKPOINT,
        {
            **parts,
            "heads": {task.name: task.classifier.head.state_dict() for task in training.tasks[1:]},
            "scheduler": training.scheduler.state_dict(),
            "state": asdict(state),
            "rng": rng_state(),
        },
    )


def _call_back(training: Training, state: LoopState) -> None:
    assert training.callback is not None
    training.callback(state, training.model, training.tokenizer)
    _train_mode(training)


def _train_mode(training: Training) -> None:
    for task in training.tasks:  # validation switched every head (and the shared encoder) to eval mode
        task.classifier.train()
