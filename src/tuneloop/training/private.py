"""Differentially private fine-tuning (`train.dp`): DP-SGD as Opacus implements it.

Each step draws its batch by Poisson sampling (every training text joins with probability q = batch/n), clips
every text's gradient to `max_grad_norm`, sums, adds Gaussian noise whose scale follows from the target
ε and δ for the planned number of steps, and steps the optimiser; the accountant counts the ε actually spent.
The class vectors may start at the training texts' centroids with Gaussian noise added (a Gaussian mechanism
counted in the same ε: each text adds one unit vector to its class's sum), since a pretrained sentence encoder's
centroids already classify well (Banking77, MiniLM: 84.9% noise-free, 80.3% at the default noise multiplier 2).
Per-example gradient norms come from Opacus's ghost clipping when many weights train (full fine-tuning): it never
holds one gradient per text, at the price of a second backward pass (MiniLM, 2 cores, physical batches of 32
mixed-length texts: 26 ms per text against 45 ms with per-example gradients, 15 ms non-private). With few
trainable weights (LoRA) per-example gradients are small and that second pass is the larger cost, so they are
computed directly (LoRA on MiniLM, one thread: 28 ms per text against 37 ms with ghost clipping, 24 ms
non-private). A step's batch is sorted by length before it is cut into physical batches (19.5 ms per text
instead of 43 with ghost clipping on the same Poisson batches).

What the guarantee covers: the weights, with respect to any one training text. So nothing else may read the
training texts to shape the model without noise: the class vectors start at noisy centroids or at random,
the loss is not weighted by class counts, the embedding tables are frozen (which rows a
text's tokens touch is itself information; Hugging Face encoders also feed position ids shared by the whole
batch, which per-example gradients cannot split), and one recipe trains one task (k-fold and multi-task
runs would spend the budget several times over). The validation split picks the best epoch, as usual.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import IAccountant, create_accountant
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from tuneloop.config import ClassifierRecipe, DPConfig, TrainConfig
from tuneloop.errors import TuneloopError, first_line
from tuneloop.evaluate.schema import PrivacyReport
from tuneloop.models.classifier import TextClassifier, pad_right
from tuneloop.profiling import stage
from tuneloop.training.devices import DevicePlan
from tuneloop.training.loop import Task

log = logging.getLogger(__name__)

# (logits, targets) of the texts at these indices of the training split
# Above this many trainable weights, ghost clipping (see the module's docstring).
GHOST_CLIPPING_ABOVE = 2_000_000
Forward = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]


@contextmanager
def _accounting() -> Iterator[None]:
    """The accountants' numerics warn on the way to a correct answer (log(1 - q) at q = 1 for the centroid
    release, the edge of RDP's orders inside PRV's bounds): not the user's business."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        yield


def check_private_recipe(recipe: ClassifierRecipe, train_size: int) -> None:
    """One clear error for a recipe DP-SGD cannot train with the privacy it promises."""
    train = recipe.train
    if recipe.tasks:
        raise TuneloopError(
            "train.dp trains one task: a multi-task run would spend the privacy budget once per task; "
            "train each task on its own"
        )
    if recipe.data.kfold:
        raise TuneloopError(
            "train.dp cannot run with data.kfold: k models on overlapping data spend the budget k times; "
            "unset data.kfold"
        )
    if train.class_weighted:
        raise TuneloopError(
            "train.dp cannot weight the loss by class counts (the counts are not private); "
            "set train.class_weighted=false"
        )
    if train.batch_size >= train_size:
        raise TuneloopError(
            f"train.dp: train.batch_size ({train.batch_size}) must be smaller than the training split "
            f"({train_size} texts): each text joins a batch with probability batch_size / texts"
        )


def freeze_embedding_tables(model: nn.Module) -> None:
    """Freeze every embedding table (word, position, token type): see the module's docstring for why."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight.requires_grad_(False)


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Poisson batches per epoch: an epoch sees each text once in expectation."""
    return max(1, round(train_size / batch_size))


class PrivateState(TypedDict):
    """What a checkpoint holds of a private run besides the model and optimiser."""

    accountant: dict[str, Any]  # Opacus's accountant's state
    generator: torch.Tensor  # the batch sampler's generator, now
    generator_at_epoch_start: torch.Tensor


