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

import numpy as np

from tuneloop.atomic import atomic_file
from tuneloop.config import ServingConfig
from tuneloop.data.prepare import PreparedData
from tuneloop.models.onnx_encoder import INT8_FILE, INT8_PLANS, onnx_encoder
from tuneloop.models.predictor import ONNX_CACHE, content_key, load_model
from tuneloop.registry import VersionFolder

log = logging.getLogger(__name__)


def int8_verdict(
    agreement: float, fp32_accuracy: float, int8_accuracy: float, settings: ServingConfig
) -> tuple[bool, str]:
    """Whether an int8 copy may serve, and why in one phrase (the report and the server log show it)."""
    drop = fp32_accuracy - int8_accuracy
    if agreement < settings.int8_min_agreement:
        return False, (
            f"it labels {agreement:.2%} of the validation split as fp32 does, "
            f"below serving.int8_min_agreement={settings.int8_min_agreement:.2%}"
        )
    if drop > settings.int8_max_accuracy_drop + 1e-9:  # exactly at the limit passes, whatever the float rounding
        return False, (
            f"its test accuracy is {drop * 100:.2f} points below fp32's "
            f"(serving.int8_max_accuracy_drop={settings.int8_max_accuracy_drop * 100:.2f} points)"
        )
    return True, (
        f"agrees with fp32 on {agreement:.2%} of the validation split; test accuracy {int8_accuracy:.2%} "
        f"(fp32 {fp32_accuracy:.2%})"
    )


def describe(record: dict) -> str:
    """One sentence on what serves the version and why, for the CLI and the report."""
    check = record.get("int8")
    if record["runtime"] == "onnx-int8":
        return f"served by ONNX Runtime with int8 weights (plan {check['plan']}): {check['reason']}"
    if record["runtime"] == "onnx":
        return "served by ONNX Runtime in fp32" + (f"; int8 was not kept: {check['reason']}" if check else "")
    return "served by PyTorch"


def choose_runtime(run: VersionFolder, data: PreparedData, settings: ServingConfig, threads: int | None) -> dict:
    """Build the run's serving artifacts, check int8, write the serving record; returns it."""
    started = time.perf_counter()
    record: dict = {"requested": settings.runtime, "runtime": settings.runtime}
    if settings.runtime == "onnx-int8":
        record.update(_check_int8(run, data, settings, threads or os.cpu_count() or 1))
    elif settings.runtime == "onnx":
        load_model(run.root, runtime="onnx", threads=threads)  # exported now, not by the first request
    record["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_file(run.serving) as staging:
        staging.write_text(json.dumps(record, indent=2))
    return record


def _check_int8(run: VersionFolder, data: PreparedData, settings: ServingConfig, threads: int) -> dict:
    """Try the int8 plans fastest first against fp32 ONNX; the first that passes serves, else fp32."""
    predictor = load_model(run.root, runtime="onnx", threads=threads)
    cache = run.root / ONNX_CACHE / content_key(run.model)
    val, test = list(data.val.text), list(data.test.text)
    truth = data.test.label.to_numpy()

    def labels(texts: list[str]) -> np.ndarray:
        return np.array(predictor.predict(texts, cleaned=True), dtype=object) if texts else np.array([])

    fp32_val, fp32_accuracy = labels(val), _accuracy(labels(test), truth)
    fp32_encoder, tried = predictor.model.encoder, []
    for plan in INT8_PLANS:
        (cache / INT8_FILE).unlink(missing_ok=True)  # one plan's copy in the cache at a time
        predictor.model.encoder = onnx_encoder(fp32_encoder, predictor.tokenizer, cache, threads, int8_plan=plan)
        agreement = float(np.mean(labels(val) == fp32_val)) if val else 1.0
        int8_accuracy = _accuracy(labels(test), truth)
        accepted, reason = int8_verdict(agreement, fp32_accuracy, int8_accuracy, settings)
        tried.append(
            {
                "plan": plan,
                "agreement": agreement,
                "fp32_accuracy": fp32_accuracy,
                "int8_accuracy": int8_accuracy,
                "accepted": accepted,
                "reason": reason,
            }
        )
        if accepted:
            return {"runtime": "onnx-int8", "int8": tried[-1], "int8_tried": tried}
    (cache / INT8_FILE).unlink(missing_ok=True)
    log.warning("int8 does not serve this version (%s): fp32 ONNX serves", tried[-1]["reason"])
    return {"runtime": "onnx", "int8": {**tried[-1], "accepted": False}, "int8_tried": tried}


def _accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(predicted == truth)) if len(truth) else 0.0
