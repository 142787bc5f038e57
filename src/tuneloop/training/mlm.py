"""Recipe: masked-language-model pretraining on a company's unlabelled text, on a CPU or a GPU (`pretrain.device`).

Continued pretraining adapts a packaged encoder to the company's words before it sees a label; from
scratch builds a tokenizer and a small BERT where no packaged model fits. Texts are packed into
fixed-size blocks (no padding wasted), masks are drawn afresh for every batch (dynamic masking), and
optionally whole words are masked (Chinese words found by jieba, the segmenter Chinese whole-word-masking
BERTs were trained with). Perplexity on held-out texts is measured with fixed masks, so epochs compare.

Under `torchrun --nproc-per-node N -m tuneloop pretrain …` it trains data-parallel as `train` does (see
training.distributed): rank 0 alone reads the corpus, writes the run folder, logs, checkpoints and registers;
every rank masks the whole global batch (`pretrain.batch_size` blocks, whatever N is) with the same generator
and keeps its share of the rows, and the loss is divided by the whole batch's masked tokens, so N processes
take one process's steps. Held-out batches are scored in shares and summed over the ranks.

CPU edge: multilingual-e5-small has a 250k-token vocabulary, and a full softmax over it for every masked
token would dominate each step. A company corpus uses a small part of it, so the output layer is limited
to the tokens that occur in the corpus (exact for those texts, far cheaper); perplexity is reported over
that vocabulary and says so.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertForMaskedLM, PreTrainedTokenizerBase, get_scheduler

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import PretrainConfig, PretrainRecipe, read_yaml_mapping, validated
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.load import read_table, select_columns
from tuneloop.data.prepare import fingerprint
from tuneloop.errors import TuneloopError, first_line
from tuneloop.models.encoders import EncoderSource, resolve_encoder
from tuneloop.models.scratch import bert_config, train_tokenizer
from tuneloop.privacy.mask import masker
from tuneloop.registry import ModelVersion, Registry, VersionFolder
from tuneloop.training.common import (
    HistoryEntry,
    MetricsLog,
    TrainingProgress,
    load_checkpoint,
    mean_token_loss,
    new_run_folder,
    parameter_groups,
    register_run,
    restore_rng,
    resume_folder,
    rng_state,
    save_checkpoint,
    scaled_step,
    seed_everything,
    start_run,
    use_threads,
)
from tuneloop.training.devices import DevicePlan, plan_device, process_group_backend
from tuneloop.training.distributed import World, check_batch_divides, join_world, leave_world, shard_loss

log = logging.getLogger(__name__)
CHECKPOINT = "pretrain.pt"
NO_WORD = -1
# e5's 250k rows: above this the embedding matrix (tied to the output layer) stays frozen while pretraining.
BIG_VOCABULARY = 100_000


class CorpusSummary(TypedDict):
    """What the run trained on (corpus.json in its folder)."""

    texts: int
    train_blocks: int
    heldout_blocks: int
    block_size: int
    corpus_vocabulary: int
    tokenizer_vocabulary: int
    whole_word: bool


class PretrainState(TypedDict):
    """Where pretraining is, in global figures (see `run`); a checkpoint holds it as it is."""

    epoch: int
    step_in_epoch: int
    global_step: int
    history: list[HistoryEntry]
    train_seconds: float
    generator: tuple[Any, ...] | None  # the masking generator's random.Random state, set at each checkpoint
    running: float  # the epoch's summed token losses so far
    counted: int  # and its masked tokens


@dataclass
class PretrainOutcome:
    folder: VersionFolder  # the registered version's folder once registered, else the run's
    history: list[HistoryEntry] = field(default_factory=list)
    train_seconds: float = 0.0
    version: ModelVersion | None = None
    corpus: CorpusSummary | None = None  # on the rank that saved the encoder


def read_corpus(paths: list[Path], text_column: str, mask: Callable[[str], str] | None = None) -> list[str]:
    """Cleaned, de-duplicated texts from .txt files (a text per line) and tables (their text column), personal
    data masked (`mask`, privacy.mask)."""
    if not paths:
        raise TuneloopError("no unlabelled text given: pretrain.paths=[file.txt] (or --data file.txt)")
    texts, seen = [], set()
    for path in map(Path, paths):
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise TuneloopError(f"text file not found: {path}")
            try:
                raw = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise TuneloopError(f"{path} is not valid UTF-8; re-save it as UTF-8") from None
        else:
            raw = select_columns(read_table(path), path, text_column, text_column)["text"].tolist()
        for text in map(clean_text, raw):
            text = mask(text) if mask is not None and text else text
            if text and dedup_key(text) not in seen:
                seen.add(dedup_key(text))
                texts.append(text)
    if len(texts) < 2:
        raise TuneloopError(f"{len(texts)} usable text(s) in {', '.join(map(str, paths))}: pretraining needs more")
    return texts


def word_numbers(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """For each token (by its character offsets) the number of the word it belongs to, words being jieba's
    segments: Chinese words, and runs of letters or digits for other scripts."""
    try:
        import rjieba
    except ImportError:
        raise TuneloopError("whole-word masking needs the rjieba package: pip install rjieba") from None
    starts = np.array([start for _, start, _ in rjieba.tokenize(text)])
    # By each token's last character: sentencepiece tokens (e5's "▁refund") start on the space before the
    # word, which jieba makes a word of its own.
    return [int(np.searchsorted(starts, max(start, end - 1), side="right")) - 1 for start, end in offsets]


def encode_corpus(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], whole_word: bool
) -> list[tuple[list[int], list[int]]]:
    """Token ids without special tokens, and per token its word number (or its own number)."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=whole_word)
    out = []
    for index, ids in enumerate(encoded["input_ids"]):
        words = word_numbers(texts[index], encoded["offset_mapping"][index]) if whole_word else list(range(len(ids)))
        out.append((ids, words))
    return out


