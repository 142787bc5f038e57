"""Recipe: fine-tune a packaged encoder into a text classifier on a CPU, evaluate it and register it.

`run(recipe)` goes data → fine-tune → evaluate → register a candidate. The loop (`fine_tune`) is written out
top to bottom on purpose: tokenise once, group batches by length, AdamW with warmup and decay, clip,
evaluate on validation macro-F1, keep the best, stop early, checkpoint so that `--resume` continues bit
for bit.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import (
    ClassifierRecipe,
    DataConfig,
    TrainConfig,
    read_yaml_mapping,
    stored_recipe,
    validated,
)
from tuneloop.data.clean import clean_text
from tuneloop.data.off_topic import languages_of, off_topic_messages
from tuneloop.data.prepare import (
    PreparedData,
    fingerprint,
    fingerprint_of,
    leaked_positions,
    length_percentiles,
    load_prepared,
    prepare_data,
    save_prepared,
)
from tuneloop.errors import TuneloopError, first_line
from tuneloop.evaluate.audit import AUDIT_FILE, audit_training_labels
from tuneloop.evaluate.calibrate import calibrate_run
from tuneloop.evaluate.report import add_explanations, evaluate_classifier, write_report
from tuneloop.evaluate.serving import choose_runtime
from tuneloop.models.classifier import (
    HeadSpec,
    TextClassifier,
    freeze_lower_layers,
    keep_lower_layers,
    length_groups,
    load_encoder,
    pad_right,
    predict_proba,
    save_task_heads,
    tokenize,
)
from tuneloop.models.encoders import EncoderSource, resolve_encoder
from tuneloop.models.predictor import Predictor, load_model, locate_model
from tuneloop.models.trained_rows import plain_embeddings, train_only_used_rows
from tuneloop.privacy.mask import masker
from tuneloop.profiling import PROFILE_FOLDER, Profiler, stage
from tuneloop.registry import ModelVersion, Registry, VersionFolder
from tuneloop.training.common import (
    MetricsLog,
    TrainingProgress,
    cpu_supports_bf16,
    load_checkpoint,
    new_run_folder,
    parameter_groups,
    register_run,
    restore_rng,
    resume_folder,
    rng_state,
    save_checkpoint,
    seed_everything,
    start_run,
    use_threads,
)
from tuneloop.training.distributed import (
    ONE_PROCESS,
    World,
    batch_normaliser,
    check_recipe,
    current_world,
    full_optimizer_state,
    full_weights,
    join_world,
    leave_world,
    load_full_optimizer_state,
    shard_loss,
    shard_model,
)

log = logging.getLogger(__name__)

CHECKPOINT = "trainer.pt"
StepCallback = Callable[[dict, TextClassifier, PreTrainedTokenizerBase], None]


@dataclass
class TrainResult:
    """What the loop leaves: the best model's folder and how it got there."""

    best_dir: Path
    best_epoch: int
    best_val_macro_f1: float | None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False
    privacy: dict | None = None  # what a train.dp run spent (PrivacySpent)
    profile: dict | None = None  # train.profile: the summary (ProfileSummary), the trace beside it
    outlier_exposure: dict | None = None  # which off-topic messages train.outlier_exposure showed the model
    distillation: dict | None = None  # train.teachers: who taught, and how


@dataclass
class ClassifierOutcome:
    folder: VersionFolder  # the registered version's folder once registered, else the run's
    report: dict
    report_html: Path
    version: ModelVersion | None
    train: TrainResult
    cross_validation: dict | None = None


def token_counter(encoder: EncoderSource) -> Callable[[list[str]], list[int]]:
    """texts → token counts with the encoder's tokenizer, for the data report."""
    tokenizer = AutoTokenizer.from_pretrained(encoder.path)
    return lambda texts: [len(ids) for ids in tokenizer([encoder.text_prefix + t for t in texts])["input_ids"]]


def prepare_for_model(recipe: ClassifierRecipe, registry: Registry) -> tuple[PreparedData, EncoderSource]:
    """Prepare the data and pick the encoder (auto looks at the cleaned texts)."""
    if recipe.tasks:
        raise TuneloopError(
            f"this config trains several tasks ({', '.join(recipe.tasks)}); look at each task's "
            f"data on its own: tuneloop data inspect --data FILE"
        )
    prepared, encoder = prepare_tasks({"": recipe.data}, recipe, registry)
    return prepared[""], encoder