class PrivateTraining:
    """The model, optimiser and loss of one run, made private; the training loop asks it for batches and steps.

    The optimiser passed in keeps its parameter groups and state (the learning-rate scheduler and checkpoints
    use it as before); steps go through `step`.
    """

    def __init__(
        self,
        settings: DPConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        text_lengths: Sequence[int],
        batch_size: int,
        total_steps: int,
        seed: int,
        centroid_init: bool = False,
    ) -> None:
        self.settings = settings
        # Tokens in each training text: their number is n, and a step's texts are batched by length.
        self.text_lengths = text_lengths
        train_size = len(text_lengths)
        self.delta = settings.delta if settings.delta is not None else 1.0 / train_size
        self.sample_rate = batch_size / train_size
        self.steps_per_epoch = steps_per_epoch(train_size, batch_size)
        # What the run will release besides its DP-SGD steps: the noisy centroids, once, over all texts.
        self.centroid_noise = settings.centroid_noise if centroid_init else None
        self.releases = [(self.centroid_noise, 1.0, 1)] if self.centroid_noise else []
        try:
            self.noise_multiplier = self._noise_for_budget(total_steps)
        except ValueError as exc:
            raise TuneloopError(
                f"train.dp.epsilon={settings.epsilon} cannot be reached in {total_steps} steps at batch "
                f"{batch_size} of {train_size} texts ({first_line(exc)}); raise the budget, train fewer steps "
                f"or count with train.dp.accountant=rdp"
            ) from exc
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.ghost_clipping = trainable > GHOST_CLIPPING_ABOVE
        try:
            self.module: GradSampleModule = (
                GradSampleModuleFastGradientClipping(
                    model, max_grad_norm=settings.max_grad_norm, use_ghost_clipping=True, loss_reduction="mean"
                )
                if self.ghost_clipping
                else GradSampleModule(model, loss_reduction="mean")
            )
        except NotImplementedError as exc:
            raise TuneloopError(
                f"train.dp: this model has a trainable layer DP-SGD cannot train privately ({_layers(exc)}); "
                f"layers that keep statistics across texts (batch norm) mix examples and break per-text clipping"
            ) from exc
        self.optimizer = (DPOptimizerFastGradientClipping if self.ghost_clipping else DPOptimizer)(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
        )
        self.accountant: IAccountant = create_accountant(settings.accountant)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        # Ghost clipping's loss runs both backward passes; otherwise the hooks collect per-text gradients.
        self.loss = (
            DPLossFastGradientClipping(self.module, self.optimizer, loss_fn, loss_reduction="mean")
            if self.ghost_clipping
            else loss_fn
        )
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_start = self.generator.get_state()
        log.info(
            "DP-SGD: noise multiplier %.3f for ε=%s, δ=%.2e over %d steps (sample rate %.4f)",
            self.noise_multiplier,
            settings.epsilon,
            self.delta,
            total_steps,
            self.sample_rate,
        )

    def _noise_for_budget(self, steps: int) -> float:
        """The smallest noise multiplier whose steps, after the other releases, spend at most the budget
        (bisection as in Opacus's get_noise_multiplier, which cannot count releases besides the steps)."""
        target = self.settings.epsilon

        def spent(sigma: float) -> float:
            accountant = create_accountant(self.settings.accountant)
            accountant.history = [*self.releases, (sigma, self.sample_rate, steps)]
            with _accounting():
                try:
                    return float(accountant.get_epsilon(delta=self.delta))
                except RuntimeError:  # PRV's discretisation fails for tiny noise: count it as over budget
                    return math.inf

        low, high = 0.0, 10.0
        while spent(high) > target:
            high *= 2
            if high > 1e6:
                raise ValueError("the other releases alone spend more than the budget")
        while high - low > 1e-3 * high:
            middle = (low + high) / 2
            low, high = (middle, high) if spent(middle) > target else (low, middle)
        return high

    @torch.no_grad()
    def noisy_centroids(self, embeddings: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """Each class's sum of unit-length text embeddings plus Gaussian noise: one text moves one sum by at
        most 1, so the noise multiplier is the noise's standard deviation. Counted by the accountant."""
        assert self.centroid_noise is not None
        sums = torch.zeros(classes, embeddings.shape[1]).index_add_(0, labels, F.normalize(embeddings.float(), dim=-1))
        self.accountant.history.extend(self.releases)  # what the noise multiplier was planned for
        return sums + self.centroid_noise * torch.randn(sums.shape)

    def epoch_batches(self) -> list[list[int]]:
        """This epoch's Poisson batches (drawn at once, so that a resumed run draws the same ones)."""
        self._epoch_start = self.generator.get_state()
        sampler = UniformWithReplacementSampler(
            num_samples=len(self.text_lengths),
            sample_rate=self.sample_rate,
            generator=self.generator,
            steps=self.steps_per_epoch,
        )
        return [list(batch) for batch in sampler]

    def step(self, forward: Forward, batch: list[int]) -> float:
        """One DP-SGD step on a Poisson batch: physical chunks whose clipped gradients add up, then one noisy
        update. Returns the summed loss of the batch's texts."""
        chunk = self.settings.physical_batch_size
        # Texts of similar length share a forward pass, so little of it is padding (a Poisson batch is a random
        # mix of lengths); the step's sum of clipped gradients does not depend on the order.
        batch = sorted(batch, key=self.text_lengths.__getitem__)
        parts = [batch[i : i + chunk] for i in range(0, len(batch), chunk)]
        total = 0.0
        for index, part in enumerate(parts):
            logits, target = forward(part)
            loss = self.loss(logits.float(), target)
            with warnings.catch_warnings():
                # Frozen embeddings: the first layer norm's input needs no gradient, which torch points out.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            total += loss.item() * len(part)
            self.optimizer.signal_skip_step(do_skip=index < len(parts) - 1)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not parts:  # nobody sampled: the update is noise alone, and the accountant still counts the step
            for group in self.optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = torch.zeros_like(parameter)
                    parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total

    def spent(self) -> PrivacyReport:
        """The guarantee the run has spent so far (its report and registry row)."""
        steps = sum(count for _, rate, count in self.accountant.history if rate < 1.0)
        with _accounting():
            epsilon = self.accountant.get_epsilon(delta=self.delta) if self.accountant.history else 0.0
        return PrivacyReport(
            epsilon=float(epsilon),
            delta=self.delta,
            target_epsilon=self.settings.epsilon,
            noise_multiplier=float(self.noise_multiplier),
            max_grad_norm=self.settings.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=steps,
            accountant=self.settings.accountant,
        )

    def state_dict(self) -> PrivateState:
        return {
            "accountant": self.accountant.state_dict(),
            "generator": self.generator.get_state(),
            "generator_at_epoch_start": self._epoch_start,
        }

    def load_state_dict(self, state: PrivateState, mid_epoch: bool) -> None:
        """Continue a checkpointed run: the ε spent so far and, in the middle of an epoch, that epoch's
        batches drawn again as they were (a finished epoch's are never drawn twice: batches must be
        independent draws for the accountant's count to hold)."""
        self.accountant.load_state_dict(state["accountant"])
        self.generator.set_state(state["generator_at_epoch_start"] if mid_epoch else state["generator"])


class PrivateStepper:
    """The loop's stepper for DP-SGD: one task, Poisson batches drawn by `PrivateTraining`, each step its noisy
    clipped update; the cross-entropy is the only loss (nothing else may read the training texts without noise)."""

    def __init__(
        self,
        task: Task,
        plan: DevicePlan,
        pad_id: int,
        optimizer: torch.optim.Optimizer,
        train: TrainConfig,
        centroid_init: bool,
    ) -> None:
        assert train.dp is not None
        self.task, self.plan, self.pad_id, self.optimizer = task, plan, pad_id, optimizer
        per_epoch = steps_per_epoch(len(task.train_ids), train.batch_size)
        self.private = PrivateTraining(
            train.dp,
            task.classifier,
            optimizer,
            torch.nn.CrossEntropyLoss(label_smoothing=train.label_smoothing),
            [len(ids) for ids in task.train_ids],
            train.batch_size,
            per_epoch * train.epochs,
            train.seed,
            centroid_init=centroid_init,
        )

    def start_head(self, embeddings: torch.Tensor) -> None:
        """A fresh run's class vectors: the training centroids plus noise (counted in ε), when the recipe asks."""
        if self.private.centroid_noise:
            labels = torch.tensor(self.task.train_labels)
            self.task.classifier.set_class_vectors(
                self.private.noisy_centroids(embeddings, labels, len(self.task.classifier.spec.labels))
            )

    def steps_per_epoch(self, tasks: list[Task]) -> int:
        return self.private.steps_per_epoch

    def epoch_batches(self, tasks: list[Task], epoch: int) -> list[tuple[Task, list[int]]]:
        return [(self.task, batch) for batch in self.private.epoch_batches()]

    def step(self, task: Task, batch: list[int], step: int) -> float:
        def forward(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            input_ids, mask = pad_right([task.train_ids[i] for i in rows], self.pad_id)
            logits = task.classifier(self.plan.to_device(input_ids), self.plan.to_device(mask))
            return logits, torch.as_tensor(task.train_labels[rows], device=logits.device)

        with stage("dp step"):  # forward, backward, per-text clipping, noise and the step
            total = self.private.step(forward, batch)
        return total / len(batch) if batch else 0.0

    def model_to_save(self) -> TextClassifier:
        return self.task.classifier

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.task.classifier.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "private": self.private.state_dict(),
        }

    def load_checkpoint_state(self, saved: dict[str, Any], mid_epoch: bool) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.private.load_state_dict(saved["private"], mid_epoch=mid_epoch)

    def privacy(self) -> PrivacyReport:
        return self.private.spent()


def _layers(exc: NotImplementedError) -> str:
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else [exc]
    return "; ".join(first_line(error) for error in errors)
