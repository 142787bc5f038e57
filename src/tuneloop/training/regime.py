"""Which training regime a run takes — the standard one, or the few-shot one for labels with a handful of examples
each — and why; the report says both.

The few-shot regime (train.few_shot) runs a contrastive stage over the encoder (contrastive.py), lets the label
names join the training texts and fits the head on the tuned embeddings; the classifier loop runs after it only
when train.few_shot.loop_steps asks (at least that many steps, the model kept by a smoothed validation score). The
standard regime is the loop as it always was.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace

import pandas as pd

from tuneloop.config import ClassifierRecipe
from tuneloop.data.prepare import PreparedData
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.schema import TrainingRegime
from tuneloop.training.distributed import World

log = logging.getLogger(__name__)

# A label name worth reading as text has a letter in it (waimai's 0 and 1 do not).
READABLE = re.compile(r"[^\W\d_]")
# A label name's row number in the training split: it comes from no row of the file.
LABEL_NAME_ROW = -2


def choose_regime(recipe: ClassifierRecipe, data: PreparedData, world: World, multitask: bool) -> TrainingRegime:
    """The regime `recipe` asks for on `data`: few-shot with train.few_shot.mode=on, or under auto when the median
    label has at most train.few_shot.max_per_label training texts; never under DP-SGD, torchrun or several tasks."""
    settings = recipe.train.few_shot
    median = float(data.train["label"].value_counts().median()) if len(data.train) else 0.0
    blocked = (
        "train.dp (each text's gradient is clipped and noised; the contrastive stage would spend privacy unaccounted)"
        if recipe.train.dp
        else "several processes (torchrun)"
        if world.distributed
        else "several tasks"
        if multitask
        else None
    )
    if settings.mode == "off":
        return TrainingRegime(name="standard", why="train.few_shot.mode=off", median_per_label=median)
    if blocked:
        why = f"the few-shot regime does not run under {blocked}"
        if settings.mode == "on":
            raise TuneloopError(f"train.few_shot.mode=on: {why}; use train.few_shot.mode=auto or off")
        return TrainingRegime(name="standard", why=why, median_per_label=median)
    counted = f"the median label has {median:g} training texts"
    limit = f"train.few_shot.max_per_label={settings.max_per_label}"
    if settings.mode == "auto" and median > settings.max_per_label:
        return TrainingRegime(name="standard", why=f"{counted}, more than {limit}", median_per_label=median)
    why = "train.few_shot.mode=on" if settings.mode == "on" else f"{counted}, at most {limit}"
    log.info("the few-shot regime: %s", why)
    return TrainingRegime(
        name="few-shot", why=why, median_per_label=median, min_steps=settings.loop_steps, smoothing=settings.smoothing
    )


def readable_label(label: str) -> str:
    """A label name as a text: card_arrival → 'card arrival', OrderStatus → 'order status'."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label)
    return re.sub(r"[_\-./]+", " ", spaced).strip().lower()


def with_label_names(data: PreparedData, regime: TrainingRegime, wanted: bool) -> PreparedData:
    """The few-shot regime's training split with each readable label name as one more text of its label (a name
    that is already a training text is not added twice); other splits as they are."""
    if regime.name != "few-shot" or not wanted:
        return data
    present = set(data.train["text"].str.lower())
    names = [(readable_label(label), label) for label in data.labels if READABLE.search(label)]
    rows = pd.DataFrame(
        [{"row": LABEL_NAME_ROW, "text": text, "label": label} for text, label in names if text and text not in present]
    )
    regime.label_names_added = len(rows)
    if rows.empty:
        return data
    return replace(data, splits={**data.splits, "train": pd.concat([data.train, rows], ignore_index=True)})


def epochs_for(regime: TrainingRegime, epochs: int, steps_per_epoch: int) -> int:
    """train.epochs in the standard regime; in the few-shot one none without loop_steps, else train.epochs or more
    when loop_steps need them."""
    if regime.name != "few-shot":
        return epochs
    needed = math.ceil((regime.min_steps or 0) / max(steps_per_epoch, 1))
    return max(epochs, needed) if regime.min_steps else 0
