"""What a classifier's report holds, as typed models: written to report.json, read back from it, and read by the
report page, the registry's headline metrics, the CLI and the benchmarks by field, never by string key.

Every model keeps keys it does not know (`extra="allow"`), so a report written by a newer tuneloop still loads;
fields added over time are optional, so one written by an older tuneloop loads too. A report is written with
the fields that were set, so report.json keeps its shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from tuneloop.errors import TuneloopError, first_line


class ReportPart(BaseModel):
    model_config = ConfigDict(extra="allow")


class CalibrationBin(ReportPart):
    low: float
    high: float
    count: int
    confidence: float | None = None
    accuracy: float | None = None


class Calibration(ReportPart):
    """Expected calibration error and the reliability diagram's bins."""

    ece: float
    bins: list[CalibrationBin]


class ClassScores(ReportPart):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


class Confusion(ReportPart):
    true: str
    predicted: str
    count: int
    examples: list[str]


class Suspect(ReportPart):
    text: str
    label: str
    predicted: str
    probability: float


class LabelSuspects(ReportPart):
    """Rows whose given label the model contradicts with at least `confidence`, most confident first."""

    confidence: float
    count: int
    share: float
    rows: list[Suspect]


class Leakage(ReportPart):
    """The scored rows with a near-duplicate in training, and the accuracy on them and on the rest."""

    rows: int
    accuracy_leaked: float | None = None
    accuracy_not_leaked: float | None = None


class SkippedLabels(ReportPart):
    labels: list[str]
    rows: int


class SplitScores(ReportPart):
    """A split's metrics as the version serves it."""

    n: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    per_class: list[ClassScores]
    confusion_matrix: list[list[int]]
    calibration: Calibration
    top_confusions: list[Confusion]
    label_suspects: LabelSuspects | None = None  # absent from reports written before it existed
    leakage: Leakage | None = None
    calibration_before: Calibration | None = None  # with a fitted temperature: what the model said before it
    temperature: float | None = None
    skipped_unknown_labels: SkippedLabels | None = None


class Overfitting(ReportPart):
    train_accuracy: float
    test_accuracy: float
    train_macro_f1: float
    test_macro_f1: float
    accuracy_gap: float
    train_rows_scored: int
    likely_overfitting: bool


class TemperatureFit(ReportPart):
    """What temperature scaling fitted on the validation split, or why it fitted none."""

    temperature: float
    fitted: bool
    reason: str | None = None
    rows: int | None = None
    val_ece_before: float | None = None
    val_ece_after: float | None = None


class Processes(ReportPart):
    """A torchrun launch: how many processes trained, how, and how many scored the test split."""

    count: int
    strategy: str
    test_scored_by: int


class PrivacyReport(ReportPart):
    """The guarantee a train.dp run ends with (training/private.py)."""

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str


class OutlierExposureReport(ReportPart):
    """Which shipped off-topic messages train.outlier_exposure showed the model, and which it left out."""

    weight: float
    languages: list[str]
    messages: int
    left_out_as_too_close: int
    examples_left_out: list[str]


class DistillationReport(ReportPart):
    """Who taught a train.teachers run, and how."""

    teachers: list[str]
    weight: float
    temperature: float
    teachers_agree_with_training_labels: float


class ContrastiveReport(ReportPart):
    """The few-shot regime's contrastive stage (training/contrastive.py): what it ran and how its loss moved."""

    steps: int
    seconds: float
    loss_first: float | None = None  # mean of the first ten steps
    loss_last: float | None = None  # mean of the last ten
    labels_per_batch: int
    texts_per_label: int
    temperature: float
    lr: float


class TrainingRegime(ReportPart):
    """Which regime trained the model — standard or few-shot (training/regime.py) — and why."""

    name: str
    why: str
    median_per_label: float
    min_steps: int | None = None
    smoothing: int = 1
    epochs: int | None = None  # the loop's epochs: enough for min_steps (few-shot: 0 when it runs no loop)
    label_names_added: int = 0
    contrastive: ContrastiveReport | None = None


class Fold(ReportPart):
    fold: int
    val_macro_f1: float | None
    best_epoch: int


class CrossValidationReport(ReportPart):
    """data.kfold: one model per fold; the best fold's model became the run's."""

    k: int
    folds: list[Fold]
    mean_val_macro_f1: float
    std_val_macro_f1: float
    selected_fold: int


class Standing(ReportPart):
    """A model's accuracy and macro-F1 on one split."""

    n: int
    accuracy: float
    macro_f1: float


class Contender(ReportPart):
    """One model of the baseline comparison, on the validation and test splits."""

    validation: Standing | None = None
    test: Standing | None = None


class HybridChoice(ReportPart):
    """The blend of transformer and baseline probabilities: its weight, chosen on the validation split, and
    whether it won. `validation` is cross-fitted (the weight tuned on one half, scored on the other, both ways),
    so the gain is not the weight's own fit."""

    transformer_weight: float
    validation: Standing
    test: Standing | None = None
    gain: float  # validation macro-F1 over the transformer's
    min_gain: float  # train.hybrid_min_gain


class BaselineReport(ReportPart):
    """The classical baseline fitted on the run's training split (train.baseline), beside the transformer; what
    the version serves, and why."""

    method: str
    features: int
    fit_seconds: float
    ms_per_text: float  # predicting the test split, on this machine
    baseline: Contender
    transformer: Contender | None = None  # None when the baseline alone was trained (train.baseline=only)
    hybrid: HybridChoice | None = None
    served: Literal["transformer", "hybrid", "baseline"]
    reason: str


class LongTextsReport(ReportPart):
    """How texts longer than model.max_length were read (model.truncation), why, and what it costs."""

    truncation: str  # head, head_tail or windows
    reason: str
    max_length: int
    longer_share: float  # of the training texts, longer than max_length tokens
    training_rows_per_text: float  # rows the training split became (windows: each window is a row)
    passes_per_test_text: float  # encoder passes per test text (1 but with windows)


class ClassifierReport(ReportPart):
    """A version's test report (and, for a multi-task model, each other task's, in `tasks`)."""

    title: str
    labels: list[str]
    base_model: str = ""
    test: SplitScores
    overfitting: Overfitting | None = None
    training_history: list[dict[str, Any]] | None = None
    serving: dict[str, Any] | None = None  # the serving record (evaluate/serving.py): what was scored
    processes: Processes | None = None
    explanations: list[dict[str, Any]] | None = None
    calibration: TemperatureFit | None = None
    tasks: dict[str, ClassifierReport] | None = None
    train_seconds: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    device: str | None = None  # where it trained, and in which precision
    data: dict[str, Any] | None = None  # the data report (data/prepare.py)
    cross_validation: CrossValidationReport | None = None
    privacy: PrivacyReport | None = None
    outlier_exposure: OutlierExposureReport | None = None
    distillation: DistillationReport | None = None
    regime: TrainingRegime | None = None
    baseline: BaselineReport | None = None
    long_texts: LongTextsReport | None = None

    def to_json(self) -> str:
        # The free-form parts (the data report) can hold numpy scalars: a waimai_10k run's held an int64.
        return json.dumps(self.model_dump(exclude_unset=True), indent=2, ensure_ascii=False, default=_plain)

    def other_tasks(self) -> dict[str, ClassifierReport]:
        return self.tasks or {}


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} in the report cannot be written as JSON")


def read_report(path: Path) -> ClassifierReport:
    """A report.json (of any tuneloop version); one clear error for a file that is not one."""
    try:
        return ClassifierReport.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise TuneloopError(f"{path} is not a tuneloop report ({first_line(exc)}); evaluate the version again") from exc
