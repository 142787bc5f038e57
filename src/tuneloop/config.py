"""Typed configuration: pydantic models loaded from YAML, overridden with dotted `a.b=c` pairs.

Each command reads one root: a recipe (`ClassifierRecipe`, `PretrainRecipe`, `SftRecipe`: how a model is
trained, stored with every version it makes) or the settings of a command that runs things
(`ServerSettings`, also read from TUNELOOP_* environment variables; `GateSettings`; `RegistrySettings`).
All of them share the `registry` section: where versions live. A key a root does not have is an error that
names it and suggests the closest one.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar, get_args, get_origin, overload

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneloop.errors import TuneloopError

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# A registry model name: also a folder name and part of NAME@VERSION references and URLs.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"
KEEP_CHECKPOINTS = (
    "Finished (registered) runs of this model whose run folder, resumable checkpoint included, stays under "
    "runs/; older ones are deleted once a run registers (the registered version keeps everything but the "
    "checkpoint). Runs that did not finish are never deleted: they are what --resume continues."
)


class StrictModel(BaseModel):
    """Every config section and definition: a typo like `train.lr_rate` is an error, never a silent default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Where the labelled texts are and how to split them."""

    path: Path | None = Field(None, description="csv, tsv, jsonl or parquet file of labelled texts.")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = Field(
        "auto", description="File format; auto reads it from the extension."
    )
    text_column: str = Field("text", description="Column holding the texts.")
    label_column: str = Field("label", description="Column holding the labels.")
    split_column: str | None = Field(
        None, description="Optional column with train/val/test values; a given test split is kept as is."
    )
    test_path: Path | None = Field(None, description="Optional separate file used as the test split.")
    val_size: float = Field(
        0.1, gt=0, lt=0.5, description="Share of rows for the validation split (early stopping, the scope threshold)."
    )
    test_size: float = Field(
        0.15, gt=0, lt=0.5, description="Share of rows for the test split (the report and the gate)."
    )
    seed: int = Field(42, description="Seed of the split.")
    conflicts: Literal["drop", "majority"] = Field(
        "drop", description="Texts seen with different labels: drop them all, or keep the majority label."
    )
    kfold: int | None = Field(None, ge=2, description="k-fold cross-validation instead of a single val split.")
    near_duplicate_threshold: float = Field(
        0.8,
        ge=0.5,
        le=1.0,
        description="Two texts are near-duplicates when this share of their words and word pairs is shared "
        "(Jaccard similarity; a Chinese character counts as a word).",
    )
    near_duplicates: Literal["keep", "drop"] = Field(
        "keep",
        description="Near-duplicate rows: keep them (listed in the data report), or keep one per cluster and label.",
    )
    exclude: Path | None = Field(
        None,
        description="A label audit's CSV (tuneloop data audit) in which a person marked rows confirmed "
        "(yes/y/true/1/x): those texts are left out.",
    )
    leakage: Literal["report", "drop"] = Field(
        "report",
        description="Validation and test rows with a near-duplicate in training: report them (the test report "
        "scores them apart), or drop them from those splits.",
    )


class EncoderConfig(StrictModel):
    """Which encoder to start from."""

    name: str = Field(
        "auto",
        description="auto (pick by the data's language), all-MiniLM-L6-v2, multilingual-e5-small, "
        "a local Hugging Face folder, or a registered version NAME@VERSION.",
    )


class ModelConfig(EncoderConfig):
    """Which encoder to start from and the classification head on top."""

    pooling: Literal["mean", "cls"] = Field(
        "mean",
        description="mean: average of the token vectors (how the packaged sentence encoders were trained); "
        "cls: the first token's.",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the head.")
    head: Literal["cosine", "linear"] = Field(
        "cosine", description="cosine: scaled cosine similarity to learned class vectors."
    )
    head_init: Literal["centroids", "random"] = Field(
        "centroids", description="centroids: start each class vector at its training examples' mean embedding."
    )
    cosine_scale: float = Field(
        25.0, gt=0, description="Cosine head: logits are this times the cosine to each class vector (a temperature)."
    )
    max_length: int = Field(128, ge=8, le=512, description="Longer texts are cut to this many tokens.")
    truncation: Literal["auto", "head", "head_tail", "windows"] = Field(
        "head",
        description="How a text longer than max_length is read, in training and serving alike: head (its first "
        "tokens), head_tail (the first quarter and the last three quarters: long reviews often end with their "
        "point), windows (all of it, in windows of max_length overlapping by a quarter, their logits averaged; each "
        "window a training example); auto: windows when at least 5% of the training texts are longer than "
        "max_length, else head (the report says which, why, and the encoder passes per text it costs). head is the "
        "default: on long Chinese reviews windows cost half as much again and gained nothing (docs: Train, Long "
        "texts, measured).",
    )
    max_windows: int = Field(
        8, ge=2, description="truncation=windows: the most windows one text is read in (spread over a longer text)."
    )
    layers: int | None = Field(
        None,
        ge=1,
        description="Keep only the encoder's lowest this many layers (the upper ones are dropped before "
        "fine-tuning): half the layers train and serve about twice as fast. Default: all. Not with train.method=lora, "
        "whose versions point at the whole base encoder.",
    )


class DPConfig(StrictModel):
    """Differentially private training (DP-SGD with Opacus): each step clips every example's gradient, adds
    Gaussian noise sized for the budget below and draws its batch by Poisson sampling, so that the weights
    reveal little about any one training text. train.batch_size is the expected batch."""

    epsilon: float = Field(
        description="Privacy budget ε of the whole run (smaller is more private and less accurate; 1-10 is usual).",
        gt=0,
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="Privacy δ; default 1/n, n the training texts (smaller is stronger)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Each example's gradient is clipped to this norm.")
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="How ε is counted: prv (tight, Opacus's default) or rdp (Rényi, a looser bound)."
    )
    physical_batch_size: int = Field(
        32, ge=1, description="Texts per forward pass; a step's batch is split into these to bound memory."
    )
    centroid_noise: float | None = Field(
        2.0,
        gt=0,
        description="With model.head_init=centroids, the class vectors start at the training centroids plus "
        "Gaussian noise of this multiplier (a Gaussian mechanism, counted in ε); null: they start random.",
    )


class FewShotConfig(StrictModel):
    """The few-shot regime, for labels with a handful of examples each, in SetFit's two steps: a contrastive stage
    shapes the encoder's embedding space (supervised contrastive learning, Khosla et al., 2020, where SetFit uses
    pairs), then the head is fitted on the tuned embeddings; the label names join the training texts. No
    classifier loop follows unless loop_steps asks for one (with a smoothed validation score, not the noise of a
    validation split with one or two texts per label)."""

    mode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: the few-shot regime when the median label has at most few_shot.max_per_label training "
        "texts (one process, not under train.dp); on / off: always / never. The report says which regime ran and why.",
    )
    max_per_label: int = Field(
        20,
        ge=1,
        description="auto: the few-shot regime up to this many training texts for the median label (its stages cost "
        "minutes, which a set with more examples per label earns little from).",
    )
    contrastive_steps: int = Field(
        50,
        ge=0,
        description="Steps of the contrastive stage before the classifier trains (0: none). Each step draws "
        "labels_per_batch labels and texts_per_label texts of each, and pulls texts of a label together, away from "
        "the others.",
    )
    head_steps: int = Field(
        300,
        ge=0,
        description="After the contrastive stage, the class vectors are fitted to the tuned embeddings of the training "
        "texts for this many full-batch steps (SetFit's classifier step; seconds). 0: they start at the centroids.",
    )
    labels_per_batch: int = Field(16, ge=2, description="Contrastive stage: labels drawn per step.")
    texts_per_label: int = Field(4, ge=2, description="Contrastive stage: texts drawn per label and step.")
    lr: float = Field(5e-5, gt=0, description="Contrastive stage: the encoder's learning rate (warmup, linear decay).")
    temperature: float = Field(
        0.1, gt=0, description="Contrastive stage: cosine similarities are divided by this (smaller: sharper)."
    )
    label_names: bool = Field(
        True,
        description="Each label's name, made readable (card_arrival → 'card arrival'), joins its training texts; "
        "only names with letters (not 0/1).",
    )
    loop_steps: int = Field(
        0,
        ge=0,
        description="Optimiser steps of the classifier loop after the head fit, at least (more epochs than "
        "train.epochs when the data is small; early stopping may only stop it after them). 0: no loop, the model "
        "is the contrastive stage's encoder under the fitted head (fine-tuning all of it on a handful of texts per "
        "label lost accuracy: docs/guide/train.md).",
    )
    smoothing: int = Field(
        3,
        ge=1,
        description="With loop_steps: the kept model and early stopping follow the mean of the last this many "
        "validation scores, not one noisy score of a tiny validation split.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: object) -> object:
        # YAML reads a bare on / off (train.few_shot.mode=off on the command line) as true / false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# Settings that measured no gain and left the training loop (figures in docs/guide/train.md): the value at which a
# recipe stored with one trained as today's loop does (None: any), and why it went.
RETIRED_TRAIN_SETTINGS: dict[str, tuple[object, str]] = {
    "rdrop": (0, "R-Drop measured no gain on Banking77 for 1.6x the training time"),
    "frozen_layers": (0, "freezing lower layers trained slower and less accurately than model.layers"),
    "cycles": (None, "cosine restarts measured no gain over the linear schedule"),
    "layer_lr_decay": (1.0, "layer-wise learning-rate decay (0.9 a layer) measured no gain on waimai_10k"),
}


def _inert(value: object, inert: object) -> bool:
    if inert is None:
        return True
    try:
        return float(value) == float(inert)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DEVICE_HELP = (
    "Where the model trains: auto takes a CUDA GPU when torch sees one (under torchrun, each process the GPU of its "
    "local rank, and NCCL between them), else the CPU; cuda refuses to start without one."
)
PRECISION_HELP = (
    "Autocast of the forward pass. auto: bf16 on a GPU that has it, else fp16 with a gradient scaler; on a CPU bf16 "
    "only where it runs natively (AVX512-BF16 or AMX), else fp32."
)


class DeviceSettings(Protocol):
    """What a recipe section that trains says about where and in which precision (train, pretrain)."""

    @property
    def device(self) -> Device: ...

    @property
    def precision(self) -> Precision: ...


class TrainConfig(StrictModel):
    """Optimisation of the classifier."""

    epochs: int = Field(3, ge=1, description="Most passes over the training split (early stopping may end sooner).")
    batch_size: int = Field(32, ge=1, description="Texts per optimiser step.")
    lr: float = Field(1e-4, gt=0, description="Encoder learning rate.")
    head_lr: float = Field(
        2e-3,
        gt=0,
        description="Learning rate of the classification head (it starts far from its optimum, the encoder does not).",
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay on weights (not on biases and normalisation weights)."
    )
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Share of the steps over which the learning rate rises from zero."
    )
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warmup (transformers' schedules)."
    )
    grad_clip: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weighted: bool = Field(False, description="Weight the loss by inverse class frequency.")
    patience: int = Field(2, ge=1, description="Epochs without a better validation macro-F1 before stopping.")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Also score the validation split every this many steps, not only after each "
        "epoch, and keep the best model from any of those points (large sets, few epochs); patience still "
        "counts epochs.",
    )
    checkpoint_every: int = Field(200, ge=1, description="Steps between resumable checkpoints.")
    keep_checkpoints: int = Field(0, ge=0, description=KEEP_CHECKPOINTS)
    freeze_embeddings: bool = Field(
        False,
        description="Freeze the word embeddings. Otherwise only the rows of tokens that occur in the "
        "training texts are trained (no other row would get a gradient), which keeps e5's 250k-row matrix cheap.",
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    precision: Precision = Field(
        "auto", description=PRECISION_HELP + " DP-SGD always trains in fp32 (it clips each text's gradient)."
    )
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores.")
    seed: int = Field(42, description="Seed of initialisation, shuffling and dropout.")
    length_grouping: bool = Field(
        True, description="Batch texts of similar length together (less padding); batches are still shuffled."
    )
    method: Literal["full", "lora"] = Field(
        "full",
        description="full: update every encoder weight; lora: train low-rank adapters (peft) and the head, "
        "and store only those (the version points at its base encoder).",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA: rank of the adapters.")
    lora_alpha: int = Field(16, ge=1, description="LoRA: scaling of the adapters (alpha / rank).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="LoRA: dropout on the adapters' input.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        description="Names of the encoder's linear layers that get adapters.",
    )
    dp: DPConfig | None = Field(
        None,
        description="Differential privacy (e.g. dp.epsilon=8): DP-SGD for full fine-tuning or LoRA; "
        "see the security page of the docs.",
    )
    outlier_exposure: float = Field(
        0.5,
        ge=0,
        description="Weight of the outlier-exposure loss: each step also shows the model a few of tuneloop's "
        "shipped off-topic messages (weather, sport, small talk...) in the data's languages and pushes its "
        "answer on them towards uncertainty (uniform over the labels), so a scope threshold can refuse what the "
        "labels do not cover. 0 turns it off; off under train.dp.",
    )
    outlier_exposure_max_similarity: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Off-topic messages this close (cosine of the untrained encoder's embeddings) to a training "
        "text are left out: a business whose intents cover one of their topics keeps it.",
    )
    teachers: list[str] = Field(
        default_factory=list,
        description="Knowledge distillation: registered versions (NAME@N) or version folders trained on the same "
        "labels (with tasks, the first task's); the model also learns their averaged answers on the training "
        "texts (soft labels). A teacher with more layers for a faster student of model.layers, or several "
        "seeds of one recipe for one model that learns their ensemble's answers. Not with train.dp (the "
        "teachers saw the data without it).",
    )
    distill_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="With train.teachers: the share of the loss that matches the teachers' soft labels; the "
        "rest is the usual cross-entropy with the true labels.",
    )
    distill_temperature: float = Field(
        2.0,
        gt=0,
        description="With train.teachers: teachers' and model's logits are divided by this before comparing, "
        "so the teachers' second and third choices carry weight (Hinton et al., 2015).",
    )
    audit: bool = Field(
        False,
        description="Before training, rank the training rows whose label looks wrong (tuneloop train --audit, "
        "as tuneloop data audit): label_issues.csv in the run, a summary in the data report.",
    )
    profile: bool = Field(
        False,
        description="Record the first profile_steps steps with torch.profiler (tuneloop train --profile): a "
        "trace for TensorBoard or Perfetto in the run's profile/ folder and a summary of the time per stage.",
    )
    profile_steps: int = Field(30, ge=1, description="Training steps the profile records.")
    few_shot: FewShotConfig = Field(
        default_factory=FewShotConfig,
        description="The few-shot regime (a contrastive stage, label names, enough steps, smoothed early stopping).",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp keeps a whole copy of the model in every process; fsdp shards weights, "
        "gradients and optimizer state over the processes (torch's fully_shard), for an encoder too large for "
        "one process's memory. Both take the same steps; fsdp needs torchrun with at least 2 processes.",
    )
    baseline: Literal["auto", "off", "only"] = Field(
        "auto",
        description="auto: also fit a TF-IDF baseline (character n-grams for Chinese, word and character n-grams "
        "otherwise; logistic regression) on the training split, show it beside the transformer in the report, and "
        "serve the blend of the two when it beats the transformer on validation by hybrid_min_gain; off: no "
        "baseline; only: no fine-tuning, the baseline alone is registered and served (seconds, no encoder). Off "
        "under train.dp: its vocabulary and weights would carry the training texts without privacy.",
    )
    hybrid_min_gain: float = Field(
        0.002,
        ge=0,
        lt=1,
        description="train.baseline=auto serves the blend of transformer and baseline when its validation "
        "macro-F1 (the blend's weight chosen on one half of the validation split and scored on the other, both "
        "ways) beats the transformer's by at least this.",
    )

    @field_validator("freeze_embeddings", mode="before")
    @classmethod
    def _null_freeze_means_train(cls, value: object) -> object:
        # Versions registered before embedding rows were trainable cheaply stored null ("freeze only a big
        # vocabulary"); retraining one of them now trains its embeddings like any new run.
        return False if value is None else value

    @field_validator("baseline", mode="before")
    @classmethod
    def _yaml_off_is_off(cls, value: object) -> object:
        # YAML reads a bare `off` (in a file or a dotted override) as false.
        return "off" if value is False else value

    @model_validator(mode="before")
    @classmethod
    def _retired_settings(cls, value: object) -> object:
        """Settings that measured no gain were removed (the training guide has their figures). A recipe a version
        stored with one of them at its default still loads; asking for one is an error that says so."""
        if not isinstance(value, dict):
            return value
        tree = dict(value)
        if "bf16" in tree:  # the precision setting's former name: true was "where the CPU has it", as auto is
            bf16 = tree.pop("bf16")
            tree.setdefault("precision", "fp32" if bf16 in (False, "false", "False", 0) else "auto")
        if tree.get("schedule") == "cosine_restarts":
            raise ValueError(
                f"train.schedule=cosine_restarts was removed ({RETIRED_TRAIN_SETTINGS['cycles'][1]}): use linear"
            )
        for key, (inert, why) in RETIRED_TRAIN_SETTINGS.items():
            if key in tree and not _inert(tree[key], inert):
                raise ValueError(f"train.{key} was removed ({why}; see the training guide): leave it out")
            tree.pop(key, None)
        return tree

    @model_validator(mode="after")
    def _nothing_private_training_cannot_keep(self) -> TrainConfig:
        if self.dp is None:
            return self
        if self.teachers:
            raise ValueError(
                "train.teachers with train.dp: the teachers learnt the training texts without privacy, and their "
                "answers would carry that into the private model; leave train.teachers empty under train.dp"
            )
        if self.baseline == "only":
            raise ValueError(
                "train.baseline=only with train.dp: the baseline is not trained privately (its vocabulary holds "
                "the training texts' n-grams); use one or the other"
            )
        return self


class PretrainConfig(StrictModel):
    """Masked-language-model pretraining on unlabelled text: continued from an encoder, or from scratch."""

    paths: list[Path] = Field(
        default_factory=list,
        description="Unlabelled text: .txt (a text per line) or csv/tsv/jsonl/parquet with pretrain.text_column.",
    )
    text_column: str = Field("text", description="The text column of table files.")
    from_scratch: bool = Field(False, description="Train a new tokenizer and a small BERT instead of continuing.")
    size: Literal["tiny", "small", "base"] = Field("small", description="From scratch: 2, 4 or 6 layers.")
    tokenizer: Literal["wordpiece", "char"] = Field(
        "wordpiece",
        description="From scratch: WordPiece (Chinese characters are single tokens either way) or "
        "one token per character.",
    )
    vocab_size: int = Field(16_000, ge=100, description="From scratch: WordPiece vocabulary size.")
    mask_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens (or whole words) masked.")
    whole_word: bool = Field(False, description="Mask whole words (Chinese words found by jieba) instead of pieces.")
    block_size: int = Field(128, ge=16, le=512, description="Texts are packed into blocks of this many tokens.")
    epochs: int = Field(1, ge=1, description="Passes over the corpus.")
    batch_size: int = Field(32, ge=1, description="Blocks per optimiser step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of the encoder (from scratch wants ~5e-4).")
    head_lr: float = Field(
        1e-3,
        gt=0,
        description="Learning rate of the MLM head: the packaged sentence encoders ship without one, so "
        "it starts random and must catch up before its gradients mean anything to the encoder.",
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on weights.")
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Share of the steps over which the learning rate rises from zero."
    )
    holdout: float = Field(0.05, gt=0, lt=0.5, description="Share of texts kept out to measure perplexity.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between resumable checkpoints.")
    keep_checkpoints: int = Field(0, ge=0, description=KEEP_CHECKPOINTS)
    device: Device = Field("auto", description=DEVICE_HELP)
    precision: Precision = Field("auto", description=PRECISION_HELP)
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores.")
    seed: int = Field(42, description="Seed of the held-out split, masking and dropout.")


class SftConfig(StrictModel):
    """Supervised fine-tuning of a small causal LM on (prompt, reply) pairs or chats, loss on replies only."""

    paths: list[Path] = Field(
        default_factory=list,
        description="jsonl with prompt/reply or messages, or a table with prompt and reply columns.",
    )
    model: str = Field("SmolLM2-135M-Instruct", description="The packaged SmolLM2, a version NAME@VERSION, a folder.")
    system_prompt: str | None = Field(None, description="Put first in every conversation that has no system turn.")
    method: Literal["full", "lora"] = Field("lora", description="lora stores ~2 MB of adapters; full ~540 MB.")
    lora_rank: int = Field(16, ge=1, description="LoRA: rank of the adapters.")
    lora_alpha: int = Field(32, ge=1, description="LoRA: scaling of the adapters (alpha / rank).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA: dropout on the adapters' input.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the model's linear layers that get adapters.",
    )
    epochs: int = Field(3, ge=1, description="Passes over the training conversations.")
    batch_size: int = Field(8, ge=1, description="Conversations per optimiser step.")
    lr: float = Field(2e-4, gt=0, description="2e-4 suits LoRA; full fine-tuning wants ~2e-5.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on weights.")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of the steps over which the learning rate rises from zero."
    )
    max_length: int = Field(384, ge=16, description="Longer conversations keep their last max_length tokens.")
    val_size: float = Field(0.1, ge=0, lt=0.5, description="Conversations held out for loss and perplexity.")
    device: Device = Field("auto", description=DEVICE_HELP)
    precision: Precision = Field("auto", description=PRECISION_HELP)
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores.")
    seed: int = Field(42, description="Seed of the held-out split, shuffling and dropout.")


class EvalConfig(StrictModel):
    """What the evaluation report contains."""

    calibration_bins: int = Field(15, ge=2, description="Confidence bins of the reliability diagram and ECE.")
    calibrate: bool = Field(
        True,
        description="At the end of training, fit a temperature on the validation split (temperature scaling) "
        "so that probabilities are calibrated wherever the version is used; labels never change.",
    )
    top_confusions: int = Field(10, ge=1, description="How many of the most frequent confusions the report lists.")
    examples_per_confusion: int = Field(3, ge=1, description="Example texts shown per confusion.")
    suspect_confidence: float = Field(
        0.9, gt=0.5, le=1, description="A wrong prediction at least this confident is listed as a possible label error."
    )
    suspects_listed: int = Field(20, ge=0, description="How many possible label errors the report shows.")
    explanations: int = Field(
        10,
        ge=0,
        description="Texts of the most frequent confusions and possible label errors whose words the report "
        "shades by attribution (Integrated Gradients); 0: none.",
    )
    train_sample: int = Field(2000, ge=1, description="Training rows re-scored for the train-vs-test gap.")


class ServingConfig(StrictModel):
    """The runtime a version is served with. It is built and checked at the end of training, and the test
    report (and later the promotion gate) scores the version with it: what serves is what was evaluated."""

    runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        "onnx-int8",
        description="onnx: the encoder exported to ONNX Runtime (same labels as PyTorch, less overhead per "
        "call); onnx-int8: int8 weights on top (1.5-2x as fast), kept only when it, or int8 with fp32 for close "
        "calls, passes the two checks below, else fp32 ONNX serves and the report says why; torch: eager PyTorch.",
    )
    int8_min_agreement: float = Field(
        0.995, gt=0, le=1, description="Share of the validation split the int8 encoder must label as fp32 does."
    )
    int8_max_accuracy_drop: float = Field(
        0.002, ge=0, le=1, description="Most test accuracy (a fraction: 0.002 = 0.2 points) int8 may lose to fp32."
    )


class RegistryConfig(StrictModel):
    """Where versions and their artifacts live."""

    home: Path = Field(
        default_factory=lambda: Path(os.environ.get("TUNELOOP_HOME", ".tuneloop")),
        description="Artifacts and the default SQLite database live here (env TUNELOOP_HOME).",
    )
    database_url: str | None = Field(
        default_factory=lambda: os.environ.get("TUNELOOP_DATABASE_URL"),
        description="SQLAlchemy URL (env TUNELOOP_DATABASE_URL); default: sqlite in the home folder.",
    )

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'registry.db').resolve()}"


class ServeConfig(StrictModel):
    """The HTTP server: which models, how requests are batched, limits and API keys."""

    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 answers this machine only.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names clients reach this server by (the Host header; '*.example.com' and '*' work); "
        "others get 400, which stops DNS rebinding. Empty: the names of serve.host (localhost, 127.0.0.1 and "
        "[::1] for a loopback address), or any host when it is 0.0.0.0 or ::, where naming them here is wiser.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (10.0.0.0/8) of the reverse proxies in front of this server: only from "
        "them are X-Forwarded-For and X-Forwarded-Proto read, for the client's address (which the wrong-key and "
        "keyless feedback limits count by) and scheme. Empty: those headers are ignored, and the address is the "
        "connection's.",
    )
    models: list[str] = Field(
        default_factory=list,
        description="Model names to serve (their production version); empty: every "
        "registered name that has a production version.",
    )
    max_batch_size: int = Field(32, ge=1, description="Most texts one forward pass takes from queued requests.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the first queued request waits for company.")
    max_padding: Annotated[float, Field(ge=0)] | Literal["auto"] | None = Field(
        "auto",
        description="A batch is run as several forward passes, grouped by length, where padding would "
        "add more than this share to its real tokens; null: always one pass; auto: 0.25 under ONNX Runtime, "
        "one pass under PyTorch (where grouping measured no faster).",
    )
    threads: int | None = Field(None, ge=1, description="torch threads for inference; default: all cores.")
    runtime: Literal["version", "torch", "onnx", "onnx-int8"] = Field(
        "version",
        description="version: each version as it was built, checked and evaluated at the end of training "
        "(its serving.runtime; ONNX Runtime for versions without that record); torch, onnx: that runtime for "
        "every version; onnx-int8: the int8 encoder where the version's check accepted it, fp32 ONNX otherwise.",
    )
    profile: bool = Field(
        False,
        description="Record the first profile_batches batches each served model runs with torch.profiler: a "
        "trace (TensorBoard, Perfetto) and a summary of the time per stage in <home>/profiles/, logged too.",
    )
    profile_batches: int = Field(200, ge=1, description="Batches per served model the profile records.")
    reload_poll_seconds: float = Field(
        2.0, gt=0, description="How often the registry is checked for a new production version (hot swap)."
    )
    top_k: int = Field(3, ge=1, description="Default number of ranked labels per text.")
    max_queue: int = Field(
        256,
        ge=1,
        description="Most texts waiting for one model; a request that would pass it gets 503 with "
        "Retry-After at once instead of waiting behind a queue the server cannot clear.",
    )
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="A request not answered by then gets 503 with Retry-After (its work is dropped)."
    )
    max_streams: int = Field(
        8,
        ge=1,
        description="Most chat turns answered at once, whole or streamed (a generating LM holds a thread and the "
        "CPU for seconds); more get 503 with Retry-After at once.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Most open connections; uvicorn answers more with 503 (slow or idle clients "
        "cannot hold every socket).",
    )
    keep_alive_seconds: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this.")
    read_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A connection whose request (headers and body) has not fully arrived this long after it "
        "opened, or after its previous answer, is closed: slow or silent clients cannot hold connections "
        "(slowloris).",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    max_texts: int = Field(64, ge=1, description="More texts in one request get 422.")
    max_text_chars: int = Field(2000, ge=1, description="A longer text gets 422.")
    explain_max_texts: int = Field(
        4,
        ge=0,
        description='Most texts per /v1/predict request with "explain": true (each costs explain_steps forward '
        "and backward passes on PyTorch, on the inference thread); more get 422, 0 turns explanations off.",
    )
    explain_steps: int = Field(
        32, ge=4, le=1000, description="Integrated Gradients steps per explained text (more: closer, slower)."
    )
    client_key_hashes: list[str] = Field(
        default_factory=list,
        description="sha256 hex of client API keys (tuneloop keys new); with none (and no client_keys), "
        "predict and feedback are open.",
    )
    allow_open: bool = Field(
        False,
        description="Serve on an address other machines can reach with no client keys (anyone who reaches it "
        "may predict, chat and send feedback that trains the model). Without it such a server refuses to start.",
    )
    admin_key_hashes: list[str] = Field(
        default_factory=list,
        description="sha256 hex of admin API keys (also valid as client keys); promotion over HTTP and the admin "
        "API need one.",
    )
    make_admin_key: bool = Field(
        True,
        description="tuneloop serve with no admin key anywhere makes one, prints it once and keeps its hash in "
        "the home (admin-key-hashes.txt), so the admin page works from the first start.",
    )
    trusted_key_hashes: list[str] = Field(
        default_factory=list,
        description="sha256 hex of client keys whose feedback trains without review (tuneloop keys new --trusted); "
        "admin keys are trusted too. Feedback from any other sender waits in the review queue.",
    )
    feedback_rate_limit: str | None = Field(
        "60/minute",
        description="Most feedback one untrusted sender (an API key; without a key, one client address) may "
        "send, as N/second|minute|hour|day, counted per server process; more get 429. null: no limit.",
    )
    feedback_daily_quota: int | None = Field(
        5000,
        ge=1,
        description="Most feedback one untrusted sender may send in 24 hours: for an API key counted in the "
        "database (so across replicas), without a key per client address in each server process; more get 429. "
        "null: no quota.",
    )
    auth_failures_per_minute: int = Field(
        10,
        ge=1,
        description="Wrong API keys one address may present per minute; after that its wrong keys get 429 for a "
        "while (a right key is still answered).",
    )
    metrics_need_key: bool = Field(
        False, description="/metrics answers only with an admin key (it names models and counts traffic)."
    )
    log_flush_ms: float = Field(200.0, gt=0, description="Prediction log: most time a row waits in memory.")
    log_max_backlog: int = Field(
        200_000,
        ge=1,
        description="Predictions waiting in memory for the database (while it is down or locked); past it the "
        "oldest go to a rescue file in the home, re-imported at the next start.",
    )
    assistant: Path | None = Field(
        None, description="An assistant definition (YAML): adds /v1/chat, the chat page / and the admin page /admin."
    )

    @field_validator("feedback_rate_limit")
    @classmethod
    def _rate_is_readable(cls, rate: str | None) -> str | None:
        if rate is not None:
            from limits import parse

            try:
                parse(rate)
            except ValueError:
                raise ValueError(f"'{rate}' is not a rate; write N/second, N/minute, N/hour or N/day") from None
        return rate

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"'{proxy[:80]}' is not an IP address or network (127.0.0.1, 10.0.0.0/8, ::1); '*' is not "
                    "accepted: every client could then choose the address its limits are counted by"
                ) from None
        return proxies

    @field_validator("client_key_hashes", "admin_key_hashes", "trusted_key_hashes")
    @classmethod
    def _key_hashes_are_sha256_hex(cls, hashes: list[str]) -> list[str]:
        for digest in hashes:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise ValueError(
                    f"'{digest[:80]}' is not the sha256 hex of a key (64 hex digits); "
                    "tuneloop keys new prints a key and its hash"
                )
        return [digest.lower() for digest in hashes]


PiiType = Literal["email", "url", "iban", "card", "cn_id", "ip", "phone"]
DEFAULT_PHONE_REGIONS = ("CN", "US", "GB")


class PrivacyConfig(StrictModel):
    """Personal data in texts: which kinds are replaced by placeholders ([EMAIL], [PHONE], ...) before anything
    is written (prepared training data, the prediction log, chat turns, feedback comments)."""

    mask: list[PiiType] = Field(
        default_factory=lambda: list(get_args(PiiType)),
        description="Kinds to mask: email, url (one carrying a token or password), iban, card (Luhn-checked), "
        "cn_id (Chinese resident ID, checksum), ip, phone; [] masks nothing.",
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        description="Users' texts (predictions with their feedback, chat turns, rescued rows) older than this are "
        "removed by tuneloop privacy purge and by a running server once a day; null: kept until purged by hand.",
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PHONE_REGIONS),
        description="Countries (ISO 3166 codes) whose national phone numbers, written without +, are recognised; "
        "numbers with + are recognised for every country.",
    )

    @field_validator("phone_regions")
    @classmethod
    def _regions_are_known(cls, regions: list[str]) -> list[str]:
        import phonenumbers

        unknown = [r for r in regions if r.upper() not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown region code(s) {', '.join(unknown)}; use ISO 3166 codes such as CN, US, GB")
        return [r.upper() for r in regions]


class FeedbackConfig(StrictModel):
    """How user corrections become training and gate data."""

    holdout: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="Share of feedback examples kept out of retraining for the gate; chosen by a keyed hash of "
        "the text (the key is the home's holdout.secret), so an example stays on the same side across retrains "
        "and no sender can tell which side its texts fall on.",
    )
    include_confirmed: bool = Field(
        True, description="Also use predictions users rated up without correcting (their label was right)."
    )
    repeat: int = Field(1, ge=1, description="Times each feedback example appears in the retraining set.")
    use: Literal["reviewed", "all"] = Field(
        "reviewed",
        description="reviewed: only feedback an admin approved, or sent with a trusted key, trains (the rest waits "
        "in the review queue); all: every feedback not rejected trains (only for a server whose every client is "
        "trusted).",
    )
    agreement: int | None = Field(
        None,
        ge=2,
        description="Also train on an unreviewed correction once this many distinct API keys gave the same text the "
        "same label (feedback without a key never counts: anyone can send it); null: review or trust only.",
    )


# The label a person gives a message that none of a model's labels covers ("out of scope" on the chat and admin
# pages): it trains like any label, and an assistant turns away what its intent model files under it.
OUT_OF_SCOPE = "out_of_scope"


class GateConfig(StrictModel):
    """When a retrained candidate may replace production. Metrics are fractions: 0.01 is one point."""

    macro_f1_tolerance: float = Field(0.005, ge=0, description="Candidate macro-F1 may be at most this much lower.")
    alpha: float = Field(0.05, gt=0, lt=1, description="McNemar significance level for 'candidate is worse'.")
    max_class_drop: float = Field(0.10, ge=0, le=1, description="Most F1 any single class may lose.")
    min_class_support: int = Field(
        10, ge=1, description="Classes with fewer gate examples are reported but not held to max_class_drop."
    )
    max_catch_drop: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Most of its out-of-scope catch rate the candidate may lose, both versions turning away the "
        "same share of in-scope test messages (in_scope_rejected).",
    )
    in_scope_rejected: float = Field(
        0.05, gt=0, lt=1, description="Where catch rates are compared: each version's threshold turns this away."
    )
    out_of_scope_label: str = Field(
        OUT_OF_SCOPE, description="The label that marks out-of-scope messages (an assistant's scope.label)."
    )


class Recipe(StrictModel):
    """What every recipe has: the registry name of what it makes, and where versions live."""

    name: str = Field("classifier", pattern=MODEL_NAME_PATTERN, description="Registry model name.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    # Every recipe reads users' texts (labelled data, a pretraining corpus, reply pairs): masked as they are read.
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    def stored(self) -> dict[str, Any]:
        """The recipe as a version stores it: without the registry section, which says where this machine
        keeps things (and may hold a database password), not how the model was made."""
        return self.model_dump(mode="json", exclude={"registry"})


class ClassifierRecipe(Recipe):
    """Fine-tune a text classifier (`tuneloop train`), evaluate it, retrain it from feedback."""

    data: DataConfig = Field(default_factory=DataConfig)
    tasks: dict[str, DataConfig] = Field(
        default_factory=dict,
        description="Multi-task: two or more labelled sets by task name, each a data section "
        "(tasks.intent.path=..., tasks.sentiment.path=...), trained jointly as heads on one encoder. The first "
        "task is the model's own: the one served, evaluated by the gate and named in the registry. Leave "
        "data.path unset.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)

    @model_validator(mode="after")
    def _split_sizes_leave_training_data(self) -> ClassifierRecipe:
        if self.data.val_size + self.data.test_size >= 0.8:
            raise ValueError("data.val_size + data.test_size must leave at least 20% for training")
        for task, data in self.tasks.items():
            if not TASK_NAME.fullmatch(task):
                raise ValueError(f"task name '{task}' must be letters, digits, _ or - (it names files and metrics)")
            if data.val_size + data.test_size >= 0.8:
                raise ValueError(f"tasks.{task}: val_size + test_size must leave at least 20% for training")
            if data.kfold:
                raise ValueError(f"tasks.{task}.kfold: cross-validation is for single-task runs")
        if len(self.tasks) == 1:
            raise ValueError("tasks needs two or more labelled sets (one set goes in data)")
        if self.tasks and self.data.path is not None:
            raise ValueError("set data.path or tasks, not both: with tasks, the first task is the model's own data")
        if self.tasks and self.data.kfold:
            raise ValueError("data.kfold: cross-validation is for single-task runs, and this config has tasks")
        if self.model.truncation == "windows" and self.train.dp is not None:
            raise ValueError(
                "model.truncation=windows with train.dp: a long text would be several training examples, and the "
                "privacy guarantee is per example; use head or head_tail (auto picks head under train.dp)"
            )
        if self.train.baseline == "only" and (self.tasks or self.data.kfold or self.train.teachers):
            raise ValueError(
                "train.baseline=only fits the baseline alone: not with tasks, data.kfold or train.teachers, which "
                "are for the transformer; use train.baseline=auto"
            )
        return self


class PretrainRecipe(Recipe):
    """Masked-language-model pretraining of an encoder (`tuneloop pretrain`)."""

    name: str = Field("encoder", pattern=MODEL_NAME_PATTERN, description="Registry model name.")
    model: EncoderConfig = Field(default_factory=EncoderConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)


class SftRecipe(Recipe):
    """Supervised fine-tuning of a small causal LM (`tuneloop sft`)."""

    name: str = Field("replies", pattern=MODEL_NAME_PATTERN, description="Registry model name.")
    sft: SftConfig = Field(default_factory=SftConfig)


class RegistrySettings(StrictModel):
    """Commands that only look versions up or change their stage (models, predict, rollback, generate)."""

    registry: RegistryConfig = Field(default_factory=RegistryConfig)


class PredictSettings(RegistrySettings):
    """`tuneloop predict`: where versions live, and what personal data --output files mask."""

    privacy: PrivacyConfig | None = Field(
        None,
        description="What is masked in the text column of --output files (privacy.mask=[] keeps the texts as given); "
        "null: what the version's training data was masked for.",
    )


class GateSettings(RegistrySettings):
    """`tuneloop gate`: when a candidate may replace production."""

    gate: GateConfig = Field(default_factory=GateConfig)


class ServerSettings(BaseSettings):
    """`tuneloop serve`: from YAML and dotted overrides, then TUNELOOP_* environment variables
    (TUNELOOP_SERVE__PORT=9000 sets serve.port), then the defaults."""

    model_config = SettingsConfigDict(
        env_prefix="TUNELOOP_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    serve: ServeConfig = Field(default_factory=ServeConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    gate: GateConfig = Field(default_factory=GateConfig, description="The rules of gate jobs started from /admin.")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    client_keys: SecretStr | None = Field(
        None, description="Plain client API keys, comma-separated (env TUNELOOP_CLIENT_KEYS); hashed at start."
    )
    admin_keys: SecretStr | None = Field(
        None, description="Plain admin API keys, comma-separated (env TUNELOOP_ADMIN_KEYS); hashed at start."
    )


# Sections older versions stored with every recipe although the run never used them (one config for every
# command, before the roots above): a stored recipe loses them when it is read back for retraining.
LEGACY_SECTIONS = ("registry", "serve", "gate", "sft", "pretrain")


def _set_dotted(tree: dict[str, Any], dotted: str, value: object) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TuneloopError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def _closest_key(typo: str, known: list[str]) -> str | None:
    # A known key the typo starts with ("train.lr_rate" → "train.lr") beats spelling similarity, which
    # would rather offer "train.lora_rank".
    prefixes = [k for k in known if typo.startswith(k) and typo != k and k.count(".") == typo.count(".")]
    if prefixes:
        return max(prefixes, key=len)
    guess = difflib.get_close_matches(typo, known, n=1)
    return guess[0] if guess else None


def explain_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    """One line naming every bad key (with a did-you-mean for typos) and what is wrong with it."""
    problems = []
    known = _known_keys(model)
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            guess = _closest_key(key, known)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            problems.append(f"unknown key '{key}'{hint}")
        else:
            problems.append(f"'{key}': {item['msg']}")
    return "invalid config: " + "; ".join(problems)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=3e-5", "name=support"] into a nested dict, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TuneloopError(f"override '{pair}' must look like key=value, e.g. train.lr=3e-5")
        key, raw = pair.split("=", 1)
        if not key.strip():
            raise TuneloopError(f"override '{pair}' has no key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _top_key(pair: str) -> str:
    return pair.split("=", 1)[0].split(".", 1)[0].strip()


def split_overrides(pairs: list[str], sections: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the pairs whose top-level key is one of `sections`, the others): a command that feeds two roots
    (the demo trains recipes and may serve) gives each its own."""
    wanted = set(sections)
    return [p for p in pairs if _top_key(p) in wanted], [p for p in pairs if _top_key(p) not in wanted]


