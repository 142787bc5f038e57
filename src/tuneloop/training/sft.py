"""Recipe: supervised fine-tuning of a small causal LM on the company's (question, answer) pairs or chats.

Conversations are rendered with the model's own chat template; the loss counts only the assistant's
tokens (its replies and their end-of-turn marks), so the model learns to answer, not to imitate customers.
Which tokens are the assistant's is found by rendering the conversation up to each reply and measuring,
which works for any template that renders prefixes consistently (ChatML does). LoRA by default: a 135M
model trains on a CPU either way, but LoRA versions are megabytes, not half a gigabyte.

Under `torchrun --nproc-per-node N -m tuneloop sft …` it trains data-parallel as `train` does (see
training.distributed), LoRA or full: rank 0 alone reads the conversations, writes the run folder, logs and
registers; every rank takes its share of each global batch (`sft.batch_size` conversations, whatever N is), and
the loss is divided by the whole batch's reply tokens, so N processes take one process's steps. Held-out batches
are scored in shares and summed over the ranks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_scheduler,
)

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import SftConfig, SftRecipe
from tuneloop.data.load import read_table
from tuneloop.data.prepare import fingerprint
from tuneloop.errors import TuneloopError, first_line
from tuneloop.models.classifier import pad_right
from tuneloop.models.lm import resolve_lm
from tuneloop.privacy.mask import masker
from tuneloop.registry import ModelVersion, Registry, VersionFolder
from tuneloop.training.common import (
    HistoryEntry,
    MetricsLog,
    TrainingProgress,
    mean_token_loss,
    new_run_folder,
    parameter_groups,
    register_run,
    scaled_step,
    seed_everything,
    start_run,
    use_threads,
)
from tuneloop.training.devices import DevicePlan, plan_device, process_group_backend
from tuneloop.training.distributed import World, check_batch_divides, join_world, leave_world, shard_loss

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)
Message = dict[str, str]


@dataclass
class SftOutcome:
    folder: VersionFolder  # the registered version's folder once registered, else the run's
    history: list[HistoryEntry] = field(default_factory=list)
    heldout_loss_before: float | None = None
    train_seconds: float = 0.0
    version: ModelVersion | None = None
    examples: dict[str, int] = field(default_factory=dict)  # conversations, train, heldout


def read_conversations(
    paths: list[Path], system_prompt: str | None, mask: Callable[[str], str] | None = None
) -> list[list[Message]]:
    """Conversations from jsonl rows ({"prompt", "reply"} or {"messages": [...]}) or tables (prompt, reply), with
    personal data masked in every message (`mask`, privacy.mask: a reply model must not learn to repeat it)."""
    if not paths:
        raise TuneloopError("no training conversations given: sft.paths=[pairs.jsonl] (or --data pairs.jsonl)")
    conversations = []
    for path in map(Path, paths):
        rows = read_table(path).to_dict("records")
        for number, row in enumerate(rows, start=1):
            if isinstance(row.get("messages"), list):
                if not all(isinstance(m, dict) and "role" in m and "content" in m for m in row["messages"]):
                    raise TuneloopError(f"{path} row {number}: every message needs a role and a content")
                messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
            elif all(isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "reply")):
                messages = [
                    {"role": "user", "content": str(row["prompt"])},
                    {"role": "assistant", "content": str(row["reply"])},
                ]
            else:
                raise TuneloopError(
                    f"{path} row {number}: needs prompt and reply, or messages [{{role, content}}, ...]"
                )
            if not any(m["role"] == "assistant" for m in messages):
                raise TuneloopError(f"{path} row {number}: no assistant message to learn from")
            if mask is not None:
                messages = [{**m, "content": mask(m["content"])} for m in messages]
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            conversations.append(messages)
    return conversations


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )
    assert isinstance(encoded, BatchEncoding)  # return_dict=True: the encoding, not ids or text
    return list(encoded["input_ids"])


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 everywhere but the assistant's tokens."""
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [-100] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:index], generation_prompt=True) if index else []
        end = len(_render(tokenizer, messages[: index + 1], generation_prompt=False))
        if ids[: len(prefix)] != prefix:
            raise TuneloopError(
                "the model's chat template does not render a conversation's beginning the same "
                "way alone and in full, so replies cannot be told apart; use a ChatML-style model"
            )
        labels[len(prefix) : end] = ids[len(prefix) : end]
    return ids[-max_length:], labels[-max_length:]


