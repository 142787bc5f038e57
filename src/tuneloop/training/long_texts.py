"""Recipe part: how the classifier reads texts longer than model.max_length (model.truncation), decided once
before training from the training texts' token lengths, and what it costs.

The encoders read 128 tokens by default; on long reviews the first 128 miss what the end says. `windows` reads a
whole text in overlapping windows (models/classifier.py `text_windows`), each a training example with the text's
label, and serves the mean of their logits; it costs an encoder pass per window, which only long texts have.
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from tuneloop.config import ClassifierRecipe
from tuneloop.data.prepare import PreparedData
from tuneloop.evaluate.schema import LongTextsReport
from tuneloop.models.classifier import HeadSpec, text_windows

# model.truncation=auto reads in windows when at least this share of the training texts is longer than
# max_length: fewer long texts cannot move the score, and windows would cost their passes for nothing.
LONG_SHARE = 0.05


def longer_share(tokenizer: PreTrainedTokenizerBase, texts: list[str], spec: HeadSpec) -> float:
    """The share of `texts` longer than the spec's max_length tokens (prefix and special tokens included)."""
    if not texts:
        return 0.0
    lengths = [len(ids) for ids in tokenizer([spec.text_prefix + t for t in texts], verbose=False)["input_ids"]]
    return float(np.mean(np.array(lengths) > spec.max_length))


def choose_truncation(recipe: ClassifierRecipe, share: float) -> tuple[str, str]:
    """(model.truncation resolved, why)."""
    asked, limit = recipe.model.truncation, recipe.model.max_length
    if asked != "auto":
        return asked, f"model.truncation={asked}"
    if recipe.train.dp is not None:
        return "head", "model.truncation=auto under train.dp (a text read in windows would be several examples)"
    if share >= LONG_SHARE:
        return "windows", f"model.truncation=auto: {share:.1%} of the training texts are longer than {limit} tokens"
    return "head", f"model.truncation=auto: {share:.1%} of the training texts are longer than {limit} tokens"


def settle_truncation(
    recipe: ClassifierRecipe, spec: HeadSpec, tokenizer: PreTrainedTokenizerBase, data: PreparedData
) -> LongTextsReport:
    """Resolve `spec.truncation` (model.truncation=auto) for the run's training texts, in place, and measure
    what it costs on the training and test splits."""
    train, test = data.train["text"].tolist(), data.test["text"].tolist()
    share = longer_share(tokenizer, train, spec)
    spec.truncation, reason = choose_truncation(recipe, share)
    rows = len(text_windows(tokenizer, train, spec)[0])
    passes = len(text_windows(tokenizer, test, spec)[0])
    return LongTextsReport(
        truncation=spec.truncation,
        reason=reason,
        max_length=spec.max_length,
        longer_share=share,
        training_rows_per_text=rows / max(len(train), 1),
        passes_per_test_text=passes / max(len(test), 1),
    )
