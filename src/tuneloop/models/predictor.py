"""A classifier ready to predict, from a registered version or a folder, on PyTorch or ONNX Runtime.

The one loaded-model path: `tuneloop predict` and `eval`, the server's slots, the promotion gate and the
assistant all load and predict through `load_model`. Its surface follows scikit-learn (`predict`,
`predict_proba`, `classes_`) so that it drops into code that already scores scikit-learn models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from tuneloop.config import RegistryConfig
from tuneloop.data.clean import clean_text
from tuneloop.errors import TuneloopError, first_line
from tuneloop.models.baseline import Blend
from tuneloop.models.classifier import (
    HeadSpec,
    TextClassifier,
    adapter_base,
    is_adapter,
    load_task_heads,
    predict_logits,
    softmax,
)
from tuneloop.models.onnx_encoder import onnx_encoder
from tuneloop.registry import ModelVersion, Registry, VersionFolder

log = logging.getLogger(__name__)
RUNTIMES = ("torch", "onnx", "onnx-int8")
BASELINE_RUNTIME = "baseline"  # a version without an encoder (train.baseline=only): its TF-IDF baseline answers
ONNX_CACHE = "onnx"  # beside a folder's model (an export's: inside it), where its ONNX exports are kept
# A version's serving record (serving.json, written by tuneloop.evaluate.serving): which runtime serves it and its
# int8 checks, as JSON; read_serving checks the keys loading relies on.
ServingRecord = dict[str, Any]


@dataclass(frozen=True)
class Prediction:
    """One text's answer: the best label, its probability, and the k best labels with theirs."""

    text: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]


