"""Recipe: fine-tune a packaged encoder into a text classifier on a CPU.

Written out top to bottom on purpose: tokenise once, group batches by length, AdamW with warmup and
decay, clip, evaluate each epoch on validation macro-F1, keep the best, stop early, checkpoint so that
`--resume` continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import TuneloopConfig
from tuneloop.data.prepare import PreparedData
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import (
    MODEL_DIR,
    HeadSpec,
    TextClassifier,
    length_groups,
    load_encoder,
    pad_right,
    predict_proba,
    save_task_heads,
    tokenize,
)
from tuneloop.models.encoders import EncoderSource

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainResult:
    best_dir: Path
    best_epoch: int
    best_val_macro_f1: float | None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX); elsewhere autocast only slows down."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
def _embed_all(model: TextClassifier, ids: list[list[int]], pad_id: int, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = torch.zeros(len(ids), model.encoder.config.hidden_size)
    for chosen in length_groups([len(x) for x in ids], batch_size):
        input_ids, mask = pad_right([ids[i] for i in chosen], pad_id)
        out[chosen] = model.embed(input_ids, mask).float()
    return out


def _optimizer(model: TextClassifier, config: TuneloopConfig, heads: list[TextClassifier]) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.encoder.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [
        {"params": decay, "lr": config.train.lr, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "lr": config.train.lr, "weight_decay": 0.0},
        {
            "params": [p for m in (model, *heads) for p in m.head.parameters()],
            "lr": config.train.head_lr,
            "weight_decay": 0.0,
        },
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _class_weights(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    weights = len(labels) / (num_labels * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def head_spec(config: TuneloopConfig, encoder: EncoderSource, labels: list[str], task: str = "") -> HeadSpec:
    return HeadSpec(
        labels=labels,
        pooling=config.model.pooling,
        head=config.model.head,
        dropout=config.model.dropout,
        cosine_scale=config.model.cosine_scale,
        max_length=config.model.max_length,
        text_prefix=encoder.text_prefix,
        base_model=encoder.name,
        task=task,
    )


def build_classifier(
    config: TuneloopConfig, encoder: EncoderSource, labels: list[str], task: str = ""
) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """A fresh classifier over the encoder, with the head spec taken from the config."""
    spec = head_spec(config, encoder, labels, task)
    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder.path)
        model = TextClassifier(load_encoder(encoder.path), spec)
    except (OSError, ValueError) as exc:
        raise TuneloopError(f"cannot load encoder from {encoder.path}: {str(exc).splitlines()[0]}") from exc
    if config.train.method == "lora":
        from peft import LoraConfig, get_peft_model  # only LoRA runs need peft

        adapters = LoraConfig(
            r=config.train.lora_rank,
            lora_alpha=config.train.lora_alpha,
            lora_dropout=config.train.lora_dropout,
            target_modules=config.train.lora_targets,
        )
        try:
            model.encoder = get_peft_model(model.encoder, adapters)
        except ValueError as exc:
            raise TuneloopError(
                f"train.lora_targets {config.train.lora_targets} do not name layers of {encoder.name}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        return model, tokenizer
    if config.train.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    return model, tokenizer


class TrainedRowsEmbedding(nn.Module):
    """A word-embedding matrix of which only the rows of the given token ids are trained.

    A row whose token never occurs in the training texts gets no gradient, so Adam would leave it alone anyway;
    training the others alone gives the same updates. It matters for e5: its 250k-row matrix is 80% of the
    model, and stepping AdamW over all of it took 0.6 s of a 1.1 s step on 2 cores (a few thousand Chinese
    reviews use about 5k rows).
    """

    def __init__(self, full: nn.Embedding, token_ids: list[int]) -> None:
        super().__init__()
        full.weight.requires_grad_(False)
        self.full = full
        self.rows = nn.Parameter(full.weight[token_ids].clone())
        slot = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        slot[token_ids] = torch.arange(len(token_ids))
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[input_ids]
        trained = F.embedding(slot.clamp(min=0), self.rows)
        return torch.where((slot >= 0).unsqueeze(-1), trained, self.full(input_ids))

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        """The full matrix with the trained rows written into it."""
        self.full.weight[self.token_ids] = self.rows.to(self.full.weight.dtype)
        return self.full


def train_only_used_rows(encoder: PreTrainedModel, train_ids: list[list[int]]) -> None:
    """Swap the encoder's trainable word embeddings for a TrainedRowsEmbedding over the tokens in `train_ids`."""
    embeddings = encoder.get_input_embeddings()
    if isinstance(embeddings, nn.Embedding) and embeddings.weight.requires_grad:
        encoder.set_input_embeddings(TrainedRowsEmbedding(embeddings, sorted({t for ids in train_ids for t in ids})))


