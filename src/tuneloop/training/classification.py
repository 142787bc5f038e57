"""Recipe: fine-tune a packaged encoder into a text classifier, evaluate it and register it.

`run(recipe)` goes data → fine-tune → evaluate → register a candidate. `fine_tune` builds the parts — the model
and its tasks (tokenised once), their loss terms (losses.py), the stepper for this launch (steppers.py) on the
device this machine has (devices.py) — and hands them to the loop (loop.py), which is written out top to bottom.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from tuneloop.config import (
    ClassifierRecipe,
    TrainConfig,
    read_yaml_mapping,
    stored_recipe,
    validated,
)
from tuneloop.data.prepare import (
    PreparedData,
    fingerprint,
    fingerprint_of,
    leaked_positions,
    load_prepared,
    save_prepared,
)
from tuneloop.errors import TuneloopError, first_line
from tuneloop.evaluate.audit import AUDIT_FILE, audit_training_labels
from tuneloop.evaluate.calibrate import calibrate_run
from tuneloop.evaluate.report import evaluate_classifier, explain_report, write_report
from tuneloop.evaluate.schema import (
    BaselineReport,
    ClassifierReport,
    ContrastiveReport,
    CrossValidationReport,
    DistillationReport,
    Fold,
    LongTextsReport,
    OutlierExposureReport,
    PrivacyReport,
    Processes,
    TemperatureFit,
    TrainingRegime,
)
from tuneloop.evaluate.serving import choose_runtime
from tuneloop.models.classifier import (
    HeadSpec,
    TextClassifier,
    keep_lower_layers,
    length_groups,
    load_encoder,
    pad_right,
    text_windows,
)
from tuneloop.models.encoders import EncoderSource, prepare_for_model, prepare_tasks, resolve_encoder
from tuneloop.models.predictor import Predictor, ServingRecord, load_model
from tuneloop.models.trained_rows import train_only_used_rows
from tuneloop.profiling import PROFILE_FOLDER, Profiler, SummaryJson, stage
from tuneloop.registry import ModelVersion, Registry, VersionFolder
from tuneloop.training.baseline import fit_alone, settle_baseline
from tuneloop.training.common import (
    HistoryEntry,
    load_checkpoint,
    new_run_folder,
    parameter_groups,
    register_run,
    restore_rng,
    resume_folder,
    seed_everything,
    start_run,
    use_threads,
)
from tuneloop.training.contrastive import contrastive_stage, fit_head
from tuneloop.training.devices import DevicePlan, plan_device, process_group_backend
from tuneloop.training.distributed import ONE_PROCESS, World, check_recipe, current_world, join_world, leave_world
from tuneloop.training.long_texts import settle_truncation
from tuneloop.training.loop import CHECKPOINT, LoopState, StepCallback, Stepper, Task, Training, fit
from tuneloop.training.losses import CrossEntropy, Distillation, class_weights, outlier_exposure
from tuneloop.training.regime import choose_regime, epochs_for, with_label_names
from tuneloop.training.steppers import ReplicatedStepper, ShardedStepper
from tuneloop.training.teachers import check_teachers, teacher_targets

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What the loop leaves: the best model's folder and how it got there."""

    best_dir: Path
    best_epoch: int
    best_val_macro_f1: float | None
    best_step: int | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False
    privacy: PrivacyReport | None = None  # what a train.dp run spent
    profile: SummaryJson | None = None  # train.profile: the summary (ProfileSummary), the trace beside it
    outlier_exposure: OutlierExposureReport | None = None  # which off-topic messages it was shown
    distillation: DistillationReport | None = None  # train.teachers: who taught, and how
    device: str = "cpu in fp32"  # where it trained, and in which precision (DevicePlan.describe)
    regime: TrainingRegime | None = None  # standard or few-shot, and why
    baseline: BaselineReport | None = None  # train.baseline=only: the baseline that is the model
    long_texts: LongTextsReport | None = None  # how texts longer than model.max_length were read


@dataclass
class ClassifierOutcome:
    folder: VersionFolder  # the registered version's folder once registered, else the run's
    report: ClassifierReport | None  # None on a torchrun rank other than 0 (rank 0 reports)
    report_html: Path
    version: ModelVersion | None
    train: TrainResult
    cross_validation: CrossValidationReport | None = None