def prepare_tasks(
    tasks: dict[str, DataConfig], recipe: ClassifierRecipe, registry: Registry
) -> tuple[dict[str, PreparedData], EncoderSource]:
    """Prepare each task's data on its own, and pick the one encoder for all (auto looks at their texts)."""
    mask = masker(recipe.privacy)
    first_pass = {name: prepare_data(data, mask=mask) for name, data in tasks.items()}
    texts = [t for prepared in first_pass.values() for t in prepared.train["text"]]
    encoder = resolve_encoder(recipe.model.name, registry, texts)
    lengths = token_counter(encoder)
    # The report's token lengths need the tokenizer, which "auto" can only pick after reading the data.
    for prepared in first_pass.values():
        texts = pd.concat([prepared.splits[name]["text"] for name in prepared.splits]).tolist()
        prepared.report["text_length"] = length_percentiles(texts, lengths)
    return first_pass, encoder


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, grouped: bool = True) -> list[list[int]]:
    """Shuffled batches of similar-length examples, so dynamic padding wastes little compute.

    Sorting within mega-batches of 50 batches keeps most of the randomness of a full shuffle.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if not grouped:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega].tolist(), key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def embed_all(model: TextClassifier, ids: list[list[int]], pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """Pooled embeddings of tokenised texts (for the centroid head initialisation)."""
    model.eval()
    out = torch.zeros(len(ids), model.encoder.config.hidden_size)
    for chosen in length_groups([len(x) for x in ids], batch_size):
        input_ids, mask = pad_right([ids[i] for i in chosen], pad_id)
        out[chosen] = model.embed(input_ids, mask).float()
    return out


def off_topic_rows(
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    train_embeddings: torch.Tensor,
    pad_id: int,
    recipe: ClassifierRecipe,
) -> tuple[list[list[int]], dict]:
    """The shipped off-topic messages outlier exposure shows this model, tokenised: the training part in the
    data's languages, less those as close to a training text as train.outlier_exposure_max_similarity (a
    business whose intents cover cooking keeps its recipes in scope); and a record of what was used."""
    languages = languages_of(data.train["text"].tolist())
    texts = [clean_text(t) for t in off_topic_messages("train", languages)["text"]]
    ids = tokenize(tokenizer, texts, model.spec)
    off = F.normalize(embed_all(model, ids, pad_id), dim=-1)
    known = F.normalize(train_embeddings, dim=-1)
    closest = torch.cat([(chunk @ known.T).max(dim=1).values for chunk in off.split(512)])
    kept = (closest < recipe.train.outlier_exposure_max_similarity).nonzero().flatten().tolist()
    record = {
        "weight": recipe.train.outlier_exposure,
        "languages": list(languages),
        "messages": len(kept),
        "left_out_as_too_close": len(ids) - len(kept),
        "examples_left_out": [
            texts[i]
            for i in (closest >= recipe.train.outlier_exposure_max_similarity).nonzero().flatten().tolist()[:10]
        ],
    }
    log.info(
        "outlier exposure: %d off-topic messages (%d left out as too close to the training texts)",
        len(kept),
        len(ids) - len(kept),
    )
    return [ids[i] for i in kept], record


def uniform_target_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution over the labels (Hendrycks et al., 2019, outlier
    exposure): smallest when the model is equally unsure of every label."""
    return -torch.log_softmax(logits, dim=-1).mean(dim=-1).mean()


@contextlib.contextmanager
def _as_teacher(ref: str) -> Iterator[None]:
    """A teacher that does not resolve or load is named as one of train.teachers; the registry's or loader's
    own message says what is wrong with it."""
    try:
        yield
    except TuneloopError as exc:
        raise type(exc)(f"train.teachers: {ref}: {exc}") from None


def check_teachers(recipe: ClassifierRecipe, registry: Registry) -> None:
    """Every teacher names a registered version or a model folder: said before the data is prepared."""
    for ref in recipe.train.teachers:
        with _as_teacher(ref):
            locate_model(ref, registry)


def teacher_targets(
    recipe: ClassifierRecipe, texts: list[str], labels: list[str], train_labels: np.ndarray
) -> tuple[torch.Tensor, dict]:
    """The teachers' soft labels for the training texts: each teacher's softmax at train.distill_temperature,
    columns in this model's label order, averaged over the teachers; and a record of who taught."""
    tc = recipe.train
    registry = Registry(recipe.registry)
    summed = np.zeros((len(texts), len(labels)))
    names = []
    for ref in tc.teachers:
        # fp32 ONNX Runtime: the teacher's own answers, about twice as fast as PyTorch on a CPU.
        with _as_teacher(ref):
            teacher = load_model(ref, registry, runtime="onnx", threads=tc.threads)
        missing = sorted(set(labels) - set(teacher.labels))
        if missing or len(teacher.labels) != len(labels):
            raise TuneloopError(
                f"train.teachers: {teacher.ref} was trained on other labels than this data's "
                f"({'it lacks ' + ', '.join(missing[:5]) if missing else 'it has ' + str(len(teacher.labels))}); "
                "distil only from versions trained on the same labels"
            )
        order = [teacher.labels.index(label) for label in labels]
        logits = teacher.own_logits(teacher.logits(texts))[:, order]
        summed += torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / tc.distill_temperature, -1).numpy()
        names.append(teacher.ref)
    soft = torch.as_tensor(summed / len(tc.teachers), dtype=torch.float32)
    record = {
        "teachers": names,
        "weight": tc.distill_weight,
        "temperature": tc.distill_temperature,
        # How far the teachers are from the training labels: where they disagree, the soft labels pull the
        # model away from a label that may be wrong.
        "teachers_agree_with_training_labels": round(float((soft.argmax(1).numpy() == train_labels).mean()), 4),
    }
    log.info(
        "distillation from %s: they agree with %.2f%% of the training labels",
        ", ".join(names),
        100 * record["teachers_agree_with_training_labels"],
    )
    return soft, record