@contextmanager
def plain_embeddings(encoder: PreTrainedModel) -> Iterator[None]:
    """Within it the encoder holds an ordinary nn.Embedding (trained rows merged in), as saved models must."""
    current = encoder.get_input_embeddings()
    if not isinstance(current, TrainedRowsEmbedding):
        yield
        return
    encoder.set_input_embeddings(current.merged())
    try:
        yield
    finally:
        encoder.set_input_embeddings(current)


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
    config: TuneloopConfig,
) -> Task:
    index = {label: i for i, label in enumerate(data.labels)}
    labels = data.train["label"].map(index).to_numpy()
    weights = _class_weights(labels, len(data.labels)) if config.train.class_weighted else None
    return Task(
        name,
        classifier,
        tokenize(tokenizer, data.train["text"].tolist(), classifier.spec),
        labels,
        data.val["text"].tolist(),
        data.val["label"].map(index).to_numpy(),
        torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=config.train.label_smoothing),
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
    model: TextClassifier, tokenizer: PreTrainedTokenizerBase, texts: list[str], label_ids: np.ndarray
) -> float:
    probs = predict_proba(model, tokenizer, texts)
    return float(
        f1_score(label_ids, probs.argmax(1), average="macro", labels=range(len(model.spec.labels)), zero_division=0)
    )