@torch.no_grad()
def embed_all(model: TextClassifier, ids: list[list[int]], pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """Pooled embeddings of tokenised texts, on the CPU (for the centroid head and outlier exposure's filter),
    computed wherever the model is."""
    model.eval()
    device = model.head.weight.device
    out = torch.zeros(len(ids), model.encoder.config.hidden_size)
    for chosen in length_groups([len(x) for x in ids], batch_size):
        input_ids, mask = pad_right([ids[i] for i in chosen], pad_id)
        out[chosen] = model.embed(input_ids.to(device), mask.to(device)).float().cpu()
    return out


def adamw(model: TextClassifier, recipe: ClassifierRecipe, heads: list[TextClassifier]) -> torch.optim.AdamW:
    """AdamW over the encoder (weight decay on weights only) and every task's head (its own learning rate)."""
    head_parameters = [p for m in (model, *heads) for p in m.head.parameters()]
    groups = parameter_groups(model.encoder, recipe.train.lr, recipe.train.weight_decay)
    groups.append({"params": head_parameters, "lr": recipe.train.head_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def learning_rate_schedule(
    tc: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over train.warmup_ratio of the steps, then train.schedule's decay (transformers' schedules)."""
    name = {"constant": "constant_with_warmup"}.get(tc.schedule, tc.schedule)
    schedule: torch.optim.lr_scheduler.LambdaLR = get_scheduler(
        name, optimizer, num_warmup_steps=int(tc.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return schedule


def head_spec(recipe: ClassifierRecipe, encoder: EncoderSource, labels: list[str], task: str = "") -> HeadSpec:
    model = recipe.model
    return HeadSpec(
        labels=labels,
        pooling=model.pooling,
        head=model.head,
        dropout=model.dropout,
        cosine_scale=model.cosine_scale,
        max_length=model.max_length,
        truncation=model.truncation,
        text_prefix=encoder.text_prefix,
        base_model=encoder.name,
        task=task,
    )


def build_classifier(
    recipe: ClassifierRecipe, encoder: EncoderSource, labels: list[str], task: str = ""
) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """A fresh classifier over the encoder, with the head spec taken from the recipe."""
    spec = head_spec(recipe, encoder, labels, task)
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder.path)
        loaded = load_encoder(encoder.path)
    except (OSError, ValueError) as exc:
        raise TuneloopError(f"cannot load encoder from {encoder.path}: {first_line(exc)}") from exc
    # No longer than the encoder has positions for (RoBERTa-style encoders keep two for the padding offset):
    # a longer model.max_length would fail on the first long text.
    offset = 2 if loaded.config.model_type in ("roberta", "xlm-roberta") else 0
    positions = getattr(loaded.config, "max_position_embeddings", spec.max_length + offset) - offset
    model = TextClassifier(loaded, replace(spec, max_length=min(spec.max_length, positions)))
    settings = recipe.train
    if recipe.model.layers is not None:
        if settings.method == "lora":
            raise TuneloopError(
                "model.layers does not go with train.method=lora: a LoRA version points at its whole base "
                "encoder; use train.method=full or unset model.layers"
            )
        keep_lower_layers(loaded, recipe.model.layers)
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model  # only LoRA runs need peft

        adapters = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.lora_targets,
        )
        try:
            model.encoder = get_peft_model(model.encoder, adapters)
        except ValueError as exc:
            raise TuneloopError(
                f"train.lora_targets {settings.lora_targets} do not name layers of {encoder.name}: {first_line(exc)}"
            ) from exc
        return model, tokenizer
    if settings.freeze_embeddings:
        loaded.get_input_embeddings().weight.requires_grad_(False)
    return model, tokenizer


def _task(
    name: str,
    classifier: TextClassifier,
    data: PreparedData,
    tokenizer: PreTrainedTokenizerBase,
    recipe: ClassifierRecipe,
) -> Task:
    """A labelled set, its head and its cross-entropy (the first loss term: the one the log shows)."""
    index = {label: i for i, label in enumerate(data.labels)}
    labels = data.train["label"].map(index).to_numpy()
    tc = recipe.train
    weights = class_weights(labels, len(data.labels)) if tc.class_weighted else None
    share = 1 - tc.distill_weight if tc.teachers and not name else 1.0  # distillation takes the rest
    rows, owners = text_windows(tokenizer, data.train["text"].tolist(), classifier.spec)  # a row per window
    return Task(
        name,
        classifier,
        rows,
        labels[owners],
        data.val["text"].tolist(),
        data.val["label"].map(index).to_numpy(),
        [CrossEntropy(share, tc.label_smoothing, weights)],
        owners,
    )


@dataclass
class Preparation:
    """What a run works out before its first step, and the seconds it took (counted as training time)."""

    seconds: float = 0.0
    embeddings: torch.Tensor | None = None  # the first task's training texts, by the untrained encoder
    outlier_exposure: OutlierExposureReport | None = None
    distillation: DistillationReport | None = None


def prepare_terms(
    recipe: ClassifierRecipe,
    task: Task,
    data: PreparedData,
    tokenizer: PreTrainedTokenizerBase,
    pad_id: int,
    fresh: bool,
) -> Preparation:
    """Outlier exposure and distillation as loss terms of the model's own task, as the recipe asks, and the
    embeddings a fresh run starts its class vectors from. Both terms are worked out again on resume (from the
    untrained encoder, and from the same teachers), so a resumed run sees the same messages and soft labels."""
    tc, started, done = recipe.train, time.perf_counter(), Preparation()
    exposed = tc.outlier_exposure > 0 and not tc.dp
    if (fresh and recipe.model.head_init == "centroids") or exposed:
        done.embeddings = embed_all(task.classifier, task.train_ids, pad_id)
    if exposed and done.embeddings is not None:
        term, done.outlier_exposure = outlier_exposure(
            task.classifier,
            tokenizer,
            data.train["text"].tolist(),
            done.embeddings,
            lambda ids: embed_all(task.classifier, ids, pad_id),
            tc.outlier_exposure,
            tc.outlier_exposure_max_similarity,
            tc.batch_size,
            tc.seed,
        )
        task.terms += [term] if term else []
    if tc.teachers:
        texts, text_labels = data.train["text"].tolist(), data.train["label"].map(data.labels.index).to_numpy()
        soft, done.distillation = teacher_targets(recipe, texts, data.labels, text_labels)
        # One soft label per row the model reads (a text read in windows has several).
        assert task.owners is not None  # _task says which text each row reads
        task.terms.append(Distillation(tc.distill_weight, soft[task.owners], tc.distill_temperature))
    done.seconds = time.perf_counter() - started
    return done


def start_heads(recipe: ClassifierRecipe, tasks: list[Task], own: torch.Tensor | None, pad_id: int) -> float:
    """A fresh run's class vectors at their training texts' centroids (`own`: the first task's embeddings), set
    on the whole model before anything shards it; returns the seconds it took. DP-SGD starts its own (noisy)."""
    if recipe.model.head_init != "centroids" or recipe.train.dp or own is None:
        return 0.0
    started = time.perf_counter()
    for task in tasks:
        embeddings = own if task is tasks[0] else embed_all(task.classifier, task.train_ids, pad_id)
        task.classifier.init_head_from_centroids(embeddings, torch.tensor(task.train_labels))
    return time.perf_counter() - started


CONTRASTIVE_FILE = "contrastive.json"  # in the run folder: the stage's record, for a resumed run's report


def start_weights(
    recipe: ClassifierRecipe,
    regime: TrainingRegime,
    tasks: list[Task],
    prepared: Preparation,
    saved: dict[str, Any] | None,
    run: VersionFolder,
    plan: DevicePlan,
    pad_id: int,
    show_progress: bool,
) -> float:
    """The weights the loop starts from: a checkpoint's; or, fresh, the few-shot regime's contrastive stage and then
    the class vectors at the training centroids (of the encoder as the stage left it). Returns the seconds spent."""
    if saved:
        restore_weights(saved, tasks, run, recipe.train.strategy)
        if (run.root / CONTRASTIVE_FILE).is_file():
            regime.contrastive = ContrastiveReport.model_validate_json((run.root / CONTRASTIVE_FILE).read_text())
        return 0.0
    settings, embeddings = recipe.train.few_shot, prepared.embeddings
    if regime.name != "few-shot" or not settings.contrastive_steps:
        return start_heads(recipe, tasks, embeddings, pad_id)
    task = tasks[0]
    regime.contrastive = contrastive_stage(
        task.classifier,
        task.train_ids,
        task.train_labels,
        settings,
        plan,
        pad_id,
        recipe.train.seed,
        recipe.train.weight_decay,
        show_progress,
    )
    (run.root / CONTRASTIVE_FILE).write_text(regime.contrastive.model_dump_json(indent=2))
    started = time.perf_counter()
    if embeddings is not None:  # the centroids of the encoder the stage trained
        embeddings = embed_all(task.classifier, task.train_ids, pad_id)
    start_heads(recipe, tasks, embeddings, pad_id)
    if embeddings is not None and settings.head_steps:
        fit_head(task.classifier.head, embeddings, task.train_labels, settings.head_steps)
    return regime.contrastive.seconds + time.perf_counter() - started


def make_stepper(
    recipe: ClassifierRecipe,
    tasks: list[Task],
    plan: DevicePlan,
    world: World,
    pad_id: int,
    start_embeddings: torch.Tensor | None,
) -> Stepper:
    """The stepper the recipe and the launch call for: DP-SGD, FSDP over torchrun's processes, or one process /
    DDP through Accelerate. `start_embeddings`: a fresh private run's class vectors start from them (noisily)."""
    model, heads = tasks[0].classifier, [task.classifier for task in tasks[1:]]
    if recipe.train.dp:
        from tuneloop.training.private import PrivateStepper  # only private runs import Opacus (seconds)

        centroids = recipe.model.head_init == "centroids"
        private = PrivateStepper(tasks[0], plan, pad_id, adamw(model, recipe, heads), recipe.train, centroids)
        if start_embeddings is not None:
            private.start_head(start_embeddings)
        return private
    make_optimizer = functools.partial(adamw, model, recipe, heads)
    kind = ShardedStepper if world.distributed and recipe.train.strategy == "fsdp" else ReplicatedStepper
    return kind(model, plan, world, recipe, pad_id, make_optimizer)


def restore_weights(saved: dict[str, Any], tasks: list[Task], run: VersionFolder, strategy: str) -> None:
    """A checkpoint's weights into the model and the other tasks' heads, before any wrapping or sharding."""
    if saved["state"].get("strategy", "ddp") != strategy:
        raise TuneloopError(
            f"cannot resume {run.root}: its checkpoint was written with train.strategy="
            f"{saved['state'].get('strategy', 'ddp')}, and the run's recipe now says train.strategy="
            f"{strategy}; put the strategy back in {run.config}, or start the run again without --resume"
        )
    try:
        tasks[0].classifier.load_state_dict(saved["model"])
    except RuntimeError as exc:  # e.g. a checkpoint from before the embeddings trained by rows
        raise TuneloopError(
            f"cannot resume {run.root}: its checkpoint does not fit this model "
            f"({first_line(exc)}); start the run again without --resume"
        ) from exc
    for task in tasks[1:]:
        task.classifier.head.load_state_dict(saved["heads"][task.name])


def build_tasks(
    recipe: ClassifierRecipe,
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    encoder: EncoderSource,
    datasets: dict[str, PreparedData],
) -> list[Task]:
    """A task per labelled set (tokenised once), the first one the model's own; the others get their own heads on the
    model's encoder object, so that one set of encoder weights learns them all."""
    (first, data), *others = datasets.items()
    with stage("tokenise"):
        tasks = [_task(first, model, data, tokenizer, recipe)]
        for name, extra in others:
            head = TextClassifier(model.encoder, head_spec(recipe, encoder, extra.labels, name))
            tasks.append(_task(name, head, extra, tokenizer, recipe))
    return tasks


def resumed_state(
    saved: dict[str, Any], stepper: Stepper, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> LoopState:
    """A checkpoint's loop state, with the stepper's optimizer, the schedule and the random generators restored."""
    state = LoopState.restored(saved["state"])
    stepper.load_checkpoint_state(saved, mid_epoch=state.step_in_epoch > 0)
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved["rng"])
    log.info("resuming at epoch %d step %d", state.epoch, state.step_in_epoch)
    return state


def fine_tune(
    recipe: ClassifierRecipe,
    data: PreparedData,
    encoder: EncoderSource,
    run: VersionFolder,
    resume: bool = False,
    show_progress: bool = True,
    step_callback: StepCallback | None = None,
    callback_every: int = 0,
    other_tasks: dict[str, PreparedData] | None = None,
    task_name: str = "",
) -> TrainResult:
    """Build the model, its tasks, loss terms and stepper, then run the loop (loop.fit); returns where the best
    model (by validation macro-F1) was saved.

    `other_tasks` makes it multi-task: each labelled set gets its own head on the shared encoder, batches of
    all tasks are interleaved, and the best epoch is the one with the best mean validation macro-F1.
    `data` is the first task (`task_name`), whose head is the saved model's own. `step_callback` runs every
    `callback_every` steps and after each epoch (see loop.StepCallback).
    """
    tc, world = recipe.train, current_world()
    plan = plan_device(tc, private=tc.dp is not None)
    use_threads(tc.threads)
    seed_everything(tc.seed)
    run.root.mkdir(parents=True, exist_ok=True)
    regime = choose_regime(recipe, data, world, multitask=bool(other_tasks))
    data = with_label_names(data, regime, tc.few_shot.label_names)
    model, tokenizer = build_classifier(recipe, encoder, data.labels, task_name if other_tasks else "")
    long_texts = settle_truncation(recipe, model.spec, tokenizer, data)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"truncation": long_texts.truncation})})
    if tc.dp:
        from tuneloop.training import private as dpsgd

        dpsgd.check_private_recipe(recipe, len(data.train))
        dpsgd.freeze_embedding_tables(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    profiler = Profiler(run.root / PROFILE_FOLDER, tc.profile_steps) if tc.profile and world.main else None
    if profiler:
        profiler.start()
    tasks = build_tasks(recipe, model, tokenizer, encoder, {task_name: data, **(other_tasks or {})})
    train_only_used_rows(model.torch_encoder, [ids for task in tasks for ids in task.train_ids])
    model.to(plan.device)
    saved = load_checkpoint(run, CHECKPOINT) if resume else None
    prepared = prepare_terms(recipe, tasks[0], data, tokenizer, pad_id, fresh=not saved)
    state = LoopState(strategy=tc.strategy, train_seconds=prepared.seconds)
    state.train_seconds += start_weights(recipe, regime, tasks, prepared, saved, run, plan, pad_id, show_progress)
    stepper = make_stepper(recipe, tasks, plan, world, pad_id, None if saved else prepared.embeddings)
    regime.epochs = epochs_for(regime, tc.epochs, stepper.steps_per_epoch(tasks))
    scheduler = learning_rate_schedule(tc, stepper.optimizer, stepper.steps_per_epoch(tasks) * regime.epochs)
    if saved:
        state = resumed_state(saved, stepper, scheduler)
    log.info("training on %s (%s)", plan.describe(), type(stepper).__name__)
    loop_settings = tc.model_copy(update={"epochs": regime.epochs})
    parts = (tasks, stepper, scheduler, tokenizer, run, world, profiler, step_callback, callback_every)
    training = Training(loop_settings, *parts, min_steps=regime.min_steps or 0, smoothing=regime.smoothing)
    state = fit(training, state, show_progress)
    summary = profiler.finish() if profiler else None  # a run shorter than the profiled window
    return TrainResult(
        best_dir=run.model,
        best_epoch=state.best_epoch,
        best_val_macro_f1=state.best_f1,
        best_step=state.best_step,
        history=state.history,
        train_seconds=state.train_seconds,
        stopped_early=state.stopped_early,
        privacy=stepper.privacy(),
        profile=summary.as_dict() if summary else None,
        outlier_exposure=prepared.outlier_exposure,
        distillation=prepared.distillation,
        device=plan.describe(),
        regime=regime,
        long_texts=long_texts,
    )


def shared_logits(predictor: Predictor, texts: list[str], world: World) -> tuple[np.ndarray, int]:
    """Every text's logits as `predictor` serves them (every task's columns, the model's own first), each rank
    predicting its share, on every rank; and how many ranks predicted."""
    mine = np.arange(len(texts))[world.rank :: world.size]
    logits = predictor.logits([texts[i] for i in mine]) if len(mine) else None
    shares = [(rows, share) for rows, share in world.gather((mine, logits)) if share is not None]
    out = np.zeros((len(texts), shares[0][1].shape[1] if shares else len(predictor.labels)), dtype=np.float32)
    for rows, share in shares:
        out[rows] = share
    return out, len(shares)


def _fold_data(data: PreparedData, fold: int) -> PreparedData:
    pool = pd.concat([data.train, data.val], ignore_index=True)
    folds = data.folds
    assert folds is not None  # prepared with data.kfold, as a cross-validated run is
    splits = {
        "train": pool[folds != fold].reset_index(drop=True),
        "val": pool[folds == fold].reset_index(drop=True),
        "test": data.test,
    }
    return PreparedData(splits=splits, labels=data.labels, report=data.report, fingerprint=fingerprint_of(splits))


def cross_validate(
    recipe: ClassifierRecipe, data: PreparedData, encoder: EncoderSource, run: VersionFolder, show_progress: bool
) -> tuple[TrainResult, CrossValidationReport]:
    """k-fold cross-validation on train + val: one model per fold; the best fold's model becomes the run's."""
    folds = []
    for index in range(recipe.data.kfold or 0):
        result = fine_tune(recipe, _fold_data(data, index), encoder, run.fold(index), show_progress=show_progress)
        folds.append(Fold(fold=index, val_macro_f1=result.best_val_macro_f1, best_epoch=result.best_epoch))
    scores = np.array([f.val_macro_f1 for f in folds], dtype=float)
    best = int(scores.argmax())
    summary = CrossValidationReport(
        k=len(folds),
        folds=folds,
        mean_val_macro_f1=float(scores.mean()),
        std_val_macro_f1=float(scores.std()),
        selected_fold=best,
    )
    run.cross_validation.write_text(summary.model_dump_json(indent=2))
    shutil.copytree(run.fold(best).model, run.model)
    result = TrainResult(
        best_dir=run.model, best_epoch=folds[best].best_epoch, best_val_macro_f1=folds[best].val_macro_f1
    )
    return result, summary


@dataclass
class Settled:
    """What the end of training decides before the test report: temperatures, the baseline's comparison (and the
    blend it may bring), and the runtime that serves."""

    calibration: dict[str, TemperatureFit]
    baseline: BaselineReport | None
    serving: ServingRecord


def _baseline_alone(recipe: ClassifierRecipe, data: PreparedData, run: VersionFolder) -> TrainResult:
    """train.baseline=only: the TF-IDF baseline fitted as the run's model, no encoder trained."""
    fitted = fit_alone(recipe, run, data)
    val = fitted.baseline.validation
    return TrainResult(
        best_dir=run.model,
        best_epoch=0,
        best_val_macro_f1=val.macro_f1 if val else None,
        train_seconds=fitted.fit_seconds,
        device="cpu (scikit-learn)",
        baseline=fitted,
    )


def settle_serving(
    recipe: ClassifierRecipe,
    run: VersionFolder,
    data: PreparedData,
    others: dict[str, PreparedData],
    cross_validation: CrossValidationReport | None,
) -> Settled:
    """Calibrate the run's heads on their validation splits, weigh the baseline and the blend, then build and
    check what will serve it."""
    calibration = {}
    # Under k-fold the kept model trained on the other folds: its own fold is the split it never saw.
    own = _fold_data(data, cross_validation.selected_fold) if cross_validation else data
    if recipe.eval.calibrate:
        vals = {next(iter(recipe.tasks), ""): own.val, **{name: task_data.val for name, task_data in others.items()}}
        calibration = calibrate_run(run, vals, recipe.eval.calibration_bins)
    baseline = settle_baseline(recipe, run, own.train, own.val, data.test, data.labels)
    return Settled(calibration, baseline, choose_runtime(run, data, recipe.serving, recipe.train.threads))


def evaluate_run(
    recipe: ClassifierRecipe,
    run: VersionFolder,
    result: TrainResult,
    data: PreparedData,
    others: dict[str, PreparedData],
    cross_validation: CrossValidationReport | None,
    world: World = ONE_PROCESS,
) -> ClassifierReport | None:
    """The test report of the run's best model (and of each other task's head), written into the run, scored
    as it will serve. Under torchrun rank 0 calibrates and picks the runtime, every rank scores its share of the
    test split, and rank 0 writes the report (the other ranks return None)."""
    settled = world.on_rank_zero(lambda: settle_serving(recipe, run, data, others, cross_validation))
    served = load_model(run.root, threads=recipe.train.threads)
    # Scored through the predictor, not its bare model: int8 serving may answer close calls with fp32.
    test_logits, scorers = shared_logits(served, data.test["text"].tolist(), world)
    if not world.main or settled is None:
        return None
    calibration, serving = settled.calibration, settled.serving
    title = f"{recipe.name}: test report" + (f" — task {served.spec.task}" if others else "")
    report = evaluate_classifier(
        served,
        data.test,
        recipe.eval,
        train=data.train,
        history=result.history,
        title=title,
        leaked=leaked_positions(data.report),
        test_logits=served.own_logits(test_logits),
    )
    report.serving = serving
    if world.distributed:
        report.processes = Processes(count=world.size, strategy=recipe.train.strategy, test_scored_by=scorers)
    explain_report(report, served, recipe.eval.explanations)
    report.calibration = calibration.get(next(iter(recipe.tasks), ""))
    if others:
        report.tasks = {name: _task_report(recipe, served, name, extra, calibration) for name, extra in others.items()}
    report.train_seconds, report.best_epoch, report.best_step = (
        result.train_seconds,
        result.best_epoch,
        result.best_step,
    )
    report.device, report.data = result.device, data.report
    for name, value in (
        ("cross_validation", cross_validation),
        ("privacy", result.privacy),
        ("outlier_exposure", result.outlier_exposure),
        ("distillation", result.distillation),
        ("regime", result.regime),
        ("baseline", settled.baseline or result.baseline),
        ("long_texts", result.long_texts),
    ):
        if value is not None:
            setattr(report, name, value)
    write_report(report, run.root)
    return report


def _task_report(
    recipe: ClassifierRecipe,
    served: Predictor,
    name: str,
    task_data: PreparedData,
    calibration: dict[str, TemperatureFit],
) -> ClassifierReport:
    """The report of a multi-task model's other task `name`, scored through the same predictor."""
    head, head_logits = served.task(name, served.logits(task_data.test["text"].tolist()))
    report = evaluate_classifier(
        head,
        task_data.test,
        recipe.eval,
        train=task_data.train,
        title=f"{recipe.name}: task {name}",
        leaked=leaked_positions(task_data.report),
        test_logits=head_logits,
    )
    if name in calibration:
        report.calibration = calibration[name]
    return report


def register_classifier(
    registry: Registry,
    recipe: ClassifierRecipe,
    run: VersionFolder,
    report: ClassifierReport,
    result: TrainResult,
    encoder: EncoderSource,
    fingerprints: list[str],
    parent: str | None,
) -> ModelVersion:
    """The run as a candidate version, its headline metrics (and each other task's) in the registry row."""
    test = report.test
    metrics: dict[str, object] = {
        "accuracy": test.accuracy,
        "macro_f1": test.macro_f1,
        "weighted_f1": test.weighted_f1,
        "ece": test.calibration.ece,
        "train_seconds": result.train_seconds,
        "best_val_macro_f1": result.best_val_macro_f1,
        "runtime": (report.serving or {}).get("runtime"),
        "regime": result.regime.name if result.regime else None,
    }
    if result.privacy:
        metrics.update(dp_epsilon=result.privacy.epsilon, dp_delta=result.privacy.delta)
    for name, task_report in report.other_tasks().items():
        metrics.update({f"{name}.accuracy": task_report.test.accuracy, f"{name}.macro_f1": task_report.test.macro_f1})
    # A multi-task version's data is all its tasks' splits: the fingerprint covers each in order.
    data_fingerprint = fingerprints[0] if len(fingerprints) == 1 else fingerprint(fingerprints)
    return register_run(
        registry,
        recipe,
        run,
        base_model=report.base_model or encoder.name,
        fingerprint=data_fingerprint,
        metrics=metrics,
        keep_checkpoints=recipe.train.keep_checkpoints,
        parent=parent,
    )


def _start_run_folder(
    recipe: ClassifierRecipe,
    data: PreparedData,
    others: dict[str, PreparedData],
    encoder: EncoderSource,
    parent: str | None,
) -> VersionFolder:
    """A new run folder holding the recipe, the frozen splits and the encoder the run starts from."""
    # Audited before the run folder exists, so data it cannot audit leaves nothing behind.
    audit = audit_training_labels(data, encoder, recipe.data.kfold, recipe.data.seed) if recipe.train.audit else None
    folder = new_run_folder(recipe)
    start_run(recipe, folder)
    if audit is not None:
        audit.write_csv(folder.root / AUDIT_FILE)
        data.report["label_audit"] = audit.summary
    save_prepared(data, folder.data())
    for name, task_data in others.items():
        save_prepared(task_data, folder.data(name))
    folder.encoder.write_text(
        json.dumps(
            {"name": encoder.name, "path": str(encoder.path), "text_prefix": encoder.text_prefix, "parent": parent}
        )
    )
    return folder


def _prepared_by_rank_zero(
    recipe: ClassifierRecipe,
    registry: Registry,
    world: World,
    prepared: tuple[PreparedData, EncoderSource] | None,
    parent: str | None,
) -> tuple[VersionFolder, PreparedData, EncoderSource]:
    """Under torchrun: rank 0 prepares the data and the run folder, the other ranks read them from it."""

    def prepare() -> tuple[VersionFolder, PreparedData, EncoderSource]:
        data, encoder = prepared or prepare_for_model(recipe, registry)
        return _start_run_folder(recipe, data, {}, encoder, parent), data, encoder

    made = world.on_rank_zero(prepare)
    if made:
        world.broadcast(str(made[0].root))
        return made
    folder = VersionFolder(Path(world.broadcast(None)))
    started_from = json.loads(folder.encoder.read_text())
    return folder, load_prepared(folder.data()), resolve_encoder(started_from["name"], registry)


def run(
    recipe: ClassifierRecipe,
    resume: str | Path | None = None,
    register: bool = True,
    show_progress: bool = True,
    step_callback: StepCallback | None = None,
    callback_every: int = 0,
    prepared: tuple[PreparedData, EncoderSource] | None = None,
    parent: str | None = None,
) -> ClassifierOutcome:
    """Train (or resume: 'latest' or a run folder), evaluate on the test split, write the report and
    register a candidate.

    `prepared` skips the data stage (retraining brings its own splits); `parent` is recorded in the registry.
    With `recipe.tasks` it trains one encoder for all the tasks (multi-task); the first is the model's own.
    """
    registry = Registry(recipe.registry)
    plan = plan_device(recipe.train, private=recipe.train.dp is not None)
    if plan.on_gpu:
        torch.cuda.set_device(plan.device)  # NCCL's collectives run on this process's own GPU
    world = join_world(process_group_backend(plan))
    try:
        return _run(
            recipe, registry, world, resume, register, show_progress, step_callback, callback_every, prepared, parent
        )
    finally:
        leave_world()


@dataclass
class Started:
    """A run folder ready to train in: the recipe it trains with, its data and encoder, and its parent version."""

    recipe: ClassifierRecipe
    folder: VersionFolder
    data: PreparedData
    others: dict[str, PreparedData]
    encoder: EncoderSource
    parent: str | None


def start(
    recipe: ClassifierRecipe,
    registry: Registry,
    world: World,
    resume: str | Path | None,
    prepared: tuple[PreparedData, EncoderSource] | None,
    parent: str | None,
) -> Started:
    """A new run folder with its data prepared (by rank 0 alone under torchrun), or the one `resume` names with
    the recipe it started with."""
    if resume is None and world.distributed:
        folder, data, encoder = _prepared_by_rank_zero(recipe, registry, world, prepared, parent)
        return Started(recipe, folder, data, {}, encoder, parent)
    if resume is not None:
        folder = resume_folder(recipe, resume, CHECKPOINT)
        # The run continues with the recipe it started with; where things live is the caller's.
        saved = stored_recipe(read_yaml_mapping(folder.config))
        recipe = validated(ClassifierRecipe, {**saved, "registry": recipe.registry.model_dump()}, f"{folder.config}: ")
        others = {name: load_prepared(folder.data(name)) for name in list(recipe.tasks)[1:]}
        started_from = json.loads(folder.encoder.read_text())
        encoder = resolve_encoder(started_from["name"], registry)
        return Started(recipe, folder, load_prepared(folder.data()), others, encoder, started_from.get("parent"))
    if recipe.tasks and prepared is None:
        all_tasks, encoder = prepare_tasks(recipe.tasks, recipe, registry)
        data, *rest = all_tasks.values()
        others = dict(zip(list(recipe.tasks)[1:], rest, strict=True))
    else:
        data, encoder = prepared or prepare_for_model(recipe, registry)
        others = {}
    return Started(recipe, _start_run_folder(recipe, data, others, encoder, parent), data, others, encoder, parent)


def _run(
    recipe: ClassifierRecipe,
    registry: Registry,
    world: World,
    resume: str | Path | None,
    register: bool,
    show_progress: bool,
    step_callback: StepCallback | None,
    callback_every: int,
    prepared: tuple[PreparedData, EncoderSource] | None,
    parent: str | None,
) -> ClassifierOutcome:
    check_recipe(recipe, world)
    if resume is None:  # a resumed run asks the teachers of the recipe it started with, read below
        check_teachers(recipe, registry)
    begun = start(recipe, registry, world, resume, prepared, parent)
    recipe, folder, data, others, encoder = begun.recipe, begun.folder, begun.data, begun.others, begun.encoder
    cross_validation = None
    if recipe.train.baseline == "only":
        result = _baseline_alone(recipe, data, folder)
    elif recipe.data.kfold and resume is None:
        result, cross_validation = cross_validate(recipe, data, encoder, folder, show_progress)
    else:
        result = fine_tune(
            recipe,
            data,
            encoder,
            folder,
            resume=resume is not None,
            show_progress=show_progress,
            step_callback=step_callback,
            callback_every=callback_every,
            other_tasks=others,
            task_name=next(iter(recipe.tasks), ""),
        )
    report = evaluate_run(recipe, folder, result, data, others, cross_validation, world)
    if report is None:  # rank 0 writes the report and registers
        return ClassifierOutcome(folder=folder, report=None, report_html=folder.report_html, version=None, train=result)
    version, html = None, folder.report_html
    if register:
        fingerprints = [d.fingerprint for d in (data, *others.values())]
        version = register_classifier(registry, recipe, folder, report, result, encoder, fingerprints, begun.parent)
        folder = registry.folder(version)  # the run folder may be gone (train.keep_checkpoints)
        html = folder.report_html
    return ClassifierOutcome(
        folder=folder, report=report, report_html=html, version=version, train=result, cross_validation=cross_validation
    )
