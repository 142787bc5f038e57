"""A classification run end to end: prepare data → fine-tune → evaluate → register a candidate."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from transformers import AutoTokenizer

from tuneloop.config import DataConfig, TuneloopConfig, dump_config
from tuneloop.data.load import read_table, select_columns
from tuneloop.data.prepare import (
    PreparedData,
    clean_rows,
    fingerprint_of,
    length_percentiles,
    load_prepared,
    prepare_data,
    save_prepared,
)
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.report import evaluate_classifier, write_report
from tuneloop.models.classifier import MODEL_DIR, TextClassifier, load_task_heads
from tuneloop.models.encoders import EncoderSource, resolve_encoder
from tuneloop.registry.store import ModelVersion, Registry
from tuneloop.train.classification import CHECKPOINT_DIR, TrainResult, train_classifier

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_dir: Path
    report: dict
    report_html: Path
    version: ModelVersion | None
    train: TrainResult
    cross_validation: dict | None = None


def token_counter(encoder: EncoderSource):
    """texts → token counts with the encoder's tokenizer, for the data report."""
    tokenizer = AutoTokenizer.from_pretrained(encoder.path)
    return lambda texts: [len(ids) for ids in tokenizer([encoder.text_prefix + t for t in texts])["input_ids"]]


def prepare_for_model(config: TuneloopConfig) -> tuple[PreparedData, EncoderSource]:
    """Prepare the data and pick the encoder (auto looks at the cleaned texts)."""
    if config.tasks:
        raise TuneloopError(
            f"this config trains several tasks ({', '.join(config.tasks)}); look at each task's "
            f"data on its own: tuneloop data inspect --data FILE"
        )
    prepared, encoder = prepare_tasks({"": config.data}, config)
    return prepared[""], encoder


def prepare_tasks(
    tasks: dict[str, DataConfig], config: TuneloopConfig
) -> tuple[dict[str, PreparedData], EncoderSource]:
    """Prepare each task's data on its own, and pick the one encoder for all (auto looks at their texts)."""
    first_pass = {name: prepare_data(data) for name, data in tasks.items()}
    texts = [t for prepared in first_pass.values() for t in prepared.train["text"]]
    encoder = resolve_encoder(config.model.name, config.registry.home, texts)
    lengths = token_counter(encoder)
    # The report's token lengths need the tokenizer, which "auto" can only pick after reading the data.
    for prepared in first_pass.values():
        texts = pd.concat([prepared.splits[name]["text"] for name in prepared.splits]).tolist()
        prepared.report["text_length"] = length_percentiles(texts, lengths)
    return first_pass, encoder


def task_data_dir(run_dir: Path, task: str | None) -> Path:
    """Where a run keeps a task's splits: data/ for the model's own, data-<task>/ for the others."""
    return run_dir / ("data" if task is None else f"data-{task}")


