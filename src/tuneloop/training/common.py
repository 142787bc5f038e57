"""What every recipe needs around its training loop: seeding and RNG state, threads, run folders and
checkpoints, AdamW parameter groups, progress, metrics logs, and registering the result.

The loops themselves stay in their recipes (classification, mlm, sft), written out top to bottom.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from transformers.trainer_pt_utils import get_parameter_names

from tuneloop.atomic import write_dir_atomically, write_text_atomically
from tuneloop.config import Recipe, dump_config
from tuneloop.errors import TuneloopError
from tuneloop.registry import Home, ModelVersion, Registry, VersionFolder
from tuneloop.training.distributed import ONE_PROCESS, World

log = logging.getLogger(__name__)

# transformers' Trainer rule: no weight decay on biases and normalisation weights (LayerNorm, RMSNorm).
NO_DECAY_NAMES = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]

# A line of a run's training history (metrics.jsonl, the report's training_history): epoch, step, losses, scores
# and seconds, by name.
HistoryEntry = dict[str, float]


class RngState(TypedDict):
    """Every RNG's state, as a checkpoint holds it."""

    python: tuple[Any, ...]  # random.getstate()
    numpy: dict[str, Any]  # np.random.get_state(legacy=False), its key as a tensor
    torch: torch.Tensor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> RngState:
    """Every RNG's state as tensors and plain types, so a checkpoint loads with torch's weights_only."""
    numpy = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            **numpy,
            "state": {**numpy["state"], "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64))},
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: RngState) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    key = numpy["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy, "state": {**numpy["state"], "key": key}})
    torch.set_rng_state(state["torch"])


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads: the configured number, or every core."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def parameter_groups(
    module: nn.Module, lr: float, weight_decay: float, skip: Iterable[nn.Parameter] = ()
) -> list[dict[str, Any]]:
    """AdamW groups of `module`'s trainable parameters: weight decay on weights, none on biases and norms.

    `skip` leaves out parameters another group already holds (a tied output layer, for instance).
    """
    decayed = set(get_parameter_names(module, [nn.LayerNorm], NO_DECAY_NAMES))
    skipped = {id(p) for p in skip}
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in skipped]
    groups = [
        {"params": [p for n, p in named if n in decayed], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decayed], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


REGISTERING = "registering\n"  # what a run's registered-as mark holds until the registry has committed


def new_run_folder(recipe: Recipe) -> VersionFolder:
    """A fresh folder for one run under the home's runs/, named after the model and the time."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return VersionFolder(Home(recipe.registry.home).runs / f"{recipe.name}-{stamp}")


def runs_of(recipe: Recipe) -> list[VersionFolder]:
    """The run folders of `recipe.name`, oldest first."""
    # The exact stamp pattern, so that runs of "toy-2" never count as runs of "toy".
    own = re.compile(re.escape(recipe.name) + r"-\d{8}-\d{6}-\d{6}")
    runs = sorted(r for r in Home(recipe.registry.home).runs.glob(f"{recipe.name}-*") if own.fullmatch(r.name))
    return [VersionFolder(r) for r in runs]


def latest_run_folder(recipe: Recipe, checkpoint: str) -> VersionFolder:
    """The newest run of `recipe.name` that has `checkpoint` to resume from."""
    resumable = [r for r in runs_of(recipe) if (r.checkpoints / checkpoint).is_file() and not r.registered_as.exists()]
    if not resumable:
        raise TuneloopError(f"no run of '{recipe.name}' to resume under {Home(recipe.registry.home).runs}")
    return resumable[-1]


def resume_folder(recipe: Recipe, resume: str | Path, checkpoint: str) -> VersionFolder:
    """The run `--resume` names: 'latest', or a run folder (which must hold `checkpoint`)."""
    folder = latest_run_folder(recipe, checkpoint) if str(resume) == "latest" else VersionFolder(Path(resume))
    mark = registered_as(folder)
    if mark == REGISTERING:
        raise TuneloopError(
            f"{folder.root} stopped while it was being registered: see tuneloop models list {recipe.name}; if no "
            f"version came from it, delete {folder.registered_as.name} there and resume again"
        )
    if mark is not None:
        raise TuneloopError(f"{folder.root} finished and was registered as {mark.strip()}: nothing to resume")
    if not folder.config.is_file():
        raise TuneloopError(f"{folder.root} is not a tuneloop run folder (no {folder.config.name})")
    if not (folder.checkpoints / checkpoint).is_file():
        raise TuneloopError(f"nothing to resume in {folder.root}: no {folder.checkpoints.name}/{checkpoint}")
    return folder


def start_run(recipe: Recipe, folder: VersionFolder) -> None:
    """Create the run folder with the resolved recipe in it (the run is self-describing from its first step)."""
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.config.write_text(dump_config(recipe), encoding="utf-8")


def save_checkpoint(folder: VersionFolder, filename: str, payload: Mapping[str, object]) -> None:
    """Replace the run's checkpoint folder with one holding `payload` (all or nothing)."""

    def write(staging: Path) -> None:
        staging.mkdir(parents=True)
        torch.save(payload, staging / filename)

    write_dir_atomically(write, folder.checkpoints)


def load_checkpoint(folder: VersionFolder, filename: str) -> dict[str, Any]:
    """A run's checkpoint: tensors and plain types only (weights_only), so a crafted run folder cannot run
    code through pickle; one written before that rule is one clear error."""
    try:
        saved: dict[str, Any] = torch.load(folder.checkpoints / filename, weights_only=True)
        return saved
    except pickle.UnpicklingError as exc:
        raise TuneloopError(
            f"{folder.checkpoints / filename} holds more than tensors and plain values (written by an older "
            f"tuneloop, or not by tuneloop), so it is not loaded; start the run again without --resume"
        ) from exc


def register_run(
    registry: Registry,
    recipe: Recipe,
    run: VersionFolder,
    *,
    base_model: str,
    fingerprint: str,
    metrics: dict[str, Any],
    keep_checkpoints: int,
    parent: str | None = None,
) -> ModelVersion:
    """The run's folder as a new candidate version of `recipe.name`, with the recipe it was trained with;
    then finished runs beyond the newest `keep_checkpoints` are deleted (see prune_finished_runs)."""
    # Marked first: a process killed between the registry's commit and the final mark leaves a run that
    # --resume will not continue (it would register the same training twice).
    write_text_atomically(run.registered_as, REGISTERING)
    try:
        version = registry.register(
            recipe.name,
            run,
            base_model=base_model,
            data_fingerprint=fingerprint,
            config=recipe.stored(),
            metrics=metrics,
            parent=parent,
        )
    except TuneloopError:
        run.registered_as.unlink(missing_ok=True)  # nothing was stored: the run stays resumable
        raise
    write_text_atomically(run.registered_as, version.ref + "\n")
    prune_finished_runs(recipe, keep_checkpoints)
    return version


def registered_as(run: VersionFolder) -> str | None:
    """NAME@VERSION the run became, REGISTERING if it stopped while being registered, None if it was not."""
    try:
        return run.registered_as.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def prune_finished_runs(recipe: Recipe, keep: int) -> list[Path]:
    """Delete the run folders of `recipe.name` that were registered, all but the newest `keep`.

    A registered run's folder is a copy of its version's folder plus its last checkpoint (for an e5 encoder,
    weights and two AdamW moments: over a gigabyte), so without this every retrain would leave one behind.
    A run that was not registered is never touched: it is either training now or what --resume continues.
    Each folder is first renamed out of the runs' naming pattern, so a process killed half-way through the
    deletion leaves nothing that looks like a run; such leftovers go the next time.
    """
    runs = Home(recipe.registry.home).runs
    finished = [r for r in runs_of(recipe) if registered_as(r) not in (None, REGISTERING)]
    doomed = finished[: len(finished) - keep] if keep else finished
    deleted = []
    for folder in doomed:
        trash = runs / f".deleting-{uuid.uuid4().hex}"
        try:
            os.rename(folder.root, trash)
        except FileNotFoundError:
            continue  # another process finishing a run of the same model got there first
        deleted.append(folder.root)
    for leftover in runs.glob(".deleting-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if deleted:
        log.info("deleted %d finished run folder(s) of %s (train.keep_checkpoints=%d)", len(deleted), recipe.name, keep)
    return deleted


@torch.no_grad()
def mean_token_loss(
    loss_and_count: Callable[..., tuple[torch.Tensor, int]],
    module: nn.Module,
    batches: Sequence[tuple[torch.Tensor, ...]],
    world: World = ONE_PROCESS,
) -> float:
    """Loss per counted token over held-out batches, each rank scoring every N-th batch and the sums added up
    over the ranks (a model's own mean is per batch, so weight by counts)."""
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches[world.rank :: world.size]:
            loss, counted = loss_and_count(*batch)
            total += float(loss) * counted
            count += counted
    module.train()
    return world.total(total) / max(world.total(count), 1)


class MetricsLog:
    """metrics.jsonl, one line per scoring point, and the same scalars for TensorBoard when it is installed
    (`pip install 'tuneloop[tensorboard]'`)."""

    def __init__(self, folder: VersionFolder, prefix: str = "") -> None:
        self.file = folder.metrics.open("a", encoding="utf-8")
        self.prefix = prefix
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(folder.tensorboard))

    def record(self, entry: HistoryEntry) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in entry.items():
                if isinstance(value, int | float) and key not in ("epoch", "step"):
                    self.writer.add_scalar(self.prefix + key, value, entry["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


@dataclass
class TrainingProgress:
    """Progress of a training loop: a live bar on a terminal; anywhere else (CI, nohup, a log file) a plain
    line at every 5% of the steps and at least once a minute, with the loss and the time left.

    Without the lines a run under a non-terminal printed nothing until it ended, for many minutes.
    """

    description: str
    total: int
    completed: int = 0
    show: bool = True
    console: Console = field(default_factory=lambda: Console(stderr=True))
    _bar: Progress | None = field(default=None, init=False, repr=False)
    _task: TaskID | None = field(default=None, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)
    _reported_at: float = field(default=0.0, init=False, repr=False)
    _reported_step: int = field(default=0, init=False, repr=False)
    _first_step: int = field(default=0, init=False, repr=False)  # a resumed run's steps before this process

    LINE_EVERY_SECONDS = 60.0

    def __enter__(self) -> TrainingProgress:
        self._started = self._reported_at = time.monotonic()
        self._reported_step = self._first_step = self.completed
        if self.show and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.3f}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed, loss=0.0)
        return self

    def step(self, loss: float, description: str | None = None) -> None:
        self.completed += 1
        if description:
            self.description = description
        if self._bar is not None:
            assert self._task is not None  # added with the bar
            self._bar.update(self._task, advance=1, loss=loss, description=self.description)
        elif self.show:
            now = time.monotonic()
            every = max(1, self.total // 20)
            if (
                self.completed - self._reported_step >= every
                or now - self._reported_at >= self.LINE_EVERY_SECONDS
                or self.completed == self.total
            ):
                self._line(loss, now)

    def _line(self, loss: float, now: float) -> None:
        elapsed = now - self._started
        done = self.completed - self._first_step
        left = elapsed / done * (self.total - self.completed) if done else 0.0
        self.console.print(
            f"{self.description}: step {self.completed}/{self.total} "
            f"({self.completed / max(self.total, 1):.0%}), loss {loss:.3f}, "
            f"{_clock(elapsed)} elapsed, {_clock(left)} left",
            highlight=False,
            soft_wrap=True,
        )
        self._reported_at, self._reported_step = now, self.completed

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


def scaled_step(
    loss: torch.Tensor,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parameters: list[torch.Tensor],
) -> None:
    """One optimiser step of a recipe that keeps its own loop (pretrain, sft): backward through the gradient
    scaler (fp16 on GPUs; disabled, it passes everything through), gradients clipped to norm 1 once unscaled."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