@dataclass(frozen=True)
class Predictor:
    """A loaded classifier (a registered version, or a folder) and, for a multi-task model, its other tasks."""

    name: str
    version: int | None
    # The fine-tuned transformer; None for a version its baseline serves alone (train.baseline=only).
    model: TextClassifier | None
    tokenizer: PreTrainedTokenizerBase | None
    record: ModelVersion | None = None
    folder: VersionFolder | None = None
    # A multi-task model's other heads on the same encoder; `logits` returns their columns after the model's.
    tasks: dict[str, TextClassifier] = field(default_factory=dict)
    runtime: str = "torch"  # what runs the encoder: torch, onnx or onnx-int8; "baseline" when there is none
    # int8 with fp32 for close calls: texts whose two best labels are nearer than this (in logits) get the
    # fallback's (fp32) answer instead; chosen per version by its int8 check (tuneloop.evaluate.serving).
    fallback: Predictor | None = None
    fallback_margin: float = 0.0
    # The classical baseline mixed into the model's own task (models/baseline.py), or serving alone.
    blend: Blend | None = None
    # The spec of a version without a transformer (its labels, temperature and what it is); else the model's.
    baseline_spec: HeadSpec | None = None

    @property
    def spec(self) -> HeadSpec:
        """The served head's spec: the transformer's, or the one saved beside a baseline that serves alone."""
        if self.model is not None:
            return self.model.spec
        assert self.baseline_spec is not None  # _assemble gives a predictor without a model its spec
        return self.baseline_spec

    @property
    def transformer(self) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
        """The fine-tuned transformer and its tokenizer, for what only it does (word attributions by gradients,
        cosine scores); a version its baseline serves alone has none."""
        if self.model is None or self.tokenizer is None:
            raise TuneloopError(
                f"{self.ref} is served by its TF-IDF baseline alone (train.baseline=only): it has no transformer "
                "to explain or to take cosines from"
            )
        return self.model, self.tokenizer

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def device(self) -> str:
        """Where the encoder runs: "cpu", or "cuda" when ONNX Runtime's CUDA provider runs it."""
        provider = getattr(self.model.encoder if self.model else None, "provider", "CPUExecutionProvider")
        return "cuda" if provider == "CUDAExecutionProvider" else "cpu"

    @property
    def temperature(self) -> float:
        """What the served logits were divided by (the fitted temperature; 1 before calibration). A blend's logits
        are mixed probabilities, divided by nothing: its transformer's share is scaled before mixing."""
        if self.blend is not None and not self.blend.baseline_only:
            return 1.0
        return self.spec.temperature

    @property
    def classes_(self) -> np.ndarray:
        """The labels in column order of `predict_proba`, as scikit-learn names them."""
        return np.array(self.labels, dtype=object)

    @property
    def registered_version(self) -> int:
        """The version number; asking a predictor loaded from a folder (which has none) is an error."""
        if self.version is None:
            raise TuneloopError(f"{self.name} was loaded from a folder, not from the registry: it has no version")
        return self.version

    @property
    def ref(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    def logits(self, texts: list[str], batch_size: int = 64, max_padding: float | None = None) -> np.ndarray:
        """Logits of every task, the model's own first, for texts already cleaned (one encoder pass each); the
        model's own columns mixed with the baseline's when the version serves a blend."""
        if self.model is None or self.tokenizer is None:
            assert self.blend is not None  # a predictor without a transformer is its baseline
            return self.blend.mix(texts, None) / self.spec.temperature
        rows = predict_logits(
            self.model,
            self.tokenizer,
            texts,
            batch_size=batch_size,
            heads=list(self.tasks.values()),
            max_padding=max_padding,
        )
        if self.blend is not None:
            rows[:, : len(self.labels)] = self.blend.mix(texts, self.own_logits(rows))
        if self.fallback is not None and len(texts):
            close = np.flatnonzero(top_two_gap(self.own_logits(rows)) < self.fallback_margin)
            if len(close):
                rows[close] = self.fallback.logits([texts[i] for i in close], batch_size, max_padding)
        return rows

    def own_logits(self, rows: np.ndarray) -> np.ndarray:
        """The model's own task's columns of `logits` rows."""
        return rows[..., : len(self.labels)]

    def head(self, name: str) -> Predictor:
        """Another task of a multi-task model, as a predictor of its own (named NAME:TASK, so its logged
        predictions never mix with the model's own) on the same encoder."""
        if name not in self.tasks:
            trained = ", ".join(self.tasks) or "none"
            raise TuneloopError(f"{self.ref} has no '{name}' task (its other tasks: {trained})")
        head = self.tasks[name]
        return Predictor(f"{self.name}:{name}", self.version, head, self.tokenizer, self.record, self.folder)

    def task(self, name: str, rows: np.ndarray) -> tuple[Predictor, np.ndarray]:
        """Another task's predictor (see `head`) with its columns of `logits` rows."""
        view = self.head(name)
        order = list(self.tasks)
        start = len(self.labels) + sum(len(self.tasks[t].spec.labels) for t in order[: order.index(name)])
        return view, rows[..., start : start + len(view.labels)]

    def predict_proba(self, texts: list[str], cleaned: bool = False) -> np.ndarray:
        """Probabilities of the model's own labels (columns in `classes_` order), one row per text.

        Texts are cleaned exactly as training data was, unless `cleaned` says they already are (a prepared
        split: cleaning twice could change a text that still looks like HTML after the first pass).
        """
        inputs = texts if cleaned else [clean_text(t) for t in texts]
        return softmax(self.own_logits(self.logits(inputs)))

    def predict(self, texts: list[str], cleaned: bool = False) -> list[str]:
        """The most probable label of each text."""
        return [self.labels[i] for i in self.predict_proba(texts, cleaned).argmax(1)]

    def rank(self, texts: list[str], top_k: int = 3) -> list[Prediction]:
        """Each text's label, probability and `top_k` best labels."""
        results = []
        for text, row in zip(texts, self.predict_proba(texts), strict=True):
            top = [(self.labels[i], float(row[i])) for i in row.argsort()[::-1][:top_k]]
            results.append(Prediction(text=text, label=top[0][0], probability=top[0][1], top_k=top))
        return results


def load_model(
    source: str | Path | ModelVersion,
    registry: Registry | None = None,
    runtime: str | None = None,
    threads: int | None = None,
) -> Predictor:
    """A classifier ready to predict.

    `source` is a registered version (NAME, NAME@3, NAME@production, or its row), looked up in `registry`
    (default: the one TUNELOOP_HOME / TUNELOOP_DATABASE_URL point at), or a folder: a version's, a run's,
    or one written by `tuneloop models export`. `runtime` None (or "version") runs the encoder as the
    version was evaluated (its serving record; ONNX Runtime when it has none); "torch", "onnx" and
    "onnx-int8" choose, except that int8 runs only where the version's check accepted it.
    """
    if runtime not in (None, "version", *RUNTIMES):
        raise TuneloopError(f"unknown runtime '{runtime}': use one of version, {', '.join(RUNTIMES)}")
    record, folder, model_dir = locate_model(source, registry)
    serving = read_serving(folder)
    ref = record.ref if record is not None else (folder.root if folder else model_dir).resolve().name
    chosen = serving_runtime(runtime, serving, ref)
    margin = float(serving["int8"].get("fallback_margin") or 0.0) if chosen == "onnx-int8" and serving else 0.0
    return _assemble(record, folder, model_dir, chosen, threads, margin)


def load_unchecked(run: VersionFolder, runtime: str, threads: int | None = None) -> Predictor:
    """A run's model on `runtime` whatever its serving record says: what the end-of-training check loads to
    compare int8 with fp32, before there is a record to follow. Serving never loads this way."""
    return _assemble(None, run, run.model, runtime, threads, 0.0)


def _assemble(
    record: ModelVersion | None,
    folder: VersionFolder | None,
    model_dir: Path,
    runtime: str,
    threads: int | None,
    fallback_margin: float,
) -> Predictor:
    """The predictor of the model in `model_dir` on `runtime` (with an fp32 fallback for close calls when
    `fallback_margin` is set): the one place a classifier is put together for predicting."""
    if record is not None:
        name, version = record.name, record.version
    else:
        name, version = (folder.root if folder else model_dir).resolve().name, None
    blend = Blend.read(model_dir)
    if blend is not None and blend.baseline_only:
        spec = HeadSpec.read(model_dir)
        return Predictor(
            name, version, None, None, record, folder, runtime=BASELINE_RUNTIME, blend=blend, baseline_spec=spec
        )
    model, tokenizer = TextClassifier.load(model_dir)
    if runtime != "torch":
        cache = onnx_cache(folder.root if folder else model_dir, model_dir)
        model.encoder = onnx_encoder(
            model.torch_encoder, tokenizer, cache, threads or os.cpu_count() or 1, int8=runtime == "onnx-int8"
        )
    # After the swap: the other tasks' heads share whichever encoder the model runs.
    tasks = load_task_heads(model_dir, model)
    fallback = _assemble(record, folder, model_dir, "onnx", threads, 0.0) if fallback_margin else None
    loaded = Predictor(
        name, version, model, tokenizer, record, folder, tasks, runtime, fallback, fallback_margin, blend=blend
    )
    log.info("%s runs on %s (%s)", loaded.ref, loaded.device, runtime)
    return loaded


def locate_model(
    source: str | Path | ModelVersion, registry: Registry | None = None
) -> tuple[ModelVersion | None, VersionFolder | None, Path]:
    """Where `source` (as load_model takes it) lives, without loading it: its registry row (None for a folder),
    its version folder (None for a bare exported model folder) and the folder of its weights. Raises
    TuneloopError for a reference that names no registered version."""
    # A string is a folder only when it holds a classifier: a directory that happens to share a model's name
    # (a project folder called "tickets") must not shadow the registered model.
    if isinstance(source, Path) or (isinstance(source, str) and _holds_a_classifier(Path(source))):
        path = Path(source)
        folder = VersionFolder(path) if HeadSpec.exists(VersionFolder(path).model) else None
        return None, folder, folder.model if folder else path
    registry = registry or Registry(RegistryConfig())
    record = source if isinstance(source, ModelVersion) else registry.get(source)
    folder = registry.folder(record)
    return record, folder, folder.model


def top_two_gap(logits: np.ndarray) -> np.ndarray:
    """Per row, how far the best label's logit is ahead of the second's (inf with a single label)."""
    if logits.shape[-1] < 2:
        return np.full(logits.shape[:-1], np.inf)
    top = np.partition(logits, -2, axis=-1)
    return top[..., -1] - top[..., -2]


def read_serving(folder: VersionFolder | None) -> ServingRecord | None:
    """A version's serving record (written at the end of training), or None for one made without it."""
    if folder is None or not folder.serving.is_file():
        return None
    try:
        record: ServingRecord = json.loads(folder.serving.read_text())
        if record["runtime"] not in RUNTIMES or (record["runtime"] == "onnx-int8" and not record["int8"]["accepted"]):
            raise ValueError(f"runtime {record['runtime']!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise TuneloopError(
            f"{folder.serving} is not a serving record tuneloop wrote ({first_line(exc)}); delete it to serve "
            f"fp32 ONNX, or retrain"
        ) from exc
    return record


def serving_runtime(requested: str | None, serving: ServingRecord | None, ref: str) -> str:
    """The runtime that runs: the version's own unless one is requested; int8 only where its check passed."""
    if requested in (None, "version"):
        return serving["runtime"] if serving else "onnx"
    if requested == "onnx-int8":
        check = (serving or {}).get("int8")
        if not check or not check.get("accepted"):
            why = check["reason"] if check else "it was never checked (retrain it to check int8)"
            log.warning("%s serves fp32 ONNX, not int8: %s", ref, why)
            return "onnx"
    return requested


def onnx_cache(root: Path, model_dir: Path) -> Path:
    """Where the ONNX exports of the model in `model_dir` live: with what they were made from, under `root`
    (a version's folder, registered with its run's), keyed by content too, so they are never reused for
    other weights."""
    return root / ONNX_CACHE / export_key(model_dir)


def export_key(model_dir: Path) -> str:
    """What an export of the model in `model_dir` is keyed by: its files, and for LoRA adapters the base encoder's
    as well, since the export holds the two merged and new base weights may come under the same path."""
    key = content_key(model_dir)
    return f"{key}-{content_key(adapter_base(model_dir))}" if is_adapter(model_dir) else key


def content_key(model_dir: Path) -> str:
    """A short digest of every file of a saved model (names and bytes): what an export derived from it is
    keyed by, so an export is never reused for other weights."""
    digest = hashlib.sha256()
    files = [p for p in model_dir.rglob("*") if p.is_file() and p.relative_to(model_dir).parts[0] != ONNX_CACHE]
    for file in sorted(files):
        digest.update(file.relative_to(model_dir).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def _holds_a_classifier(path: Path) -> bool:
    return path.is_dir() and (HeadSpec.exists(path) or HeadSpec.exists(VersionFolder(path).model))


def verify_loads(version: ModelVersion, registry: Registry) -> None:
    """Load a version as what it is (a classifier, an encoder from pretraining, a causal LM from sft) and
    raise TuneloopError naming it if it does not load: checked before it becomes production."""
    from tuneloop.models.classifier import load_encoder
    from tuneloop.models.lm import load_lm

    kind = version.metrics.get("kind", "classifier")
    folder = registry.folder(version).model
    try:
        if kind == "encoder":
            load_encoder(folder)
        elif kind == "generator":
            load_lm(folder)
        else:
            load_model(version, registry)
    except Exception as exc:
        raise TuneloopError(f"{version.ref} does not load ({first_line(exc)}); production is unchanged") from exc