def _batches(
    examples: list[tuple[list[int], list[int]]], size: int, pad_id: int, order: np.ndarray
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels) per batch, in `order`; labels padded with -100 (no loss)."""
    out = []
    for start in range(0, len(order), size):
        chosen = [examples[i] for i in order[start : start + size]]
        input_ids, attention = pad_right([ids for ids, _ in chosen], pad_id)
        labels, _ = pad_right([target for _, target in chosen], -100)
        out.append((input_ids, attention, labels))
    return out


def reply_loss(
    model: PreTrainedModel | PeftModel,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]:
    """(loss, reply tokens counted) of one batch: the model's mean loss over the tokens it predicts."""

    def loss_and_count(
        input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        counted = int((labels[:, 1:] != -100).sum())  # the first token is never predicted
        if not counted:
            return torch.zeros(()), 0
        return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss, counted

    return loss_and_count


def _predicted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each position's loss at predicting the next token, as the model's own loss counts them (0 where the
    next label is -100)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
    )


def build_model(recipe: SftRecipe, folder: Path) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    settings = recipe.sft
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise TuneloopError(f"{folder} has no chat template; SFT needs one to render conversations")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: PreTrainedModel | PeftModel = AutoModelForCausalLM.from_pretrained(folder)
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model  # only LoRA runs need peft

        try:
            model = get_peft_model(
                model,
                LoraConfig(
                    task_type="CAUSAL_LM",
                    r=settings.lora_rank,
                    lora_alpha=settings.lora_alpha,
                    lora_dropout=settings.lora_dropout,
                    target_modules=settings.lora_targets,
                ),
            )
        except ValueError as exc:
            raise TuneloopError(
                f"sft.lora_targets {settings.lora_targets} do not name layers of the model: {first_line(exc)}"
            ) from exc
    return model, tokenizer


def _started_run(
    recipe: SftRecipe, registry: Registry, world: World
) -> tuple[VersionFolder, list[list[Message]], Path]:
    """The new run folder, the conversations and the model folder the run starts from: rank 0's work under
    torchrun."""
    settings = recipe.sft
    check_batch_divides("sft.batch_size", settings.batch_size, world)  # before the run folder is written
    folder = new_run_folder(recipe)
    start_run(recipe, folder)
    conversations = read_conversations(settings.paths, settings.system_prompt, masker(recipe.privacy))
    return folder, conversations, resolve_lm(settings.model, registry)


@dataclass
class ReplyExamples:
    """The conversations as token ids, split by the seed into training and held-out ones."""

    examples: list[tuple[list[int], list[int]]]
    train_order: np.ndarray
    heldout: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # batches, empty without sft.val_size
    heldout_count: int

    def counts(self) -> dict[str, int]:
        return {"conversations": len(self.examples), "train": len(self.train_order), "heldout": self.heldout_count}


def reply_examples(
    settings: SftConfig, tokenizer: PreTrainedTokenizerBase, conversations: list[list[Message]]
) -> ReplyExamples:
    """The conversations that have a reply to learn, as token ids, and the seed's held-out share of them."""
    examples = [tokenize_conversation(tokenizer, c, settings.max_length) for c in conversations]
    examples = [e for e in examples if any(label != -100 for label in e[1])]
    order = np.random.default_rng(settings.seed).permutation(len(examples))
    held = int(round(settings.val_size * len(examples)))
    heldout_order, train_order = order[:held], order[held:]
    if not len(train_order):
        raise TuneloopError(f"{len(examples)} usable conversation(s): too few to train on")
    heldout = _batches(examples, settings.batch_size, tokenizer.pad_token_id, heldout_order) if held else []
    return ReplyExamples(examples, train_order, heldout, held)