def new_run_dir(config: TuneloopConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return config.registry.home / "runs" / f"{config.name}-{stamp}"


def latest_run_dir(config: TuneloopConfig, checkpoint: str = "trainer.pt") -> Path:
    # The exact stamp pattern, so that runs of "toy-2" never count as runs of "toy".
    own = re.compile(re.escape(config.name) + r"-\d{8}-\d{6}-\d{6}")
    runs = sorted(r for r in (config.registry.home / "runs").glob(f"{config.name}-*") if own.fullmatch(r.name))
    resumable = [r for r in runs if (r / CHECKPOINT_DIR / checkpoint).is_file()]
    if not resumable:
        raise TuneloopError(f"no run of '{config.name}' to resume under {config.registry.home / 'runs'}")
    return resumable[-1]


def _fold_data(data: PreparedData, fold: int) -> PreparedData:
    pool = pd.concat([data.train, data.val], ignore_index=True)
    splits = {
        "train": pool[data.folds != fold].reset_index(drop=True),
        "val": pool[data.folds == fold].reset_index(drop=True),
        "test": data.test,
    }
    return PreparedData(splits=splits, labels=data.labels, report=data.report, fingerprint=fingerprint_of(splits))


def run_training(
    config: TuneloopConfig,
    resume: Path | None = None,
    register: bool = True,
    show_progress: bool = True,
    step_callback=None,
    callback_every: int = 0,
    prepared: tuple[PreparedData, EncoderSource] | None = None,
    parent: str | None = None,
) -> RunOutcome:
    """Train (or resume), evaluate on the test split, write the report and register a candidate.

    `prepared` skips the data stage (retraining brings its own splits); `parent` is recorded in the registry.
    With `config.tasks` it trains one encoder for all the tasks (multi-task); the first is the model's own.
    """
    if resume is not None:
        run_dir = resume
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise TuneloopError(f"{run_dir} is not a tuneloop run folder (no config.yaml)")
        config = TuneloopConfig.model_validate(yaml.safe_load(saved.read_text()))
        data = load_prepared(task_data_dir(run_dir, None))
        others = {name: load_prepared(task_data_dir(run_dir, name)) for name in list(config.tasks)[1:]}
        saved_encoder = json.loads((run_dir / "encoder.json").read_text())
        encoder = resolve_encoder(saved_encoder["name"], config.registry.home)
        parent = saved_encoder.get("parent")
    else:
        if config.tasks and prepared is None:
            all_tasks, encoder = prepare_tasks(config.tasks, config)
            data, *rest = all_tasks.values()
            others = dict(zip(list(config.tasks)[1:], rest, strict=True))
        else:
            data, encoder = prepared or prepare_for_model(config)
            others = {}
        run_dir = new_run_dir(config)
        run_dir.mkdir(parents=True)
        save_prepared(data, task_data_dir(run_dir, None))
        for name, task_data in others.items():
            save_prepared(task_data, task_data_dir(run_dir, name))
        (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        (run_dir / "encoder.json").write_text(
            json.dumps({"name": encoder.name, "path": str(encoder.path), "parent": parent})
        )

    cv = None
    if config.data.kfold and resume is None:
        folds = []
        for fold in range(config.data.kfold):
            result = train_classifier(
                config, _fold_data(data, fold), encoder, run_dir / f"fold-{fold}", show_progress=show_progress
            )
            folds.append({"fold": fold, "val_macro_f1": result.best_val_macro_f1, "best_epoch": result.best_epoch})
        scores = np.array([f["val_macro_f1"] for f in folds], dtype=float)
        best_fold = int(scores.argmax())
        cv = {
            "k": config.data.kfold,
            "folds": folds,
            "mean_val_macro_f1": float(scores.mean()),
            "std_val_macro_f1": float(scores.std()),
            "selected_fold": best_fold,
        }
        (run_dir / "cross_validation.json").write_text(json.dumps(cv, indent=2))
        shutil.copytree(run_dir / f"fold-{best_fold}" / MODEL_DIR, run_dir / MODEL_DIR)
        result = TrainResult(
            best_dir=run_dir / MODEL_DIR,
            best_epoch=folds[best_fold]["best_epoch"],
            best_val_macro_f1=folds[best_fold]["val_macro_f1"],
        )
    else:
        own_task = next(iter(config.tasks), "")
        result = train_classifier(
            config,
            data,
            encoder,
            run_dir,
            resume=resume is not None,
            show_progress=show_progress,
            step_callback=step_callback,
            callback_every=callback_every,
            other_tasks=others,
            task_name=own_task,
        )

    model, tokenizer = TextClassifier.load(result.best_dir)
    title = f"{config.name}: test report" + (f" — task {model.spec.task}" if others else "")
    report = evaluate_classifier(
        model, tokenizer, data.test, config.eval, train=data.train, history=result.history, title=title
    )
    if others:
        heads = load_task_heads(result.best_dir, model)
        report["tasks"] = {
            name: evaluate_classifier(
                heads[name],
                tokenizer,
                task_data.test,
                config.eval,
                train=task_data.train,
                title=f"{config.name}: task {name}",
            )
            for name, task_data in others.items()
        }
    report["train_seconds"] = result.train_seconds
    report["best_epoch"] = result.best_epoch
    report["best_step"] = result.best_step
    report["data"] = data.report
    if cv:
        report["cross_validation"] = cv
    html_path = write_report(report, run_dir)

    version = None
    if register:
        registry = Registry(config.registry)
        metrics = {k: report["test"][k] for k in ("accuracy", "macro_f1", "weighted_f1")}
        metrics.update(
            ece=report["test"]["calibration"]["ece"],
            train_seconds=result.train_seconds,
            best_val_macro_f1=result.best_val_macro_f1,
        )
        for name, task_report in report.get("tasks", {}).items():
            metrics.update({f"{name}.{k}": task_report["test"][k] for k in ("accuracy", "macro_f1")})
        # A multi-task version's data is all its tasks' splits: the fingerprint covers each in order.
        fingerprint = (
            data.fingerprint
            if not others
            else hashlib.sha256(" ".join(d.fingerprint for d in (data, *others.values())).encode()).hexdigest()[:16]
        )
        version = registry.register(
            config.name,
            run_dir,
            base_model=encoder.name,
            data_fingerprint=fingerprint,
            config=config.model_dump(mode="json"),
            metrics=metrics,
            parent=parent,
            ignore=(CHECKPOINT_DIR, "fold-*", "*.tmp", "*.old"),
        )
        html_path = registry.artifacts(version) / "report.html"
    return RunOutcome(
        run_dir=run_dir, report=report, report_html=html_path, version=version, train=result, cross_validation=cv
    )


def test_split_from_file(config: DataConfig, path: Path) -> pd.DataFrame:
    """Every row of a labelled file, cleaned like training data, to evaluate on (no dedup, no split)."""
    frame = select_columns(read_table(path, config.format), path, config.text_column, config.label_column)
    frame, _ = clean_rows(frame, path)
    return frame[["row", "text", "label"]].reset_index(drop=True)