def pack_blocks(
    encoded: list[tuple[list[int], list[int]]], block_size: int, cls_id: int, sep_id: int
) -> list[tuple[list[int], list[int]]]:
    """Concatenate texts (separated by [SEP]) and cut them into [CLS] … [SEP] blocks of block_size tokens;
    word numbers are offset per text so that words of different texts never count as one."""
    body = block_size - 2
    stream_ids: list[int] = []
    stream_words: list[int] = []
    offset = 0
    for ids, words in encoded:
        stream_ids += ids + [sep_id]
        stream_words += [w + offset for w in words] + [NO_WORD]
        offset += (max(words) + 1) if words else 0
    blocks = []
    for start in range(0, len(stream_ids), body):
        ids, words = stream_ids[start : start + body], stream_words[start : start + body]
        if len(ids) < 8:  # a scrap at the end teaches nothing
            continue
        blocks.append(([cls_id, *ids, sep_id], [NO_WORD, *words, NO_WORD]))
    return blocks


def mask_batch(
    blocks: list[tuple[list[int], list[int]]],
    special_ids: set[int],
    mask_id: int,
    vocabulary: list[int],
    probability: float,
    generator: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels): chosen words have every token masked; of masked tokens 80% become
    [MASK], 10% a random corpus token, 10% stay; labels are -100 except at masked tokens."""
    width = max(len(ids) for ids, _ in blocks)
    input_ids = torch.zeros((len(blocks), width), dtype=torch.long)
    attention = torch.zeros((len(blocks), width), dtype=torch.long)
    labels = torch.full((len(blocks), width), -100, dtype=torch.long)
    for row, (ids, words) in enumerate(blocks):
        chosen = {w for w in set(words) if w != NO_WORD and generator.random() < probability}
        masked = [ids[i] not in special_ids and words[i] in chosen for i in range(len(ids))]
        new_ids = list(ids)
        for i, is_masked in enumerate(masked):
            if not is_masked:
                continue
            labels[row, i] = ids[i]
            draw = generator.random()
            new_ids[i] = (
                mask_id if draw < 0.8 else (vocabulary[generator.randrange(len(vocabulary))] if draw < 0.9 else ids[i])
            )
        input_ids[row, : len(ids)] = torch.tensor(new_ids)
        attention[row, : len(ids)] = 1
    return input_ids, attention, labels


class CorpusVocabularyHead(torch.nn.Module):
    """BERT's MLM head with the output layer limited to the corpus vocabulary (see the module docstring)."""

    vocabulary: torch.Tensor  # a buffer: the corpus's token ids, ascending
    position: torch.Tensor  # a buffer: each token id's row in the limited output layer, or -100

    def __init__(self, model: BertForMaskedLM, vocabulary: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("vocabulary", torch.tensor(vocabulary, dtype=torch.long))
        # Not saved with the weights (it follows from the vocabulary), but moved with them to the training device.
        position = torch.full((model.config.vocab_size,), -100, dtype=torch.long)
        position[self.vocabulary] = torch.arange(len(vocabulary))
        self.register_buffer("position", position, persistent=False)

    def _masked_logits(
        self, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over the corpus vocabulary at the masked tokens, and their targets' positions in it."""
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention).last_hidden_state
        where = labels != -100
        predictions = self.model.cls.predictions
        transformed = predictions.transform(hidden[where])
        weight = predictions.decoder.weight[self.vocabulary]
        logits = transformed @ weight.T + predictions.bias[self.vocabulary]
        return logits.float(), self.position[labels[where]]

    def forward(self, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each masked token's loss. A share without masked tokens gives none, yet reaches every weight, as
        DistributedDataParallel needs of every rank's step."""
        logits, targets = self._masked_logits(input_ids, attention, labels)
        return F.cross_entropy(logits, targets, reduction="none")

    def loss(self, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The mean loss over the masked tokens, and their number."""
        logits, targets = self._masked_logits(input_ids, attention, labels)
        if not len(targets):
            return torch.zeros(()), 0
        return F.cross_entropy(logits, targets), len(targets)


def _held_out_split(texts: list[str], settings: PretrainConfig) -> tuple[list[str], list[str]]:
    """(held-out texts, training texts), drawn by the seed."""
    order = np.random.default_rng(settings.seed).permutation(len(texts))
    held = max(1, int(round(settings.holdout * len(texts))))
    return [texts[i] for i in order[:held]], [texts[i] for i in order[held:]]


def _encoder_source(recipe: PretrainRecipe, registry: Registry, texts: list[str], run: VersionFolder) -> EncoderSource:
    """The encoder the run starts from; from scratch, a tokenizer trained on `texts` into the run folder."""
    settings = recipe.pretrain
    if settings.from_scratch:
        # On resume the saved tokenizer is reused: the checkpoint's embedding rows are indexed by its ids.
        if not (run.tokenizer / "tokenizer.json").is_file():
            train_tokenizer(texts, settings.tokenizer, settings.vocab_size, run.tokenizer)
        return EncoderSource(f"scratch-{settings.size}-{settings.tokenizer}", run.tokenizer)
    source = resolve_encoder(recipe.model.name, registry, texts)
    model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
    if model_type != "bert":
        raise TuneloopError(f"MLM pretraining supports BERT encoders; {source.name} is '{model_type}'")
    return source


def _load_model(settings: PretrainConfig, source: EncoderSource) -> tuple[BertForMaskedLM, PreTrainedTokenizerBase]:
    """Every rank's model: a new BERT sized for the trained tokenizer (from scratch), or the encoder's own."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        if settings.from_scratch:
            return BertForMaskedLM(bert_config(settings.size, len(tokenizer))), tokenizer
        return BertForMaskedLM.from_pretrained(source.path), tokenizer
    except (OSError, ValueError) as exc:
        raise TuneloopError(f"cannot load {source.path} as a BERT encoder for MLM: {first_line(exc)}") from exc


def _started_run(
    recipe: PretrainRecipe, registry: Registry, resume: str | Path | None, world: World
) -> tuple[PretrainRecipe, VersionFolder, list[str], EncoderSource]:
    """The run's recipe and folder (a new one, or the one resumed with the recipe it started with), its corpus and
    the encoder it starts from: rank 0's work under torchrun."""
    folder = new_run_folder(recipe) if resume is None else resume_folder(recipe, resume, CHECKPOINT)
    if resume is not None:
        saved = read_yaml_mapping(folder.config)
        recipe = validated(PretrainRecipe, {**saved, "registry": recipe.registry.model_dump()}, f"{folder.config}: ")
    check_batch_divides("pretrain.batch_size", recipe.pretrain.batch_size, world)  # before a new folder is written
    if resume is None:
        start_run(recipe, folder)
    settings = recipe.pretrain
    texts = read_corpus(settings.paths, settings.text_column, masker(recipe.privacy))
    _, train_texts = _held_out_split(texts, settings)
    return recipe, folder, texts, _encoder_source(recipe, registry, train_texts, folder)


@dataclass
class MaskedCorpus:
    """The corpus as the model reads it: [CLS] … [SEP] blocks of token ids with their word numbers, the vocabulary
    the output layer is limited to, and the held-out blocks masked once (so epochs compare)."""

    train_blocks: list[tuple[list[int], list[int]]]
    heldout_blocks: list[tuple[list[int], list[int]]]
    vocabulary: list[int]
    special: set[int]
    mask_id: int
    heldout_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def summary(self, texts: int, settings: PretrainConfig, tokenizer_vocabulary: int) -> CorpusSummary:
        return {
            "texts": texts,
            "train_blocks": len(self.train_blocks),
            "heldout_blocks": len(self.heldout_blocks),
            "block_size": settings.block_size,
            "corpus_vocabulary": len(self.vocabulary),
            "tokenizer_vocabulary": tokenizer_vocabulary,
            "whole_word": settings.whole_word,
        }


def masked_corpus(
    settings: PretrainConfig, tokenizer: PreTrainedTokenizerBase, train_texts: list[str], heldout_texts: list[str]
) -> MaskedCorpus:
    """Pack both parts of the corpus into blocks and mask the held-out ones with a generator of their own."""
    train_blocks, heldout_blocks = (
        pack_blocks(
            encode_corpus(tokenizer, part, settings.whole_word),
            settings.block_size,
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
        )
        for part in (train_texts, heldout_texts)
    )
    if not train_blocks or not heldout_blocks:
        raise TuneloopError(
            f"too little text to fill {settings.block_size}-token blocks for training and held-out "
            f"perplexity; add text or lower pretrain.block_size"
        )
    vocabulary = sorted({t for ids, _ in train_blocks + heldout_blocks for t in ids} | {tokenizer.mask_token_id})
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    fixed = random.Random(settings.seed + 1)
    heldout_batches = [
        mask_batch(
            heldout_blocks[i : i + settings.batch_size],
            special,
            tokenizer.mask_token_id,
            vocabulary,
            settings.mask_probability,
            fixed,
        )
        for i in range(0, len(heldout_blocks), settings.batch_size)
    ]
    return MaskedCorpus(train_blocks, heldout_blocks, vocabulary, special, tokenizer.mask_token_id, heldout_batches)


def _fresh_state() -> PretrainState:
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "history": [],
        "train_seconds": 0.0,
        "generator": None,
        "running": 0.0,
        "counted": 0,
    }


class Pretraining:
    """The model being pretrained, its optimiser and where the run is: one optimiser step at a time, a checkpoint
    that resumes with any number of processes, the held-out score at the end of an epoch.

    Figures are global (the position in the epochs, the masking generator, the losses summed over the ranks). Every
    rank masks the whole global batch with the same generator and keeps its rows, so a block is masked the same way
    whatever the number of processes, and the loss is divided by the whole batch's masked tokens.
    """

    def __init__(
        self,
        model: BertForMaskedLM,
        corpus: MaskedCorpus,
        settings: PretrainConfig,
        folder: VersionFolder,
        world: World,
        plan: DevicePlan,
    ) -> None:
        self.corpus, self.settings = corpus, settings
        self.folder, self.world, self.plan = folder, world, plan
        self.head = CorpusVocabularyHead(model, corpus.vocabulary).to(plan.device)
        if not settings.from_scratch and model.config.vocab_size > BIG_VOCABULARY:
            # A 250k-row embedding tied to the output layer: the layers adapt, the vocabulary stays as it was.
            model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        self.steps_per_epoch = -(-len(corpus.train_blocks) // settings.batch_size)
        total = self.steps_per_epoch * settings.epochs
        # The MLM head has its own learning rate; its output layer is tied to the word embeddings, which the
        # encoder's groups already hold.
        self.optimizer = torch.optim.AdamW(
            parameter_groups(model.bert, settings.lr, settings.weight_decay)
            + parameter_groups(model.cls, settings.head_lr, settings.weight_decay, skip=model.bert.parameters())
        )
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = get_scheduler(
            "linear", self.optimizer, num_warmup_steps=int(settings.warmup_ratio * total), num_training_steps=total
        )
        # fp16 gradients underflow without loss scaling; a disabled scaler passes everything through unchanged.
        self.scaler = torch.amp.GradScaler(plan.device.type, enabled=plan.needs_scaler)
        self.state = _fresh_state()
        self.generator = random.Random(settings.seed)
        # Under torchrun: rank 0's weights broadcast to every rank, then the ranks' gradients averaged at each step.
        self.trainer: torch.nn.Module = self.head
        if world.distributed:
            self.trainer = torch.nn.parallel.DistributedDataParallel(
                self.head, device_ids=[plan.device] if plan.on_gpu else None
            )

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.settings.epochs

    def resume(self) -> None:
        saved = load_checkpoint(self.folder, CHECKPOINT)
        self.head.load_state_dict(saved["head"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = saved["state"]
        assert self.state["generator"] is not None  # set before every checkpoint
        self.generator.setstate(self.state["generator"])
        restore_rng(saved["rng"])  # dropout draws from torch's generator
        log.info("resuming pretraining at epoch %d step %d", self.state["epoch"], self.state["step_in_epoch"])

    def checkpoint(self) -> None:
        if not self.world.main:
            return
        self.state["generator"] = self.generator.getstate()
        payload = {
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": self.state,
            "rng": rng_state(),
        }
        save_checkpoint(self.folder, CHECKPOINT, payload)

    def step(self, chosen: list[tuple[list[int], list[int]]]) -> None:
        """One optimiser step on a global batch of blocks."""
        started = time.perf_counter()
        corpus, settings, world = self.corpus, self.settings, self.world
        input_ids, attention, labels = mask_batch(
            chosen, corpus.special, corpus.mask_id, corpus.vocabulary, settings.mask_probability, self.generator
        )
        rows, weight = world.share(range(len(chosen)))
        with self.plan.autocast():
            token_losses = self.trainer(*(self.plan.to_device(t[rows]) for t in (input_ids, attention, labels)))
        masked = int((labels != -100).sum())
        # The mean over the whole batch's masked tokens, not over this rank's.
        loss = shard_loss(token_losses, weight, max(masked, 1), world)
        scaled_step(loss, self.scaler, self.optimizer, self.scheduler, self.parameters)
        state = self.state
        state["train_seconds"] += time.perf_counter() - started
        state["global_step"] += 1
        state["step_in_epoch"] += 1
        state["running"] += world.total(weight * float(token_losses.detach().sum()))
        state["counted"] += masked

    def end_epoch(self) -> HistoryEntry:
        """Score the held-out blocks, record the epoch and start the next one."""
        state = self.state

        def heldout_loss(*batch: torch.Tensor) -> tuple[torch.Tensor, int]:
            with self.plan.autocast():
                return self.head.loss(*map(self.plan.to_device, batch))

        held_loss = mean_token_loss(heldout_loss, self.head, self.corpus.heldout_batches, self.world)
        entry: HistoryEntry = {
            "epoch": state["epoch"] + 1,
            "step": state["global_step"],
            "train_loss": state["running"] / max(state["counted"], 1),
            "heldout_loss": held_loss,
            "heldout_perplexity": math.exp(min(held_loss, 50)),
            "train_seconds": state["train_seconds"],
        }
        state["history"].append(entry)
        log.info("epoch %d: %s", state["epoch"] + 1, entry)
        state["epoch"], state["step_in_epoch"], state["running"], state["counted"] = state["epoch"] + 1, 0, 0.0, 0
        return entry


def _train_epochs(
    training: Pretraining,
    show_progress: bool,
    step_callback: Callable[[PretrainState], None] | None,
) -> None:
    """The epochs left of the run, from where its state says it is."""
    settings, state, world = training.settings, training.state, training.world
    blocks = training.corpus.train_blocks
    metrics = MetricsLog(training.folder, prefix="pretrain/") if world.main else None
    training.head.train()
    shown = show_progress and world.main
    with TrainingProgress("pretraining", training.total_steps, state["global_step"], shown) as bar:
        while state["epoch"] < settings.epochs:
            order = np.random.default_rng(settings.seed + state["epoch"]).permutation(len(blocks))
            for index in range(state["step_in_epoch"] * settings.batch_size, len(order), settings.batch_size):
                training.step([blocks[i] for i in order[index : index + settings.batch_size]])
                bar.step(state["running"] / max(state["counted"], 1), f"epoch {state['epoch'] + 1}/{settings.epochs}")
                if state["global_step"] % settings.checkpoint_every == 0:
                    training.checkpoint()
                if step_callback:
                    step_callback(state)
            entry = training.end_epoch()
            if metrics:
                metrics.record(entry)
            training.checkpoint()
    if metrics:
        metrics.close()


def run(
    recipe: PretrainRecipe,
    resume: str | Path | None = None,
    register: bool = True,
    show_progress: bool = True,
    step_callback: Callable[[PretrainState], None] | None = None,
) -> PretrainOutcome:
    """Pretrain (or continue pretraining) an encoder by MLM; save it as a registry version train can start from.

    `resume` ('latest' or a run folder) continues a run from its checkpoint, with the recipe it started with, in
    any number of processes. `step_callback(state)` runs after every step. Under torchrun rank 0's outcome holds
    the registered version, the other ranks' none.
    """
    registry = Registry(recipe.registry)
    plan = plan_device(recipe.pretrain, section="pretrain")
    world = join_world(process_group_backend(plan))  # one process, or one of torchrun's
    recipe, folder, texts, source = world.from_rank_zero(lambda: _started_run(recipe, registry, resume, world))
    settings = recipe.pretrain
    use_threads(settings.threads)
    seed_everything(settings.seed)
    heldout_texts, train_texts = _held_out_split(texts, settings)
    model, tokenizer = _load_model(settings, source)
    corpus = masked_corpus(settings, tokenizer, train_texts, heldout_texts)
    training = Pretraining(model, corpus, settings, folder, world, plan)
    if resume is not None:
        training.resume()
    log.info("pretraining on %s", plan.describe())
    _train_epochs(training, show_progress, step_callback)
    # DistributedDataParallel goes before the process group it holds: freed after leave_world, the group's gloo
    # threads would wait for the interpreter lock this thread holds, and the run would hang at its end.
    del training.trainer
    leave_world()
    history, seconds = training.state["history"], training.state["train_seconds"]
    if not world.main:  # rank 0 saves the encoder and registers it
        return PretrainOutcome(folder=folder, history=history, train_seconds=seconds)
    outcome = PretrainOutcome(
        folder=folder,
        history=history,
        train_seconds=seconds,
        corpus=_save_encoder(folder, model, tokenizer, source, corpus.summary(len(texts), settings, len(tokenizer))),
    )
    if register:
        last = history[-1]
        outcome.version = register_run(
            registry,
            recipe,
            folder,
            base_model=source.name,
            fingerprint=fingerprint(texts),
            metrics={
                "heldout_perplexity": last["heldout_perplexity"],
                "heldout_loss": last["heldout_loss"],
                "train_seconds": seconds,
                "kind": "encoder",
            },
            keep_checkpoints=settings.keep_checkpoints,
            parent=recipe.model.name if "@" in recipe.model.name else None,
        )
        outcome.folder = registry.folder(outcome.version)  # the run folder may be gone (keep_checkpoints)
    return outcome


def _save_encoder(
    folder: VersionFolder,
    model: BertForMaskedLM,
    tokenizer: PreTrainedTokenizerBase,
    source: EncoderSource,
    corpus: CorpusSummary,
) -> CorpusSummary:
    """The pretrained encoder (without its MLM head) with its tokenizer, where it came from and what it read."""

    def save(target: Path) -> None:
        target.mkdir(parents=True)
        model.bert.save_pretrained(target)
        tokenizer.save_pretrained(target)

    write_dir_atomically(save, folder.model)
    folder.encoder.write_text(json.dumps({"name": source.name, "text_prefix": source.text_prefix}))
    folder.corpus.write_text(json.dumps(corpus, indent=2))
    return corpus