def is_override(token: str, root: type[BaseModel]) -> bool:
    """Whether a command-line word is a dotted override of `root` (`registry.home=x`) rather than free text
    that happens to hold '=' (a message to classify)."""
    return "=" in token and _top_key(token) in root.model_fields and " " not in token.split("=", 1)[0]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file, bad YAML or a list is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise TuneloopError(f"{what} not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TuneloopError(f"{what} {path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise TuneloopError(f"{what} {path} must hold a mapping of sections, not {type(loaded).__name__}")
    return loaded or {}


Root = TypeVar("Root", bound=BaseModel)


def validated(root: type[Root], tree: dict[str, Any], where: str = "") -> Root:
    """`tree` as a `root`; a validation error becomes one line naming every bad key."""
    try:
        return root.model_validate(tree)
    except ValidationError as exc:
        raise TuneloopError(f"{where}{explain_validation_error(exc, root)}") from exc


def _holds_paths(annotation: object) -> bool:
    return annotation is Path or any(_holds_paths(arg) for arg in get_args(annotation))


def _section_of(annotation: object) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def anchor_paths(tree: dict[str, Any], root: type[BaseModel], folder: Path) -> dict[str, Any]:
    """`tree` with the relative paths of `root`'s path fields taken from `folder` (the YAML file's), so a
    config and its data travel together whatever directory the command runs in."""
    anchored = dict(tree)
    for key, value in tree.items():
        field = root.model_fields.get(key)
        if field is None or value is None:
            continue
        section = _section_of(field.annotation)
        if section is not None and isinstance(value, dict):
            is_mapping_of_sections = get_origin(field.annotation) is dict
            anchored[key] = (
                {
                    name: anchor_paths(item, section, folder) if isinstance(item, dict) else item
                    for name, item in value.items()
                }
                if is_mapping_of_sections
                else anchor_paths(value, section, folder)
            )
        elif _holds_paths(field.annotation):
            anchored[key] = (
                [_anchored(item, folder) for item in value] if isinstance(value, list) else _anchored(value, folder)
            )
    return anchored


def _anchored(value: object, folder: Path) -> object:
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(folder / value)
    return value


@overload
def load_config(
    path: Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> ClassifierRecipe: ...


@overload
def load_config(
    path: Path | None, overrides: list[str] | None, root: type[Root], base: dict[str, Any] | None = None
) -> Root: ...


@overload
def load_config(
    path: Path | None = None,
    overrides: list[str] | None = None,
    *,
    root: type[Root],
    base: dict[str, Any] | None = None,
) -> Root: ...


def load_config(
    path: Path | None = None,
    overrides: list[str] | None = None,
    root: type[BaseModel] = ClassifierRecipe,
    base: dict[str, Any] | None = None,
) -> BaseModel:
    """Load a YAML config (optional), apply dotted overrides, validate as `root`; errors name the key.

    Relative paths in the file are taken from the file's folder; in overrides, from the working directory.
    `base` is a config tree the file and overrides are laid over (retraining starts from the recipe
    stored with the production version).
    """
    tree = anchor_paths(read_yaml_mapping(path), root, Path(path).resolve().parent) if path is not None else {}
    return validated(root, _merge(_merge(base or {}, tree), parse_overrides(overrides or [])))


def stored_recipe(stored: dict[str, Any]) -> dict[str, Any]:
    """A recipe tree as a version stored it, without the sections older versions stored but never used."""
    return {key: value for key, value in stored.items() if key not in LEGACY_SECTIONS}


def dump_config(recipe: Recipe) -> str:
    """The resolved recipe as YAML (without the registry section), written into every run and version."""
    return yaml.safe_dump(recipe.stored(), sort_keys=False, allow_unicode=True)
