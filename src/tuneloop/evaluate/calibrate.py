"""Temperature scaling (Guo et al., 2017): one number that divides a classifier's logits so that its
probabilities say how often it is right, fitted on the validation split at the end of training.

A fine-tuned encoder is usually over-confident (a cosine head's scale of 25 makes most answers look ~99%
sure), while three decisions read its probabilities: the assistant's out-of-scope threshold, escalation below
`escalation.min_confidence`, and the report's possible label errors. The temperature is stored in the
version's head spec, so every path that loads the version (predict, the server, the gate, the assistant)
applies it; dividing all logits by one positive number never changes which label wins.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from tuneloop.atomic import write_text_atomically
from tuneloop.evaluate.metrics import calibration
from tuneloop.evaluate.schema import TemperatureFit
from tuneloop.models.classifier import META_FILE, TASKS_FILE, softmax, task_specs_json
from tuneloop.models.predictor import Predictor, load_unchecked
from tuneloop.registry import VersionFolder

log = logging.getLogger(__name__)

# Fewer validation rows than this and one fitted number would follow the noise of a handful of texts.
MIN_ROWS = 30
# The search range: from 4x sharper to 20x flatter than the trained logits. Fine-tuned encoders are
# over-confident (T > 1); a sharper temperature than this would push float32 probabilities to exactly 1, and
# the assistant's out-of-scope threshold could no longer tell answers apart.
BOUNDS = (1 / 4, 20.0)


def fit_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of `truth` under softmax(logits / T)."""

    def nll(log_t: float) -> float:
        scaled = log_softmax(logits / np.exp(log_t), axis=1)
        return float(-scaled[np.arange(len(truth)), truth].mean())

    fitted = minimize_scalar(nll, bounds=tuple(np.log(BOUNDS)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(fitted.x))


def calibrate_head(predictor: Predictor, val: pd.DataFrame, bins: int) -> TemperatureFit:
    """Fit the temperature of `predictor`'s own head on `val` and set it on its spec; what was fitted, or why not."""
    spec = predictor.spec
    index = {label: i for i, label in enumerate(spec.labels)}
    known = val[val["label"].isin(index)]
    if len(known) < MIN_ROWS:
        spec.temperature = 1.0
        return TemperatureFit(
            temperature=1.0,
            fitted=False,
            reason=f"{len(known)} validation rows, fewer than the {MIN_ROWS} a temperature is fitted on",
        )
    # Fitted on the trained logits, whatever an earlier fit set: the predictor's are divided by its temperature.
    logits = predictor.own_logits(predictor.logits(known["text"].tolist())) * spec.temperature
    spec.temperature = 1.0
    truth = known["label"].map(index).to_numpy()
    correct = logits.argmax(1) == truth
    if correct.all():
        # Without a single error the likelihood only grows as the temperature falls: there is no fit to find.
        return TemperatureFit(temperature=1.0, fitted=False, reason="the model is right on every validation row")
    temperature = fit_temperature(logits, truth)
    before = calibration(softmax(logits).max(1), correct, bins).ece
    after = calibration(softmax(logits / temperature).max(1), correct, bins).ece
    spec.temperature = temperature
    return TemperatureFit(
        temperature=temperature, fitted=True, rows=len(known), val_ece_before=before, val_ece_after=after
    )


def calibrate_run(run: VersionFolder, vals: dict[str, pd.DataFrame], bins: int) -> dict[str, TemperatureFit]:
    """Fit a temperature for each task's head of the run's model on its validation split (`vals`: task name →
    split, the model's own task first) and store them in the model's specs. Returns task → record."""
    # In PyTorch: the same logits as fp32 ONNX, and no export made before the specs it is keyed by change.
    predictor = load_unchecked(run, "torch")
    own, *others = vals
    records = {}
    for task, val in vals.items():
        records[task] = calibrate_head(predictor if task == own else predictor.head(task), val, bins)
        log.info("calibration%s: %s", f" of task {task}" if task else "", records[task])
    write_text_atomically(run.model / META_FILE, predictor.spec.to_json())
    if others:
        write_text_atomically(run.model / TASKS_FILE, task_specs_json(predictor.tasks))
    return records
