"""Teachers for distillation (`train.teachers`): registered versions, or version folders, trained on the same
labels, whose averaged answers on the training texts a model also learns (the loss term is
`losses.Distillation`). A fewer-layer student of a deeper teacher trains and serves faster; one model from
several seeds' ensemble keeps most of the ensemble's accuracy at one model's cost.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch

from tuneloop.config import ClassifierRecipe
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.schema import DistillationReport
from tuneloop.models.predictor import load_model, locate_model
from tuneloop.registry import Registry

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _as_teacher(ref: str) -> Iterator[None]:
    """A teacher that does not resolve or load is named as one of train.teachers; the registry's or loader's
    own message says what is wrong with it."""
    try:
        yield
    except TuneloopError as exc:
        raise type(exc)(f"train.teachers: {ref}: {exc}") from None


def check_teachers(recipe: ClassifierRecipe, registry: Registry) -> None:
    """Every teacher names a registered version or a model folder: said before the data is prepared."""
    for ref in recipe.train.teachers:
        with _as_teacher(ref):
            locate_model(ref, registry)


def teacher_targets(
    recipe: ClassifierRecipe, texts: list[str], labels: list[str], train_labels: np.ndarray
) -> tuple[torch.Tensor, DistillationReport]:
    """The teachers' soft labels for the training texts: each teacher's softmax at train.distill_temperature,
    columns in this model's label order, averaged over the teachers; and a record of who taught."""
    tc = recipe.train
    registry = Registry(recipe.registry)
    summed = np.zeros((len(texts), len(labels)))
    names = []
    for ref in tc.teachers:
        # fp32 ONNX Runtime: the teacher's own answers, about twice as fast as PyTorch on a CPU.
        with _as_teacher(ref):
            teacher = load_model(ref, registry, runtime="onnx", threads=tc.threads)
        missing = sorted(set(labels) - set(teacher.labels))
        if missing or len(teacher.labels) != len(labels):
            raise TuneloopError(
                f"train.teachers: {teacher.ref} was trained on other labels than this data's "
                f"({'it lacks ' + ', '.join(missing[:5]) if missing else 'it has ' + str(len(teacher.labels))}); "
                "distil only from versions trained on the same labels"
            )
        order = [teacher.labels.index(label) for label in labels]
        logits = teacher.own_logits(teacher.logits(texts))[:, order]
        summed += torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / tc.distill_temperature, -1).numpy()
        names.append(teacher.ref)
    soft = torch.as_tensor(summed / len(tc.teachers), dtype=torch.float32)
    record = DistillationReport(
        teachers=names,
        weight=tc.distill_weight,
        temperature=tc.distill_temperature,
        # How far the teachers are from the training labels: where they disagree, the soft labels pull the
        # model away from a label that may be wrong.
        teachers_agree_with_training_labels=round(float((soft.argmax(1).numpy() == train_labels).mean()), 4),
    )
    log.info(
        "distillation from %s: they agree with %.2f%% of the training labels",
        ", ".join(names),
        100 * record.teachers_agree_with_training_labels,
    )
    return soft, record
