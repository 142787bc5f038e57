"""Which runtime a run will serve with, decided at the end of training by measuring it.

The export (and an int8 copy, when the recipe asks for one) is built in the run folder, so it is registered
with the version; the int8 copy is kept only if its labels agree with fp32's on the validation split and its
test accuracy stays close. The decision is written to the run's serving record, which `load_model` follows:
the test report, the promotion gate and the server then all run what was checked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from typing import NotRequired, TypedDict

import numpy as np

from tuneloop.atomic import atomic_file
from tuneloop.config import ServingConfig
from tuneloop.data.prepare import PreparedData
from tuneloop.models.baseline import Blend
from tuneloop.models.onnx_encoder import INT8_FILE
from tuneloop.models.predictor import Predictor, ServingRecord, load_unchecked, onnx_cache, top_two_gap
from tuneloop.registry import VersionFolder

log = logging.getLogger(__name__)
# Past this share of texts run again in fp32, int8 with a fallback is no faster than fp32 alone.
MAX_FALLBACK_SHARE = 0.3
# Agreement compares int8's labels with fp32's, so any text measures it: a validation split smaller than this (a
# few-shot run has one or two texts per label) is topped up with training texts, so that the verdict does not rest
# on a handful of texts.
MIN_AGREEMENT_TEXTS = 200


class Int8Check(TypedDict):
    """One plan for serving int8 as the serving record keeps it (under "int8", and each tried under "int8_tried")."""

    plan: str
    agreement: float  # with fp32's labels on the validation split (topped up with training texts: see checked)
    fp32_accuracy: float
    int8_accuracy: float
    accepted: bool
    reason: str
    fallback_margin: NotRequired[float]  # with an fp32 fallback for close calls
    fallback_share: NotRequired[float]
    checked: NotRequired[dict[str, int]]  # the texts the agreement was measured on: validation, training


def int8_verdict(
    agreement: float,
    fp32_accuracy: float,
    int8_accuracy: float,
    settings: ServingConfig,
    checked: str = "the validation split",
) -> tuple[bool, str]:
    """Whether an int8 copy may serve, and why in one phrase (the report and the server log show it); `checked`
    names the texts the agreement was measured on."""
    drop = fp32_accuracy - int8_accuracy
    if agreement < settings.int8_min_agreement:
        return False, (
            f"it labels {agreement:.2%} of {checked} as fp32 does, "
            f"below serving.int8_min_agreement={settings.int8_min_agreement:.2%}"
        )
    if drop > settings.int8_max_accuracy_drop + 1e-9:  # exactly at the limit passes, whatever the float rounding
        return False, (
            f"its test accuracy is {drop * 100:.2f} points below fp32's "
            f"(serving.int8_max_accuracy_drop={settings.int8_max_accuracy_drop * 100:.2f} points)"
        )
    return True, (
        f"agrees with fp32 on {agreement:.2%} of {checked}; test accuracy {int8_accuracy:.2%} "
        f"(fp32 {fp32_accuracy:.2%})"
    )


def describe(record: ServingRecord) -> str:
    """One sentence on what serves the version and why, for the CLI and the report."""
    check = record.get("int8")
    if record.get("baseline_only"):
        return "served by its TF-IDF baseline alone (train.baseline=only: no encoder)"
    if record["runtime"] == "onnx-int8":
        assert check is not None  # int8 serves only with its passed check (read_serving requires it)
        how = "int8 weights"
        if check.get("fallback_margin"):
            how += f", fp32 for close calls ({check['fallback_share']:.1%} of the texts checked)"
        return f"served by ONNX Runtime with {how}: {check['reason']}"
    if record["runtime"] == "onnx":
        return "served by ONNX Runtime in fp32" + (f"; int8 was not kept: {check['reason']}" if check else "")
    return "served by PyTorch"


def choose_runtime(
    run: VersionFolder, data: PreparedData, settings: ServingConfig, threads: int | None
) -> ServingRecord:
    """Build the run's serving artifacts, check int8, write the serving record; returns it."""
    started = time.perf_counter()
    record: ServingRecord = {"requested": settings.runtime, "runtime": settings.runtime}
    blend = Blend.read(run.model)
    if blend is not None and blend.baseline_only:
        record.update(runtime="torch", baseline_only=True)  # nothing to export: there is no encoder
    elif settings.runtime == "onnx-int8":
        record.update(_check_int8(run, data, settings, threads or os.cpu_count() or 1))
    elif settings.runtime == "onnx":
        load_unchecked(run, "onnx", threads)  # exported now, not by the first request
    record["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_file(run.serving) as staging:
        staging.write_text(json.dumps(record, indent=2))
    return record


def _check_int8(run: VersionFolder, data: PreparedData, settings: ServingConfig, threads: int) -> ServingRecord:
    """int8 alone against fp32 ONNX; if it falls short, int8 with fp32 for its close calls. The first that
    passes serves, else fp32."""
    fp32 = load_unchecked(run, "onnx", threads)
    int8 = load_unchecked(run, "onnx-int8", threads)
    val, checked = agreement_texts(data)
    test, truth = list(data.test.text), data.test.label.to_numpy()
    fp32_val, int8_val = (p.own_logits(p.logits(val)) if val else np.zeros((0, len(p.labels))) for p in (fp32, int8))
    fp32_accuracy = _accuracy(fp32, test, truth)
    described = (
        "the validation split"
        if not checked["training"]
        else f"{checked['validation']} validation and {checked['training']} training texts"
    )

    def verdict(plan: str, agreement: float, predictor: Predictor) -> Int8Check:
        int8_accuracy = _accuracy(predictor, test, truth)
        accepted, reason = int8_verdict(agreement, fp32_accuracy, int8_accuracy, settings, described)
        return {
            "plan": plan,
            "agreement": agreement,
            "fp32_accuracy": fp32_accuracy,
            "int8_accuracy": int8_accuracy,
            "accepted": accepted,
            "reason": reason,
            "checked": checked,
        }

    agreement = float(np.mean(fp32_val.argmax(-1) == int8_val.argmax(-1))) if val else 1.0
    tried: list[Int8Check] = [verdict("int8", agreement, int8)]
    if not tried[-1]["accepted"] and len(val) >= 2:
        margin, share, agreement = cross_fitted_fallback(fp32_val, int8_val)
        if share <= MAX_FALLBACK_SHARE:
            cascade = replace(int8, fallback=fp32, fallback_margin=margin)
            tried.append(
                {
                    **verdict("int8, fp32 for close calls", agreement, cascade),
                    "fallback_margin": margin,
                    "fallback_share": share,
                }
            )
    if tried[-1]["accepted"]:
        return {"runtime": "onnx-int8", "int8": tried[-1], "int8_tried": tried}
    (onnx_cache(run.root, run.model) / INT8_FILE).unlink(missing_ok=True)
    log.warning("int8 does not serve this version (%s): fp32 ONNX serves", tried[-1]["reason"])
    return {"runtime": "onnx", "int8": tried[-1], "int8_tried": tried}


def agreement_texts(data: PreparedData) -> tuple[list[str], dict[str, int]]:
    """The texts int8's labels are compared with fp32's on: the validation split, topped up with a seeded sample of
    training texts to MIN_AGREEMENT_TEXTS; and how many of each."""
    val = list(data.val.text)
    wanted = min(max(0, MIN_AGREEMENT_TEXTS - len(val)), len(data.train))
    extra = list(data.train.text.sample(n=wanted, random_state=0)) if wanted else []
    return val + extra, {"validation": len(val), "training": len(extra)}


def fallback_margin(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> float:
    """The smallest top-two gap (of int8's logits) under which every text int8 labels differently from fp32
    falls: below it, the fallback answers in fp32."""
    wrong = fp32_logits.argmax(-1) != int8_logits.argmax(-1)
    return float(np.nextafter(top_two_gap(int8_logits)[wrong].max(), np.inf)) if wrong.any() else 0.0


def cross_fitted_fallback(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> tuple[float, float, float]:
    """(margin, share of texts under it, agreement with fp32) for int8 with an fp32 fallback. The agreement is
    measured honestly: the margin tuned on one half of the validation texts, scored on the other, both ways
    (tuned and scored on the same texts it would be 100% by construction). The margin served is the larger
    of the two halves'."""
    halves = np.arange(len(fp32_logits)) % 2 == 0
    gaps, exact, fast = top_two_gap(int8_logits), fp32_logits.argmax(-1), int8_logits.argmax(-1)
    margins, agreed = [], []
    for tune in (halves, ~halves):
        margin = fallback_margin(fp32_logits[tune], int8_logits[tune])
        served = np.where(gaps[~tune] < margin, exact[~tune], fast[~tune])
        margins.append(margin)
        agreed.append(served == exact[~tune])
    margin = max(margins)
    return margin, float(np.mean(gaps < margin)), float(np.mean(np.concatenate(agreed)))


def _accuracy(predictor: Predictor, texts: list[str], truth: np.ndarray) -> float:
    if not texts:
        return 0.0
    return float(np.mean(np.array(predictor.predict(texts, cleaned=True), dtype=object) == truth))