class ReplyTraining:
    """The model being fine-tuned and its optimiser: one step on a global batch, the held-out loss.

    Every rank takes its share of each global batch, and the loss is the whole batch's reply tokens' mean (the
    model's own loss in one process), so N processes take one process's steps.
    """

    def __init__(
        self, model: PreTrainedModel | PeftModel, settings: SftConfig, steps: int, world: World, plan: DevicePlan
    ) -> None:
        # transformers' typing of PreTrainedModel.to (behind a decorator) takes no device; torch's Module.to does.
        self.model, self.world, self.plan, self.total_steps = model, world, plan, steps
        torch.nn.Module.to(model, plan.device)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, settings.lr, settings.weight_decay))
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = get_scheduler(
            "linear", self.optimizer, num_warmup_steps=int(settings.warmup_ratio * steps), num_training_steps=steps
        )
        # fp16 gradients underflow without loss scaling; a disabled scaler passes everything through unchanged.
        self.scaler = torch.amp.GradScaler(plan.device.type, enabled=plan.needs_scaler)
        # Under torchrun: rank 0's weights broadcast to every rank, then the ranks' gradients averaged at each step.
        self.trainer: torch.nn.Module = model
        if world.distributed:
            self.trainer = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[plan.device] if plan.on_gpu else None
            )

    def step(self, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimiser step; the batch's mean loss per reply token."""
        # The mean over the whole batch's reply tokens, which every rank holds, not over this rank's share.
        replies = max(int((labels[:, 1:] != -100).sum()), 1)
        rows, weight = self.world.share(range(len(input_ids)))
        input_ids, attention, labels = (self.plan.to_device(t[rows]) for t in (input_ids, attention, labels))
        with self.plan.autocast():
            logits = self.trainer(input_ids=input_ids, attention_mask=attention).logits
        token_losses = _predicted_token_losses(logits, labels)
        loss = shard_loss(token_losses, weight, replies, self.world)
        scaled_step(loss, self.scaler, self.optimizer, self.scheduler, self.parameters)
        return self.world.total(weight * float(token_losses.detach().sum())) / replies

    def heldout_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
        loss_and_count = reply_loss(self.model)

        def on_device(*batch: torch.Tensor) -> tuple[torch.Tensor, int]:
            with self.plan.autocast():
                return loss_and_count(*map(self.plan.to_device, batch))

        return mean_token_loss(on_device, self.model, batches, self.world)


def _train_epochs(
    training: ReplyTraining,
    data: ReplyExamples,
    settings: SftConfig,
    pad_id: int,
    folder: VersionFolder,
    show_progress: bool,
) -> tuple[list[HistoryEntry], float]:
    """Every epoch, its held-out loss at its end; the history and the seconds spent in steps."""
    world = training.world
    history: list[HistoryEntry] = []
    train_seconds, step = 0.0, 0
    metrics = MetricsLog(folder, prefix="sft/") if world.main else None
    training.model.train()
    with TrainingProgress("fine-tuning", training.total_steps, show=show_progress and world.main) as progress:
        for epoch in range(settings.epochs):
            shuffled = np.random.default_rng(settings.seed + epoch).permutation(data.train_order)
            running, steps = 0.0, 0
            for batch in _batches(data.examples, settings.batch_size, pad_id, shuffled):
                started = time.perf_counter()
                running += training.step(*batch)
                train_seconds += time.perf_counter() - started
                steps, step = steps + 1, step + 1
                progress.step(running / steps, f"epoch {epoch + 1}/{settings.epochs}")
            entry: HistoryEntry = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": running / max(steps, 1),
                "train_seconds": train_seconds,
            }
            if data.heldout:
                entry["heldout_loss"] = training.heldout_loss(data.heldout)
                entry["heldout_perplexity"] = math.exp(min(entry["heldout_loss"], 50))
            history.append(entry)
            if metrics:
                metrics.record(entry)
            log.info("epoch %d: %s", epoch + 1, entry)
    if metrics:
        metrics.close()
    return history, train_seconds


def run(recipe: SftRecipe, register: bool = True, show_progress: bool = True) -> SftOutcome:
    """Fine-tune, report held-out loss before and after, save (adapters or full weights) and register.

    Under torchrun rank 0's outcome holds the registered version, the other ranks' none.
    """
    settings = recipe.sft
    registry = Registry(recipe.registry)
    plan = plan_device(settings, section="sft")
    world = join_world(process_group_backend(plan))  # one process, or one of torchrun's
    use_threads(settings.threads)
    seed_everything(settings.seed)
    folder, conversations, model_folder = world.from_rank_zero(lambda: _started_run(recipe, registry, world))
    model, tokenizer = build_model(recipe, model_folder)
    data = reply_examples(settings, tokenizer, conversations)
    steps = -(-len(data.train_order) // settings.batch_size) * settings.epochs
    training = ReplyTraining(model, settings, steps, world, plan)
    log.info("fine-tuning on %s", plan.describe())
    before = training.heldout_loss(data.heldout) if data.heldout else None
    history, train_seconds = _train_epochs(training, data, settings, tokenizer.pad_token_id, folder, show_progress)
    # DistributedDataParallel goes before the process group it holds: freed after leave_world, the group's gloo
    # threads would wait for the interpreter lock this thread holds, and the run would hang at its end.
    del training.trainer
    leave_world()
    outcome = SftOutcome(folder=folder, history=history, heldout_loss_before=before, train_seconds=train_seconds)
    if not world.main:  # rank 0 saves the model and registers it
        return outcome

    def save(target: Path) -> None:
        target.mkdir(parents=True)
        model.save_pretrained(str(target))  # LoRA: the adapters and a pointer to the base; full: every weight
        tokenizer.save_pretrained(target)

    write_dir_atomically(save, folder.model)
    outcome.examples = data.counts()
    if register:
        last = history[-1]
        outcome.version = register_run(
            registry,
            recipe,
            folder,
            base_model=settings.model,
            fingerprint=fingerprint(json.dumps(c, ensure_ascii=False) for c in conversations),
            metrics={
                "kind": "generator",
                "train_seconds": train_seconds,
                "heldout_loss_before": before,
                "heldout_loss": last.get("heldout_loss"),
                "heldout_perplexity": last.get("heldout_perplexity"),
            },
            # No checkpoints to keep: the run folder is the registered version's copy.
            keep_checkpoints=0,
            parent=settings.model if "@" in settings.model else None,
        )
        outcome.folder = registry.folder(outcome.version)
    return outcome
