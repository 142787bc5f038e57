"""The loss terms the classifier loop sums: cross-entropy with the labels, distillation from teachers, outlier
exposure on off-topic messages. Each is a small object the step calls with what it computed; the loop never
asks which terms there are.

Every term returns this process's part of the global batch's loss: the sum of its rows' losses over the whole
batch's normaliser, times the number of processes, because DistributedDataParallel averages the processes'
gradients (`BatchShare.part`). In one process that is the batch mean; under torchrun the parts add up to it,
so N processes take one process's steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from tuneloop.data.clean import clean_text
from tuneloop.data.off_topic import languages_of, off_topic_messages
from tuneloop.evaluate.schema import OutlierExposureReport
from tuneloop.models.classifier import TextClassifier, tokenize
from tuneloop.training.distributed import World

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchShare:
    """This process's share of a global batch: every N-th row (already sorted by length, so the shares have
    similar lengths), or — when the batch has fewer rows than there are processes — a stand-in row that counts
    for nothing, since every process must take part in every step."""

    batch: list[int]
    rows: list[int]
    weight: float
    world: World

    @classmethod
    def of(cls, batch: Sequence[int], world: World) -> BatchShare:
        rows, weight = world.share(batch)
        return cls(list(batch), rows, weight, world)

    def part(self, per_row: torch.Tensor, normaliser: float) -> torch.Tensor:
        """This process's part of a loss whose whole-batch value is (sum of per-row losses) / `normaliser`."""
        return per_row.sum() * (self.weight * self.world.size / normaliser)

    def whole(self, part: torch.Tensor) -> float:
        """The whole batch's value of a loss from each process's `part` (for the log)."""
        return self.world.total(float(part.detach())) / self.world.size


# Token ids of texts → their logits, through the model being trained (under its autocast).
Forward = Callable[[list[list[int]]], torch.Tensor]


@dataclass(frozen=True)
class StepInputs:
    """What a loss term sees of one step: the task's batch share, the model's fp32 logits on it, the step number
    (for seeded draws a resumed run repeats) and the forward pass, for a term that needs other texts."""

    labels: np.ndarray  # the task's training labels, by row
    share: BatchShare
    logits: torch.Tensor
    step: int
    forward: Forward


@dataclass
class CrossEntropy:
    """Cross-entropy with the training labels, label smoothing and optional class weights (a weighted batch's
    normaliser is its rows' weights, as torch's mean reduction has it)."""

    weight: float
    label_smoothing: float
    class_weights: torch.Tensor | None = None

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        share = inputs.share
        weights = None if self.class_weights is None else self.class_weights.to(inputs.logits.device)
        target = torch.as_tensor(inputs.labels[share.rows], device=inputs.logits.device)
        per_row = F.cross_entropy(
            inputs.logits, target, weight=weights, label_smoothing=self.label_smoothing, reduction="none"
        )
        batch_labels = inputs.labels[share.batch]
        normaliser = (
            float(len(batch_labels))
            if self.class_weights is None
            else float(self.class_weights[torch.as_tensor(batch_labels)].sum())
        )
        return share.part(per_row, normaliser)


def class_weights(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced set weighs every row 1."""
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    return torch.tensor(len(labels) / (num_labels * np.maximum(counts, 1)), dtype=torch.float32)


@dataclass
class Distillation:
    """KL(teachers ‖ model) at `temperature`, times temperature² so that its gradients keep the size of the
    cross-entropy's whatever the temperature (Hinton et al., 2015); `soft_targets` are the teachers' averaged
    probabilities for every training text (see teachers.py)."""

    weight: float
    soft_targets: torch.Tensor
    temperature: float

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        targets = self.soft_targets[inputs.share.rows].to(inputs.logits.device)
        per_row = distillation_loss(inputs.logits, targets, self.temperature)
        return inputs.share.part(per_row, len(inputs.share.batch))


def distillation_loss(logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per text, KL(teachers ‖ model) at `temperature`, times temperature²."""
    log_student = torch.log_softmax(logits / temperature, dim=-1)
    return F.kl_div(log_student, soft_targets, reduction="none").sum(-1) * temperature**2


@dataclass
class OutlierExposure:
    """Outlier exposure (Hendrycks et al., 2019): each step a few off-topic messages, drawn by seed and step so a
    resumed run draws the same, their answer pulled towards uniform over the labels."""

    weight: float
    messages: list[list[int]]  # token ids of the off-topic messages shown
    per_step: int
    seed: int

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        drawn = np.random.default_rng([self.seed, inputs.step]).choice(
            len(self.messages), size=min(self.per_step, len(self.messages)), replace=False
        )
        share = BatchShare.of(drawn.tolist(), inputs.share.world)  # one process: all of them, weight 1
        logits = inputs.forward([self.messages[i] for i in share.rows]).float()
        return share.part(uniform_target_loss(logits, reduction="none"), len(drawn))


def uniform_target_loss(logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against the uniform distribution over the labels: smallest when the model is equally unsure
    of every label."""
    per_row = -torch.log_softmax(logits, dim=-1).mean(dim=-1)
    return per_row.mean() if reduction == "mean" else per_row


def outlier_exposure(
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: list[str],
    train_embeddings: torch.Tensor,
    embed: Callable[[list[list[int]]], torch.Tensor],
    weight: float,
    max_similarity: float,
    batch_size: int,
    seed: int,
) -> tuple[OutlierExposure | None, OutlierExposureReport]:
    """The term that shows this model the shipped off-topic messages in the data's languages, less those as close
    to a training text as `max_similarity` (a business whose intents cover cooking keeps its recipes in scope),
    or None when none is left; and a record of what was shown and left out, for the report."""
    languages = languages_of(train_texts)
    texts = [clean_text(t) for t in off_topic_messages("train", languages)["text"]]
    ids = tokenize(tokenizer, texts, model.spec)
    off = F.normalize(embed(ids), dim=-1)
    known = F.normalize(train_embeddings, dim=-1)
    closest = torch.cat([(chunk @ known.T).max(dim=1).values for chunk in off.split(512)])
    too_close = (closest >= max_similarity).nonzero().flatten().tolist()
    kept = (closest < max_similarity).nonzero().flatten().tolist()
    record = OutlierExposureReport(
        weight=weight,
        languages=list(languages),
        messages=len(kept),
        left_out_as_too_close=len(too_close),
        examples_left_out=[texts[i] for i in too_close[:10]],
    )
    log.info(
        "outlier exposure: %d off-topic messages (%d left out as too close to the training texts)",
        len(kept),
        len(too_close),
    )
    term = OutlierExposure(weight, [ids[i] for i in kept], max(2, batch_size // 4), seed) if kept else None
    return term, record