def train_classifier(
    config: TuneloopConfig,
    data: PreparedData,
    encoder: EncoderSource,
    run_dir: Path,
    resume: bool = False,
    show_progress: bool = True,
    step_callback: Callable[[dict, TextClassifier, PreTrainedTokenizerBase], None] | None = None,
    callback_every: int = 0,
    other_tasks: dict[str, PreparedData] | None = None,
    task_name: str = "",
) -> TrainResult:
    """Fine-tune and return where the best model (by validation macro-F1) was saved.

    `other_tasks` makes it multi-task: each labelled set gets its own head on the shared encoder, batches of
    all tasks are interleaved, and the best epoch is the one with the best mean validation macro-F1.
    `data` is the first task (`task_name`), whose head is the saved model's own.

    `step_callback(state, model, tokenizer)` runs every `callback_every` steps and after each epoch, with
    state["global_step"] and state["train_seconds"] (which includes the centroid pass and excludes the
    callback itself); benchmarks use it to score the test set during training.
    """
    tc = config.train
    torch.set_num_threads(tc.threads or os.cpu_count() or 1)
    seed_everything(tc.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_classifier(config, encoder, data.labels, task_name if other_tasks else "")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The other tasks' classifiers share the model's encoder object: one set of encoder weights learns them all.
    heads = {
        name: TextClassifier(model.encoder, head_spec(config, encoder, extra.labels, name))
        for name, extra in (other_tasks or {}).items()
    }
    tasks = [
        _task(task_name, model, data, tokenizer, config),
        *(_task(name, heads[name], extra, tokenizer, config) for name, extra in (other_tasks or {}).items()),
    ]
    train_only_used_rows(model.encoder, [ids for task in tasks for ids in task.train_ids])

    steps_per_epoch = sum(-(-len(task.train_ids) // tc.batch_size) for task in tasks)
    total_steps = steps_per_epoch * tc.epochs
    optimizer = _optimizer(model, config, list(heads.values()))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = get_scheduler(
        "constant_with_warmup" if tc.schedule == "constant" else tc.schedule,
        optimizer,
        num_warmup_steps=int(tc.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    use_bf16 = tc.bf16 and cpu_supports_bf16()

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
    }
    checkpoint = run_dir / CHECKPOINT_DIR
    if resume:
        if not (checkpoint / "trainer.pt").is_file():
            raise TuneloopError(f"nothing to resume in {run_dir}: no {CHECKPOINT_DIR}/trainer.pt")
        saved = torch.load(checkpoint / "trainer.pt", weights_only=False)
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as exc:  # e.g. a checkpoint from before the embeddings trained by rows
            raise TuneloopError(
                f"cannot resume {run_dir}: its checkpoint does not fit this model "
                f"({str(exc).splitlines()[0]}); start the run again without --resume"
            ) from exc
        for name, head in heads.items():
            head.head.load_state_dict(saved["heads"][name])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {**state, **saved["state"]}  # keys added since that checkpoint keep their defaults
        restore_rng(saved["rng"])
        log.info("resuming at epoch %d step %d", state["epoch"], state["step_in_epoch"])
    elif config.model.head_init == "centroids":
        started = time.perf_counter()
        for task in tasks:
            task.classifier.init_head_from_centroids(
                _embed_all(model, task.train_ids, pad_id), torch.tensor(task.train_labels)
            )
        state["train_seconds"] += time.perf_counter() - started

    def train_mode() -> None:
        for task in tasks:  # validation switched every head (and the shared encoder) to eval mode
            task.classifier.train()

    def save_model(folder: Path) -> None:
        with plain_embeddings(model.encoder):
            model.save(folder, tokenizer)
        if heads:
            save_task_heads(folder, heads)

    def save_checkpoint() -> None:
        payload = {
            "model": model.state_dict(),
            "heads": {n: h.head.state_dict() for n, h in heads.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "rng": rng_state(),
        }
        write_dir_atomically(lambda d: (d.mkdir(parents=True), torch.save(payload, d / "trainer.pt")), checkpoint)

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    metrics_log = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def record(entry: dict) -> None:
        metrics_log.write(json.dumps(entry) + "\n")
        metrics_log.flush()
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                writer.add_scalar(key, value, entry["step"])

    def validate(entry: dict) -> None:
        """Score the validation split into `entry`; keep the model if it is the best so far (or if there is
        no validation split, in which case the latest model is kept)."""
        improved = True
        scored = [task for task in tasks if len(task.val_texts)]
        if scored:
            scores = {
                task.name: validation_macro_f1(task.classifier, tokenizer, task.val_texts, task.val_labels)
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
            write_dir_atomically(save_model, run_dir / MODEL_DIR)
        train_mode()

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show_progress,
        transient=False,
    )
    train_mode()
    with progress:
        bar = progress.add_task("training", total=total_steps, completed=state["global_step"], loss=0.0)
        while state["epoch"] < tc.epochs and not state["stopped_early"]:
            epoch = state["epoch"]
            batches = _epoch_batches(tasks, tc.batch_size, tc.seed + epoch, tc.length_grouping)
            running, seen = 0.0, 0
            epoch_start = time.perf_counter()
            for index in range(state["step_in_epoch"], len(batches)):
                started = time.perf_counter()
                task, chosen = batches[index]
                input_ids, mask = pad_right([task.train_ids[i] for i in chosen], pad_id)
                target = torch.as_tensor(task.train_labels[chosen])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    logits = task.classifier(input_ids, mask)
                loss = task.loss_fn(logits.float(), target)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["train_seconds"] += time.perf_counter() - started
                state["global_step"] += 1
                state["step_in_epoch"] = index + 1
                running += loss.item() * len(chosen)
                seen += len(chosen)
                progress.update(bar, advance=1, loss=running / seen, description=f"epoch {epoch + 1}/{tc.epochs}")
                if tc.eval_every and state["global_step"] % tc.eval_every == 0 and index + 1 < len(batches):
                    entry = {
                        "epoch": epoch + 1,
                        "step": state["global_step"],
                        "train_loss": running / seen,
                        "lr": scheduler.get_last_lr()[0],
                        "train_seconds": state["train_seconds"],
                    }
                    validate(entry)
                    state["history"].append(entry)
                    record(entry)
                if state["global_step"] % tc.checkpoint_every == 0:
                    save_checkpoint()
                if step_callback and callback_every and state["global_step"] % callback_every == 0:
                    step_callback(state, model, tokenizer)
                    train_mode()

            entry = {
                "epoch": epoch + 1,
                "step": state["global_step"],
                "train_loss": running / max(seen, 1),
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": time.perf_counter() - epoch_start,
                "train_seconds": state["train_seconds"],
            }
            validate(entry)
            state["history"].append(entry)
            record(entry)
            log.info("epoch %d: %s", epoch + 1, entry)
            state["bad_epochs"] = 0 if state["improved_in_epoch"] else state["bad_epochs"] + 1
            state["improved_in_epoch"] = False
            state["epoch"] = epoch + 1
            state["step_in_epoch"] = 0
            save_checkpoint()
            if step_callback:
                step_callback(state, model, tokenizer)
                train_mode()
            if state["bad_epochs"] >= tc.patience:
                state["stopped_early"] = True
                save_checkpoint()
                log.info("early stop: no validation improvement for %d epochs", tc.patience)
                break
    writer.close()
    metrics_log.close()
    return TrainResult(
        best_dir=run_dir / MODEL_DIR,
        best_epoch=state["best_epoch"],
        best_val_macro_f1=state["best_f1"],
        best_step=state["best_step"],
        history=state["history"],
        train_seconds=state["train_seconds"],
        stopped_early=state["stopped_early"],
    )