def distillation_loss(logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per text, KL(teachers ‖ model) at `temperature`, times temperature² so that its gradients keep the size
    of the cross-entropy's whatever the temperature (Hinton et al., 2015)."""
    log_student = torch.log_softmax(logits / temperature, dim=-1)
    return F.kl_div(log_student, soft_targets, reduction="none").sum(-1) * temperature**2


def rdrop_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per text, the symmetric KL between the model's answers on two dropout passes over it (Liang et al., 2021,
    R-Drop): zero when dropout changes nothing in the answer."""
    p, q = torch.log_softmax(first, dim=-1), torch.log_softmax(second, dim=-1)
    forward = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p ‖ q)
    backward = F.kl_div(p, q, log_target=True, reduction="none").sum(-1)  # KL(q ‖ p)
    return (forward + backward) / 2


def _optimizer(model: TextClassifier, recipe: ClassifierRecipe, heads: list[TextClassifier]) -> torch.optim.AdamW:
    head_parameters = [p for m in (model, *heads) for p in m.head.parameters()]
    groups = parameter_groups(model.encoder, recipe.train.lr, recipe.train.weight_decay)
    groups.append({"params": head_parameters, "lr": recipe.train.head_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def learning_rate_schedule(
    tc: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over train.warmup_ratio of the steps, then train.schedule's decay (transformers' schedules)."""
    name = {"constant": "constant_with_warmup", "cosine_restarts": "cosine_with_restarts"}.get(tc.schedule, tc.schedule)
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=int(tc.warmup_ratio * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs={"num_cycles": tc.cycles} if tc.schedule == "cosine_restarts" else None,
    )


