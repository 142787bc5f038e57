"""Report figures as PNG bytes.

Figures are made with matplotlib's object API (`Figure`), not pyplot: no global backend is switched and no
figure registry grows in a long-running server, and the style below applies only inside these functions.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.typing import RcKeyType

# DejaVu has no CJK glyphs; these are tried first so Chinese labels render where such a font exists.
STYLE: dict[RcKeyType, Any] = {
    "font.sans-serif": ["Noto Sans CJK SC", "WenQuanYi Zen Hei", "SimHei", "DejaVu Sans"],
    "axes.unicode_minus": False,
}


def _styled(plot: Callable[..., bytes]) -> Callable[..., bytes]:
    @functools.wraps(plot)
    def wrapper(*args: object, **kwargs: object) -> bytes:
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


@_styled
def confusion_matrix_png(matrix: list[list[int]], labels: list[str]) -> bytes:
    counts = np.array(matrix, dtype=float)
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = min(4 + 0.28 * len(labels), 26)
    figure = Figure(figsize=(size, size))
    axis = figure.subplots()
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7 if len(labels) > 30 else 9)
    axis.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 30 else 9)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("Confusion matrix (row-normalised)")
    if len(labels) <= 20:
        for (i, j), value in np.ndenumerate(counts):
            if value:
                axis.text(
                    j,
                    i,
                    str(int(value)),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if normalised[i, j] > 0.5 else "black",
                )
    figure.colorbar(image, fraction=0.046)
    return _png(figure)


@_styled
def reliability_png(bins: list[dict[str, Any]], ece: float) -> bytes:
    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    centres = [(b["low"] + b["high"]) / 2 for b in bins if b["count"]]
    accuracy = [b["accuracy"] for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    axis.bar(centres, accuracy, width=width * 0.9, color="#4c72b0", edgecolor="black", label="accuracy")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.set_title(f"Reliability diagram (ECE {ece:.3f})")
    axis.legend(loc="upper left")
    return _png(figure)


@_styled
def per_class_f1_png(per_class: list[dict[str, Any]]) -> bytes:
    ordered = sorted(per_class, key=lambda row: row["f1"])
    figure = Figure(figsize=(6, max(3, 0.22 * len(ordered))))
    axis = figure.subplots()
    axis.barh([row["label"] for row in ordered], [row["f1"] for row in ordered], color="#55a868")
    axis.set_xlim(0, 1)
    axis.set_xlabel("F1")
    axis.set_title("Per-class F1")
    axis.tick_params(axis="y", labelsize=7 if len(ordered) > 30 else 9)
    return _png(figure)


@_styled
def training_curve_png(history: list[dict[str, Any]]) -> bytes:
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    # Steps, not epochs: with train.eval_every there are several points per epoch.
    steps = [h["step"] for h in history]
    axis.plot(steps, [h["train_loss"] for h in history], "o-", label="train loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    if any("val_macro_f1" in h for h in history):
        twin = axis.twinx()
        scores = [h.get("val_macro_f1", math.nan) for h in history]  # a point without a score is a gap
        twin.plot(steps, scores, "s-", color="#c44e52", label="val macro-F1")
        twin.set_ylabel("val macro-F1")
        twin.legend(loc="lower right")
    axis.legend(loc="upper right")
    axis.set_title("Training")
    return _png(figure)


@_styled
def per_class_delta_png(rows: list[dict[str, Any]], limit: float) -> bytes:
    """Candidate minus production F1 per class; bars below -limit are the ones that block promotion."""
    ordered = sorted(rows, key=lambda row: row["delta_f1"])
    figure = Figure(figsize=(6, max(3, 0.22 * len(ordered))))
    axis = figure.subplots()
    colours = ["#c44e52" if row["blocks"] else ("#55a868" if row["delta_f1"] >= 0 else "#dd8452") for row in ordered]
    axis.barh([row["label"] for row in ordered], [row["delta_f1"] for row in ordered], color=colours)
    axis.axvline(-limit, color="grey", linestyle="--", label=f"allowed drop ({limit:.2f})")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("F1 change (candidate − production)")
    axis.set_title("Per-class F1 change")
    axis.tick_params(axis="y", labelsize=7 if len(ordered) > 30 else 9)
    axis.legend(loc="lower right")
    return _png(figure)
