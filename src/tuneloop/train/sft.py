"""Recipe: supervised fine-tuning of a small causal LM on the company's (question, answer) pairs or chats.

Conversations are rendered with the model's own chat template; the loss counts only the assistant's
tokens (its replies and their end-of-turn marks), so the model learns to answer, not to imitate customers.
Which tokens are the assistant's is found by rendering the conversation up to each reply and measuring,
which works for any template that renders prefixes consistently (ChatML does). LoRA by default: a 135M
model trains on a CPU either way, but LoRA versions are megabytes, not half a gigabyte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import TuneloopConfig, dump_config
from tuneloop.data.load import read_table
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import MODEL_DIR
from tuneloop.models.lm import resolve_generator
from tuneloop.registry.store import ModelVersion, Registry
from tuneloop.train.classification import seed_everything

log = logging.getLogger(__name__)
Message = dict[str, str]


@dataclass
class SftOutcome:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    heldout_loss_before: float | None = None
    train_seconds: float = 0.0
    version: ModelVersion | None = None
    examples: dict = field(default_factory=dict)


def read_conversations(paths: list[Path], system_prompt: str | None) -> list[list[Message]]:
    """Conversations from jsonl rows ({"prompt", "reply"} or {"messages": [...]}) or tables (prompt, reply)."""
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
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            conversations.append(messages)
    return conversations


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )
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
    out = []
    for start in range(0, len(order), size):
        chosen = [examples[i] for i in order[start : start + size]]
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chosen), width), dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        for row, (ids, target) in enumerate(chosen):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor(target)
        out.append((input_ids, attention, labels))
    return out


@torch.no_grad()
def mean_loss(model: PreTrainedModel, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """Loss per reply token over the batches (the model's mean is per batch, so weight by token counts)."""
    model.eval()
    total, tokens = 0.0, 0
    for input_ids, attention, labels in batches:
        counted = int((labels[:, 1:] != -100).sum())
        if counted:
            total += float(model(input_ids=input_ids, attention_mask=attention, labels=labels).loss) * counted
            tokens += counted
    model.train()
    return total / max(tokens, 1)


def build_model(config: TuneloopConfig, folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    settings = config.sft
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise TuneloopError(f"{folder} has no chat template; SFT needs one to render conversations")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder)
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
                f"sft.lora_targets {settings.lora_targets} do not name layers of the model: {str(exc).splitlines()[0]}"
            ) from exc
    return model, tokenizer


def fine_tune_lm(
    config: TuneloopConfig, run_dir: Path, register: bool = True, show_progress: bool = True
) -> SftOutcome:
    """Fine-tune, report held-out loss before and after, save (adapters or full weights) and register."""
    settings = config.sft
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    seed_everything(settings.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    conversations = read_conversations(settings.paths, settings.system_prompt)
    base = resolve_generator(settings.model, config.registry.home)
    model, tokenizer = build_model(config, base)
    examples = [tokenize_conversation(tokenizer, c, settings.max_length) for c in conversations]
    examples = [e for e in examples if any(label != -100 for label in e[1])]
    order = np.random.default_rng(settings.seed).permutation(len(examples))
    held = int(round(settings.val_size * len(examples)))
    heldout_order, train_order = order[:held], order[held:]
    if not len(train_order):
        raise TuneloopError(f"{len(examples)} usable conversation(s): too few to train on")
    heldout = _batches(examples, settings.batch_size, tokenizer.pad_token_id, heldout_order) if held else []
    before = mean_loss(model, heldout) if heldout else None

    steps_per_epoch = -(-len(train_order) // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(settings.warmup_ratio * total), num_training_steps=total
    )
    history, train_seconds = [], 0.0
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show_progress,
    )
    model.train()
    with progress:
        task = progress.add_task("fine-tuning", total=total, loss=0.0)
        for epoch in range(settings.epochs):
            shuffled = np.random.default_rng(settings.seed + epoch).permutation(train_order)
            running, steps = 0.0, 0
            for input_ids, attention, labels in _batches(
                examples, settings.batch_size, tokenizer.pad_token_id, shuffled
            ):
                started = time.perf_counter()
                loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                train_seconds += time.perf_counter() - started
                running += loss.item()
                steps += 1
                progress.update(
                    task, advance=1, loss=running / steps, description=f"epoch {epoch + 1}/{settings.epochs}"
                )
            entry = {"epoch": epoch + 1, "train_loss": running / max(steps, 1), "train_seconds": train_seconds}
            if heldout:
                entry["heldout_loss"] = mean_loss(model, heldout)
                entry["heldout_perplexity"] = math.exp(min(entry["heldout_loss"], 50))
            history.append(entry)
            log.info("epoch %d: %s", epoch + 1, entry)

    def save(folder: Path) -> None:
        folder.mkdir(parents=True)
        model.save_pretrained(folder)  # LoRA: the adapters and a pointer to the base; full: every weight
        tokenizer.save_pretrained(folder)

    write_dir_atomically(save, run_dir / MODEL_DIR)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    outcome = SftOutcome(
        run_dir=run_dir,
        history=history,
        heldout_loss_before=before,
        train_seconds=train_seconds,
        examples={"conversations": len(examples), "train": len(train_order), "heldout": held},
    )
    if register:
        last = history[-1]
        metrics = {
            "kind": "generator",
            "train_seconds": train_seconds,
            "heldout_loss_before": before,
            "heldout_loss": last.get("heldout_loss"),
            "heldout_perplexity": last.get("heldout_perplexity"),
        }
        outcome.version = Registry(config.registry).register(
            config.name,
            run_dir,
            base_model=settings.model,
            data_fingerprint=hashlib.sha256(json.dumps(conversations, ensure_ascii=False).encode()).hexdigest()[:16],
            config=config.model_dump(mode="json"),
            metrics=metrics,
            parent=settings.model if "@" in settings.model else None,
        )
    return outcome