def _class_weights(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    weights = len(labels) / (num_labels * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


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
        keep_lower_layers(model.encoder, recipe.model.layers)
    if settings.frozen_layers:
        freeze_lower_layers(model.encoder, settings.frozen_layers)
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
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    return model, tokenizer


@dataclass
class Task:
    """One labelled set and the head that learns it; a multi-task run trains several on one encoder."""

    name: str
    classifier: TextClassifier
    train_ids: list[list[int]]
    train_labels: np.ndarray
    val_texts: list[str]
    val_labels: np.ndarray
    loss_fn: torch.nn.CrossEntropyLoss


def _task(
    name: str,
    classifier: TextClassifier,
    data: PreparedData,
    tokenizer: PreTrainedTokenizerBase,
    recipe: ClassifierRecipe,
) -> Task:
    index = {label: i for i, label in enumerate(data.labels)}
    labels = data.train["label"].map(index).to_numpy()
    weights = _class_weights(labels, len(data.labels)) if recipe.train.class_weighted else None
    return Task(
        name,
        classifier,
        tokenize(tokenizer, data.train["text"].tolist(), classifier.spec),
        labels,
        data.val["text"].tolist(),
        data.val["label"].map(index).to_numpy(),
        torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=recipe.train.label_smoothing),
    )


def _epoch_batches(tasks: list[Task], batch_size: int, seed: int, grouped: bool) -> list[tuple[Task, list[int]]]:
    """Every task's batches for one epoch, interleaved in a seeded random order, so that no task's data
    comes in one block at the end of an epoch (where the learning rate is lowest)."""
    batches = [
        (task, batch)
        for task in tasks
        for batch in length_grouped_batches([len(x) for x in task.train_ids], batch_size, seed, grouped)
    ]
    if len(tasks) == 1:
        return batches
    return [batches[i] for i in np.random.default_rng(seed).permutation(len(batches))]


def validation_macro_f1(
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    label_ids: np.ndarray,
    world: World = ONE_PROCESS,
) -> float:
    """Macro-F1 on the validation texts, each rank predicting its share; rank 0's figure, on every rank."""
    mine, real = world.even_share(len(texts))
    predicted = predict_proba(model, tokenizer, [texts[i] for i in mine]).argmax(1)[:real]
    shares = world.gather((mine[:real], predicted))
    rows = np.concatenate([rows for rows, _ in shares])
    said = np.concatenate([said for _, said in shares])
    f1 = f1_score(label_ids[rows], said, average="macro", labels=range(len(model.spec.labels)), zero_division=0)
    return float(world.broadcast(f1))


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
    """The training loop; returns where the best model (by validation macro-F1) was saved.

    `other_tasks` makes it multi-task: each labelled set gets its own head on the shared encoder, batches of
    all tasks are interleaved, and the best epoch is the one with the best mean validation macro-F1.
    `data` is the first task (`task_name`), whose head is the saved model's own.

    `step_callback(state, model, tokenizer)` runs every `callback_every` steps and after each epoch, with
    state["global_step"] and state["train_seconds"] (which includes the centroid pass and excludes the
    callback itself); benchmarks use it to score the test set during training.
    """
    tc = recipe.train
    world = current_world()
    use_threads(tc.threads)
    seed_everything(tc.seed)
    run.root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_classifier(recipe, encoder, data.labels, task_name if other_tasks else "")
    if tc.dp:
        # Only private runs need Opacus; importing it costs seconds.
        from tuneloop.training import private as dpsgd

        dpsgd.check_private_recipe(recipe, len(data.train))
        dpsgd.freeze_embedding_tables(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The other tasks' classifiers share the model's encoder object: one set of encoder weights learns them all.
    heads = {
        name: TextClassifier(model.encoder, head_spec(recipe, encoder, extra.labels, name))
        for name, extra in (other_tasks or {}).items()
    }
    profiler = Profiler(run.root / PROFILE_FOLDER, tc.profile_steps) if tc.profile and world.main else None
    if profiler:
        profiler.start()
    with stage("tokenise"):
        tasks = [
            _task(task_name, model, data, tokenizer, recipe),
            *(_task(name, heads[name], extra, tokenizer, recipe) for name, extra in (other_tasks or {}).items()),
        ]
    train_only_used_rows(model.encoder, [ids for task in tasks for ids in task.train_ids])

    steps_per_epoch = (
        dpsgd.steps_per_epoch(len(data.train), tc.batch_size)
        if tc.dp
        else sum(-(-len(task.train_ids) // tc.batch_size) for task in tasks)
    )
    total_steps = steps_per_epoch * tc.epochs
    # DP-SGD clips each text's gradient in fp32: no autocast under it.
    use_bf16 = tc.bf16 and cpu_supports_bf16() and not tc.dp

    state = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_f1": None,
        "best_epoch": -1,
        "best_step": None,
        "improved_in_epoch": False,
        "bad_epochs": 0,
        "stopped_early": False,
        "history": [],
        "train_seconds": 0.0,
        # the epoch's loss so far, kept in checkpoints so that a resumed epoch reports its whole mean loss
        "epoch_loss_sum": 0.0,
        "epoch_texts": 0,
        # how the checkpoint's optimizer state is laid out: by parameter position (ddp) or by name (fsdp)
        "strategy": tc.strategy,
    }
    # The model's starting weights are settled on the whole, unsharded model; the optimizer is built after
    # FSDP has sharded it, over the shards.
    # From the untrained encoder, before any checkpoint loads, so a resumed run filters the same messages.
    own_embeddings = None
    centroids = recipe.model.head_init == "centroids" and not resume
    if not tc.dp and (centroids or tc.outlier_exposure):
        started = time.perf_counter()
        own_embeddings = embed_all(model, tasks[0].train_ids, pad_id)
        state["train_seconds"] += time.perf_counter() - started
    off_topic, exposure = [], None
    if tc.outlier_exposure and not tc.dp:
        started = time.perf_counter()
        off_topic, exposure = off_topic_rows(model, tokenizer, data, own_embeddings, pad_id, recipe)
        state["train_seconds"] += time.perf_counter() - started
    soft_targets, distillation = None, None
    if tc.teachers:  # asked again on resume: the same versions give the same answers
        started = time.perf_counter()
        soft_targets, distillation = teacher_targets(
            recipe, data.train["text"].tolist(), data.labels, tasks[0].train_labels
        )
        state["train_seconds"] += time.perf_counter() - started
    saved = load_checkpoint(run, CHECKPOINT) if resume else None
    if saved:
        if saved["state"].get("strategy", "ddp") != tc.strategy:
            raise TuneloopError(
                f"cannot resume {run.root}: its checkpoint was written with train.strategy="
                f"{saved['state'].get('strategy', 'ddp')}, and the run's recipe now says train.strategy="
                f"{tc.strategy}; put the strategy back in {run.config}, or start the run again without --resume"
            )
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as exc:  # e.g. a checkpoint from before the embeddings trained by rows
            raise TuneloopError(
                f"cannot resume {run.root}: its checkpoint does not fit this model "
                f"({first_line(exc)}); start the run again without --resume"
            ) from exc
        for name, head in heads.items():
            head.head.load_state_dict(saved["heads"][name])
    elif centroids and not tc.dp:
        started = time.perf_counter()
        for task in tasks:
            embeddings = own_embeddings if task is tasks[0] else embed_all(model, task.train_ids, pad_id)
            task.classifier.init_head_from_centroids(embeddings, torch.tensor(task.train_labels))
        state["train_seconds"] += time.perf_counter() - started

    # Under torchrun with ddp, rank 0's weights are broadcast to every rank, then the ranks' gradients averaged at
    # each step; with fsdp each rank keeps its shard, and rank 0 a whole copy to save the model from.
    sharded = world.distributed and tc.strategy == "fsdp"
    whole_copy = copy.deepcopy(model) if sharded and world.main else None
    if sharded:
        shard_model(model, model.encoder)
        parallel: torch.nn.Module | None = model
    else:
        parallel = torch.nn.parallel.DistributedDataParallel(model) if world.distributed else None
    optimizer = _optimizer(model, recipe, list(heads.values()))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = learning_rate_schedule(tc, optimizer, total_steps)
    private = None
    if tc.dp:
        private = dpsgd.PrivateTraining(
            tc.dp,
            model,
            optimizer,
            tasks[0].loss_fn,
            [len(ids) for ids in tasks[0].train_ids],
            tc.batch_size,
            total_steps,
            tc.seed,
            centroid_init=recipe.model.head_init == "centroids",
        )
    if saved:
        if sharded:
            load_full_optimizer_state(model, optimizer, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {**state, **saved["state"]}  # keys added since that checkpoint keep their defaults
        if private:
            private.load_state_dict(saved["private"], mid_epoch=state["step_in_epoch"] > 0)
        restore_rng(saved["rng"])
        log.info("resuming at epoch %d step %d", state["epoch"], state["step_in_epoch"])
    elif private and private.centroid_noise:
        started = time.perf_counter()
        model.set_class_vectors(
            private.noisy_centroids(
                embed_all(model, tasks[0].train_ids, pad_id), torch.tensor(tasks[0].train_labels), len(data.labels)
            )
        )
        state["train_seconds"] += time.perf_counter() - started

    per_row_loss = torch.nn.CrossEntropyLoss(
        weight=tasks[0].loss_fn.weight, label_smoothing=tasks[0].loss_fn.label_smoothing, reduction="none"
    )

    def train_mode() -> None:
        for task in tasks:  # validation switched every head (and the shared encoder) to eval mode
            task.classifier.train()

    def save_model(folder: Path) -> None:
        saved_model = whole_copy or model
        with plain_embeddings(saved_model.encoder):
            saved_model.save(folder, tokenizer)
        if heads:
            save_task_heads(folder, heads)

    def checkpoint() -> None:
        # Under fsdp every rank sends its shards to rank 0, which alone writes.
        weights = full_weights(model) if sharded else model.state_dict()
        optimizer_state = full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
        if not world.main:
            return
        save_checkpoint(
            run,
            CHECKPOINT,
            {
                "model": weights,
                "heads": {n: h.head.state_dict() for n, h in heads.items()},
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "state": state,
                "rng": rng_state(),
                "private": private.state_dict() if private else None,
            },
        )

    def validate(entry: dict) -> None:
        """Score the validation split into `entry`; keep the model if it is the best so far (or if there is
        no validation split, in which case the latest model is kept)."""
        improved = True
        scored = [task for task in tasks if len(task.val_texts)]
        if scored:
            scores = {
                task.name: validation_macro_f1(task.classifier, tokenizer, task.val_texts, task.val_labels, world)
                for task in scored
            }
            if heads:
                entry.update({f"val_macro_f1/{name}": value for name, value in scores.items()})
            f1 = float(np.mean(list(scores.values())))
            entry["val_macro_f1"] = f1
            improved = state["best_f1"] is None or f1 > state["best_f1"]
        if improved:
            state["best_f1"] = entry.get("val_macro_f1")
            state["best_epoch"] = state["epoch"] + 1
            state["best_step"] = state["global_step"]
            state["improved_in_epoch"] = True
            if sharded:
                weights = full_weights(model)  # every rank takes part in gathering the shards
                if whole_copy is not None:
                    whole_copy.load_state_dict(weights)
            if world.main:
                write_dir_atomically(save_model, run.model)
        train_mode()

    def off_topic_loss(classifier: TextClassifier) -> torch.Tensor:
        """Outlier exposure: a few off-topic messages (drawn by seed and step, so a resumed run draws the
        same), their answer pulled towards uniform over the labels."""
        shown = np.random.default_rng([tc.seed, state["global_step"]]).choice(
            len(off_topic), size=min(max(2, tc.batch_size // 4), len(off_topic)), replace=False
        )
        rows, weight = world.share(shown.tolist())  # one process: all of them, weight 1
        with stage("data"):
            input_ids, mask = pad_right([off_topic[i] for i in rows], pad_id)
        with stage("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = classifier(input_ids, mask)
        return uniform_target_loss(logits.float()) * (weight * world.size * len(rows) / len(shown))

    # R-Drop: each batch twice in one forward pass (dropout draws anew for the second copy); each copy's loss
    # counts half, so the losses keep their one-pass size.
    passes = 2 if tc.rdrop else 1
    metrics = MetricsLog(run) if world.main else None
    train_mode()
    with TrainingProgress("training", total_steps, state["global_step"], show_progress and world.main) as progress:
        while state["epoch"] < tc.epochs and not state["stopped_early"]:
            epoch = state["epoch"]
            batches = (
                [(tasks[0], batch) for batch in private.epoch_batches()]
                if private
                else _epoch_batches(tasks, tc.batch_size, tc.seed + epoch, tc.length_grouping)
            )
            if state["step_in_epoch"] == 0:
                state["epoch_loss_sum"], state["epoch_texts"] = 0.0, 0
            epoch_start = time.perf_counter()
            for index in range(state["step_in_epoch"], len(batches)):
                started = time.perf_counter()
                task, chosen = batches[index]

                def forward(rows: list[int], task: Task = task) -> tuple[torch.Tensor, torch.Tensor]:
                    with stage("data"):
                        input_ids, mask = pad_right([task.train_ids[i] for i in rows], pad_id)
                        target = torch.as_tensor(task.train_labels[rows])
                    with stage("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                        logits = (parallel if parallel is not None else task.classifier)(input_ids, mask)
                    return logits, target

                if private:
                    with stage("dp step"):  # forward, backward, per-text clipping, noise and the step
                        state["epoch_loss_sum"] += private.step(forward, chosen)
                else:
                    if parallel is not None:
                        rows, weight = world.share(chosen)
                        logits, target = forward(rows * passes)
                        normaliser = passes * batch_normaliser(task.train_labels[chosen], per_row_loss.weight)
                        per_row = per_row_loss(logits.float(), target)
                        loss = shard_loss(per_row, weight, normaliser, world)
                        # The whole batch's mean loss, for the log: the ranks' shares summed.
                        logged = world.total(weight * float(per_row.detach().sum())) / normaliser
                    else:
                        rows, weight = chosen, 1.0
                        logits, target = forward(chosen * passes)
                        loss = task.loss_fn(logits.float(), target)
                        logged = float(loss.detach())
                    if soft_targets is not None and task is tasks[0]:
                        taught = distillation_loss(logits.float(), soft_targets[rows * passes], tc.distill_temperature)
                        loss = (1 - tc.distill_weight) * loss + tc.distill_weight * shard_loss(
                            taught, weight, passes * len(chosen), world
                        )
                    if tc.rdrop:
                        first, second = logits.float().chunk(2)
                        loss = loss + tc.rdrop * shard_loss(rdrop_loss(first, second), weight, len(chosen), world)
                    total = loss
                    if off_topic and task is tasks[0]:
                        total = loss + tc.outlier_exposure * off_topic_loss(task.classifier)
                    with stage("backward"):
                        total.backward()
                    with stage("optimizer"):
                        torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    state["epoch_loss_sum"] += logged * len(chosen)
                scheduler.step()
                if profiler:
                    profiler.step()
                state["train_seconds"] += time.perf_counter() - started
                state["global_step"] += 1
                state["step_in_epoch"] = index + 1
                state["epoch_texts"] += len(chosen)
                epoch_loss = state["epoch_loss_sum"] / max(state["epoch_texts"], 1)
                progress.step(epoch_loss, f"epoch {epoch + 1}/{tc.epochs}")
                if tc.eval_every and state["global_step"] % tc.eval_every == 0 and index + 1 < len(batches):
                    entry = {
                        "epoch": epoch + 1,
                        "step": state["global_step"],
                        "train_loss": epoch_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "train_seconds": state["train_seconds"],
                    }
                    validate(entry)
                    state["history"].append(entry)
                    if metrics:
                        metrics.record(entry)
                if state["global_step"] % tc.checkpoint_every == 0:
                    checkpoint()
                if step_callback and callback_every and state["global_step"] % callback_every == 0:
                    step_callback(state, model, tokenizer)
                    train_mode()

            entry = {
                "epoch": epoch + 1,
                "step": state["global_step"],
                "train_loss": state["epoch_loss_sum"] / max(state["epoch_texts"], 1),
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": time.perf_counter() - epoch_start,
                "train_seconds": state["train_seconds"],
            }
            validate(entry)
            state["history"].append(entry)
            if metrics:
                metrics.record(entry)
            log.info("epoch %d: %s", epoch + 1, entry)
            state["bad_epochs"] = 0 if state["improved_in_epoch"] else state["bad_epochs"] + 1
            state["improved_in_epoch"] = False
            state["epoch"] = epoch + 1
            state["step_in_epoch"] = 0
            checkpoint()
            if step_callback:
                step_callback(state, model, tokenizer)
                train_mode()
            if state["bad_epochs"] >= tc.patience:
                state["stopped_early"] = True
                checkpoint()
                log.info("early stop: no validation improvement for %d epochs", tc.patience)
                break
    if metrics:
        metrics.close()
    summary = profiler.finish() if profiler else None  # a run shorter than the profiled window
    return TrainResult(
        best_dir=run.model,
        best_epoch=state["best_epoch"],
        best_val_macro_f1=state["best_f1"],
        best_step=state["best_step"],
        history=state["history"],
        train_seconds=state["train_seconds"],
        stopped_early=state["stopped_early"],
        privacy=private.spent().as_dict() if private else None,
        profile=summary.as_dict() if summary else None,
        outlier_exposure=exposure,
        distillation=distillation,
    )


def _fold_data(data: PreparedData, fold: int) -> PreparedData:
    pool = pd.concat([data.train, data.val], ignore_index=True)
    splits = {
        "train": pool[data.folds != fold].reset_index(drop=True),
        "val": pool[data.folds == fold].reset_index(drop=True),
        "test": data.test,
    }
    return PreparedData(splits=splits, labels=data.labels, report=data.report, fingerprint=fingerprint_of(splits))


def cross_validate(
    recipe: ClassifierRecipe, data: PreparedData, encoder: EncoderSource, run: VersionFolder, show_progress: bool
) -> tuple[TrainResult, dict]:
    """k-fold cross-validation on train + val: one model per fold; the best fold's model becomes the run's."""
    folds = []
    for index in range(recipe.data.kfold or 0):
        result = fine_tune(recipe, _fold_data(data, index), encoder, run.fold(index), show_progress=show_progress)
        folds.append({"fold": index, "val_macro_f1": result.best_val_macro_f1, "best_epoch": result.best_epoch})
    scores = np.array([f["val_macro_f1"] for f in folds], dtype=float)
    best = int(scores.argmax())
    summary = {
        "k": recipe.data.kfold,
        "folds": folds,
        "mean_val_macro_f1": float(scores.mean()),
        "std_val_macro_f1": float(scores.std()),
        "selected_fold": best,
    }
    run.cross_validation.write_text(json.dumps(summary, indent=2))
    shutil.copytree(run.fold(best).model, run.model)
    result = TrainResult(
        best_dir=run.model, best_epoch=folds[best]["best_epoch"], best_val_macro_f1=folds[best]["val_macro_f1"]
    )
    return result, summary


def evaluate_run(
    recipe: ClassifierRecipe,
    run: VersionFolder,
    result: TrainResult,
    data: PreparedData,
    others: dict[str, PreparedData],
    cross_validation: dict | None,
    world: World = ONE_PROCESS,
) -> dict:
    """The test report of the run's best model (and of each other task's head), written into the run, scored
    on the runtime it will serve with. Under torchrun rank 0 calibrates and picks the runtime, every rank scores
    its share of the test split, and rank 0 writes the report (the other ranks return an empty one)."""

    def settle_serving() -> tuple[dict | None, dict]:
        calibration = None
        if recipe.eval.calibrate:
            # Under k-fold the kept model trained on the other folds: its own fold is the split it never saw.
            val = _fold_data(data, cross_validation["selected_fold"]).val if cross_validation else data.val
            vals = {next(iter(recipe.tasks), ""): val, **{name: task_data.val for name, task_data in others.items()}}
            calibration = calibrate_run(run, vals, recipe.eval.calibration_bins)
        return calibration, choose_runtime(run, data, recipe.serving, recipe.train.threads)

    settled = world.on_rank_zero(settle_serving)
    served = load_model(run.root, threads=recipe.train.threads)
    # Scored through the predictor, not its bare model: int8 serving may answer close calls with fp32.
    test_logits, scorers = shared_logits(served, data.test["text"].tolist(), world)
    if not world.main or settled is None:
        return {}
    calibration, serving = settled
    title = f"{recipe.name}: test report" + (f" — task {served.model.spec.task}" if others else "")
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
    report["serving"] = serving
    if world.distributed:
        report["processes"] = {"count": world.size, "strategy": recipe.train.strategy, "test_scored_by": scorers}
    if recipe.eval.explanations:
        on_torch, _ = TextClassifier.load(run.model)  # the explanations need gradients: PyTorch, not ONNX
        add_explanations(report, on_torch, served.tokenizer, recipe.eval.explanations)
    if calibration:
        own, *_ = calibration.values()
        report["calibration"] = own
    if others:
        report["tasks"] = {}
        for name, task_data in others.items():
            head, head_logits = served.task(name, served.logits(task_data.test["text"].tolist()))
            report["tasks"][name] = evaluate_classifier(
                head,
                task_data.test,
                recipe.eval,
                train=task_data.train,
                title=f"{recipe.name}: task {name}",
                leaked=leaked_positions(task_data.report),
                test_logits=head_logits,
            )
            if calibration:
                report["tasks"][name]["calibration"] = calibration[name]
    report.update(
        train_seconds=result.train_seconds, best_epoch=result.best_epoch, best_step=result.best_step, data=data.report
    )
    if cross_validation:
        report["cross_validation"] = cross_validation
    if result.privacy:
        report["privacy"] = result.privacy
    if result.outlier_exposure:
        report["outlier_exposure"] = result.outlier_exposure
    if result.distillation:
        report["distillation"] = result.distillation
    write_report(report, run.root)
    return report


def register_classifier(
    registry: Registry,
    recipe: ClassifierRecipe,
    run: VersionFolder,
    report: dict,
    result: TrainResult,
    encoder: EncoderSource,
    fingerprints: list[str],
    parent: str | None,
) -> ModelVersion:
    """The run as a candidate version, its headline metrics (and each other task's) in the registry row."""
    metrics = {k: report["test"][k] for k in ("accuracy", "macro_f1", "weighted_f1")}
    metrics.update(
        ece=report["test"]["calibration"]["ece"],
        train_seconds=result.train_seconds,
        best_val_macro_f1=result.best_val_macro_f1,
    )
    metrics["runtime"] = report["serving"]["runtime"]
    if result.privacy:
        metrics.update(dp_epsilon=result.privacy["epsilon"], dp_delta=result.privacy["delta"])
    for name, task_report in report.get("tasks", {}).items():
        metrics.update({f"{name}.{k}": task_report["test"][k] for k in ("accuracy", "macro_f1")})
    # A multi-task version's data is all its tasks' splits: the fingerprint covers each in order.
    data_fingerprint = fingerprints[0] if len(fingerprints) == 1 else fingerprint(fingerprints)
    return register_run(
        registry,
        recipe,
        run,
        base_model=encoder.name,
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
    world = join_world()  # one process, or one of torchrun's
    check_recipe(recipe, world)
    if resume is None:  # a resumed run asks the teachers of the recipe it started with, read below
        check_teachers(recipe, registry)
    if resume is None and world.distributed:
        folder, data, encoder = _prepared_by_rank_zero(recipe, registry, world, prepared, parent)
        others = {}
    elif resume is not None:
        folder = resume_folder(recipe, resume, CHECKPOINT)
        # The run continues with the recipe it started with; where things live is the caller's.
        saved = stored_recipe(read_yaml_mapping(folder.config))
        recipe = validated(ClassifierRecipe, {**saved, "registry": recipe.registry.model_dump()}, f"{folder.config}: ")
        data = load_prepared(folder.data())
        others = {name: load_prepared(folder.data(name)) for name in list(recipe.tasks)[1:]}
        started_from = json.loads(folder.encoder.read_text())
        encoder = resolve_encoder(started_from["name"], registry)
        parent = started_from.get("parent")
    else:
        if recipe.tasks and prepared is None:
            all_tasks, encoder = prepare_tasks(recipe.tasks, recipe, registry)
            data, *rest = all_tasks.values()
            others = dict(zip(list(recipe.tasks)[1:], rest, strict=True))
        else:
            data, encoder = prepared or prepare_for_model(recipe, registry)
            others = {}
        folder = _start_run_folder(recipe, data, others, encoder, parent)

    cross_validation = None
    if recipe.data.kfold and resume is None:
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
    leave_world()
    if not world.main:  # rank 0 writes the report and registers
        return ClassifierOutcome(folder=folder, report={}, report_html=folder.report_html, version=None, train=result)
    version, html = None, folder.report_html
    if register:
        fingerprints = [d.fingerprint for d in (data, *others.values())]
        version = register_classifier(registry, recipe, folder, report, result, encoder, fingerprints, parent)
        folder = registry.folder(version)  # the run folder may be gone (train.keep_checkpoints)
        html = folder.report_html
    return ClassifierOutcome(
        folder=folder, report=report, report_html=html, version=version, train=result, cross_validation=cross_validation
    )
