"""A text classifier: a pretrained encoder, pooled, then a linear or cosine head."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tuneloop.errors import TuneloopError
from tuneloop.models.onnx_encoder import OnnxEncoder
from tuneloop.profiling import stage

if TYPE_CHECKING:
    from peft import PeftModel

# An encoder PyTorch runs: a Hugging Face model, or LoRA adapters over one (peft's wrapper, while they train or when
# loaded unmerged). A classifier assembled to serve may run its encoder on ONNX Runtime instead (OnnxEncoder).
TorchEncoder: TypeAlias = "PreTrainedModel | PeftModel"

HEAD_FILE = "head.safetensors"
META_FILE = "classifier.json"
ADAPTER_CONFIG = "adapter_config.json"  # peft's: present when the version stores LoRA adapters, not weights
TASKS_FILE = "tasks.json"  # multi-task: the other tasks' head specs, each head in head-<task>.safetensors
BASELINE_FOLDER = "baseline"  # the TF-IDF baseline a version serves beside or instead of its encoder (baseline.py)
BLEND_FILE = "blend.json"  # present when it does: the transformer's share of the served probability


@dataclass
class HeadSpec:
    """Everything besides the encoder weights that a saved classifier needs to predict."""

    labels: list[str]
    pooling: str = "mean"
    head: str = "cosine"
    dropout: float = 0.1
    cosine_scale: float = 20.0
    max_length: int = 128
    # How a text longer than max_length is read: its first tokens ("head"), its first and last ("head_tail", see
    # kept_tokens), or all of it in overlapping windows whose logits are averaged ("windows", see text_windows).
    truncation: str = "head"
    max_windows: int = 8  # truncation=windows: the most windows one text is read in
    text_prefix: str = ""
    base_model: str = ""
    task: str = ""  # the task's name in a multi-task model; empty in a single-task one
    # Logits are divided by this (temperature scaling, fitted on the validation split after training) so that
    # probabilities are calibrated; 1 while training and in versions made before calibration existed.
    temperature: float = 1.0

    @staticmethod
    def exists(folder: Path) -> bool:
        """Whether `folder` holds a saved tuneloop classifier."""
        return (folder / META_FILE).is_file()

    @classmethod
    def read(cls, folder: Path) -> HeadSpec:
        """The spec saved with a classifier in `folder`."""
        if not cls.exists(folder):
            raise TuneloopError(f"{folder} is not a tuneloop classifier (no {META_FILE})")
        return cls(**json.loads((folder / META_FILE).read_text()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def write(self, folder: Path) -> None:
        (folder / META_FILE).write_text(self.to_json())


def load_encoder(path: Path) -> PreTrainedModel:
    """Load a bare encoder without its pooler, which mean/CLS pooling never uses."""
    try:
        encoder: PreTrainedModel = AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:
        encoder = AutoModel.from_pretrained(path)
    return encoder


def encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    """The encoder's stack of transformer layers (BERT's encoder.layer, DistilBERT's transformer.layer...): the
    one module list as long as the config's layer count."""
    count = getattr(encoder.config, "num_hidden_layers", None)
    stacks = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        raise TuneloopError(
            f"cannot tell which modules of this {encoder.config.model_type} encoder are its {count} layers; "
            "leave model.layers unset"
        )
    return stacks[0]


def keep_lower_layers(encoder: PreTrainedModel, count: int) -> None:
    """Drop every transformer layer above the lowest `count`. Upper layers specialise in the pretraining
    objective; a classifier fine-tuned on the lower ones loses little and trains and serves proportionally
    faster (Sajjad et al. 2023, "On the effect of dropping layers of pre-trained transformer models")."""
    layers = encoder_layers(encoder)
    if not 1 <= count <= len(layers):
        raise TuneloopError(f"model.layers={count}, and the encoder has {len(layers)} layers: use 1 to {len(layers)}")
    del layers[count:]
    encoder.config.num_hidden_layers = count


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def adapter_base(folder: Path) -> Path:
    """The encoder the LoRA adapters saved in `folder` apply to."""
    return Path(json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])


def load_adapted_encoder(folder: Path, merge: bool) -> TorchEncoder:
    """Base encoder + the LoRA adapters saved in `folder`; merged, it is a plain encoder again."""
    from peft import PeftModel  # only LoRA versions need peft; importing it costs a second

    base = adapter_base(folder)
    if not (base / "config.json").is_file():
        raise TuneloopError(
            f"{folder} holds LoRA adapters for the encoder at {base}, which is not there; export the "
            f"version merged (tuneloop models export --merge) to move it between machines"
        )
    adapted = PeftModel.from_pretrained(load_encoder(base), folder)
    return adapted.merge_and_unload() if merge else adapted


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, padding excluded: how the packaged sentence encoders were trained."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class CosineHead(nn.Linear):
    """One vector per class; a text's logit for a class is `scale` × the cosine of the two.

    It is a module of its own, not a formula in the classifier's forward, so that tools which follow modules
    (Opacus computing per-example gradients, exporters) see the head being called. Its weights are saved as a
    linear layer's (no bias), as they always were.
    """

    def __init__(self, hidden: int, classes: int, scale: float) -> None:
        super().__init__(hidden, classes, bias=False)
        self.scale = scale

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(pooled, dim=-1) @ F.normalize(self.weight, dim=-1).T


class TextClassifier(nn.Module):
    """Encoder + pooling + head; logits are scaled cosines when head == "cosine"."""

    def __init__(self, encoder: TorchEncoder | OnnxEncoder, spec: HeadSpec) -> None:
        super().__init__()
        self.encoder: TorchEncoder | OnnxEncoder = encoder
        self.spec = spec
        self.dropout = nn.Dropout(spec.dropout)
        hidden = encoder.config.hidden_size
        self.head = (
            CosineHead(hidden, len(spec.labels), spec.cosine_scale)
            if spec.head == "cosine"
            else nn.Linear(hidden, len(spec.labels))
        )

    @property
    def torch_encoder(self) -> TorchEncoder:
        """The encoder, for what only PyTorch does: train it, save it, export it. Only a classifier assembled to
        serve runs its encoder on ONNX Runtime, and nothing trains, saves or exports that one."""
        assert not isinstance(self.encoder, OnnxEncoder), "an encoder on ONNX Runtime cannot train or be saved"
        return self.encoder

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, attention_mask)

    def logits_from_embeddings(self, pooled: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.dropout(pooled))
        return logits if self.spec.temperature == 1.0 else logits / self.spec.temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embeddings(self.embed(input_ids, attention_mask))

    @torch.no_grad()
    def init_head_from_centroids(self, embeddings: torch.Tensor, label_ids: torch.Tensor) -> None:
        """Start each class vector at the mean normalised embedding of its examples.

        The encoder already separates intents well, so the model begins near a nearest-centroid
        classifier instead of random logits; this is most of why it gets accurate in the first epoch.
        """
        normalised = F.normalize(embeddings.float(), dim=-1)
        vectors = self.head.weight.detach().clone()
        for index in range(len(self.spec.labels)):
            members = normalised[label_ids == index]
            if len(members):
                vectors[index] = members.mean(0)
        self.set_class_vectors(vectors)

    @torch.no_grad()
    def set_class_vectors(self, vectors: torch.Tensor) -> None:
        """Point each class at a direction in embedding space (a linear head gets the cosine head's logits)."""
        self.head.weight.copy_(F.normalize(vectors.float(), dim=-1))
        if self.spec.head == "linear":
            self.head.weight.mul_(self.spec.cosine_scale)
            self.head.bias.zero_()

    def save(self, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.torch_encoder.save_pretrained(str(folder))  # peft's save_pretrained is typed for a str
        tokenizer.save_pretrained(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, folder / HEAD_FILE)
        self.spec.write(folder)

    @classmethod
    def load(cls, folder: Path, merge_adapter: bool = True) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
        """A saved classifier: full weights, or LoRA adapters over their base encoder (merged into it by
        default, so that predicting costs what a full model costs)."""
        spec = HeadSpec.read(folder)
        encoder = load_adapted_encoder(folder, merge_adapter) if is_adapter(folder) else load_encoder(folder)
        model = cls(encoder, spec)
        model.head.load_state_dict(load_file(folder / HEAD_FILE))
        model.eval()
        return model, AutoTokenizer.from_pretrained(folder)


def save_task_heads(folder: Path, heads: dict[str, TextClassifier]) -> None:
    """Next to a saved classifier: the heads of the other tasks trained on its encoder."""
    for task, head in heads.items():
        weights = {k: v.detach().cpu().contiguous() for k, v in head.head.state_dict().items()}
        save_file(weights, folder / f"head-{task}.safetensors")
    (folder / TASKS_FILE).write_text(task_specs_json(heads))


def task_specs_json(heads: dict[str, TextClassifier]) -> str:
    """The specs of a multi-task model's other heads, as saved beside it."""
    return json.dumps({task: asdict(head.spec) for task, head in heads.items()}, indent=2, ensure_ascii=False)


def load_task_heads(folder: Path, model: TextClassifier) -> dict[str, TextClassifier]:
    """The other tasks of a multi-task model, each a classifier sharing `model`'s encoder (so one encoder pass
    serves them all); empty for a single-task model."""
    if not (folder / TASKS_FILE).is_file():
        return {}
    heads = {}
    for task, spec in json.loads((folder / TASKS_FILE).read_text()).items():
        heads[task] = TextClassifier(model.encoder, HeadSpec(**spec))
        heads[task].head.load_state_dict(load_file(folder / f"head-{task}.safetensors"))
        heads[task].eval()
    return heads


def export_classifier(folder: Path, out: Path, merge: bool) -> None:
    """Copy a saved classifier; with `merge`, LoRA adapters are folded into a standalone full encoder."""
    if out.exists() and any(out.iterdir()):
        raise TuneloopError(f"{out} exists and is not empty; choose a new folder")
    if merge and is_adapter(folder):
        model, tokenizer = TextClassifier.load(folder, merge_adapter=True)
        model.save(out, tokenizer)
        heads = load_task_heads(folder, model)
        if heads:
            save_task_heads(out, heads)
        if (folder / BLEND_FILE).is_file():  # what the version serves is the blend, not the encoder alone
            shutil.copy2(folder / BLEND_FILE, out / BLEND_FILE)
            shutil.copytree(folder / BASELINE_FOLDER, out / BASELINE_FOLDER)
    else:
        shutil.copytree(folder, out, dirs_exist_ok=True)


def kept_tokens(special: Sequence[int], max_length: int, truncation: str) -> list[int]:
    """Positions of the tokens a classifier keeps from one tokenised text (`special`: its special-tokens mask):
    all of them when they fit in `max_length`; otherwise the special tokens around the text and, of the text's
    own tokens, the first ones (truncation=head) or the first quarter of the room and the last three quarters
    (head_tail), since long reviews and complaints often say what they mean at the end (Sun et al. 2019, "How
    to fine-tune BERT for text classification": head + tail beat either alone on long reviews)."""
    if len(special) <= max_length:
        return list(range(len(special)))
    content = [i for i, flag in enumerate(special) if not flag]
    if not content:
        return list(range(max_length))
    room = max(max_length - (len(special) - len(content)), 1)
    # Windows: what one window shows (explanations under truncation=windows cover a text's first window).
    head = room if truncation in ("head", "windows") else room // 4
    chosen = set(content[:head] + content[len(content) - (room - head) :])
    return [i for i, flag in enumerate(special) if flag or i in chosen]


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], spec: HeadSpec) -> list[list[int]]:
    """Token ids of each text as the classifier sees it (prefix added, truncated), unpadded. Training,
    evaluation, serving and batch prediction all cut long texts here, the same way (spec.truncation)."""
    prefixed = [spec.text_prefix + t for t in texts]
    if spec.truncation == "head":
        ids: list[list[int]] = tokenizer(prefixed, truncation=True, max_length=spec.max_length)["input_ids"]
        return ids
    encoded = tokenizer(prefixed, return_special_tokens_mask=True, verbose=False)
    return [
        [ids[i] for i in kept_tokens(special, spec.max_length, spec.truncation)]
        for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True)
    ]


def window_starts(length: int, room: int, max_windows: int) -> list[int]:
    """Where each window of `room` tokens starts in a text of `length` tokens: every three quarters of a window
    (a quarter overlaps the next, so a phrase cut by one window's edge is whole in its neighbour), the last one
    flush with the end; at most `max_windows`, spread evenly over the text when it would take more."""
    if length <= room:
        return [0]
    starts = [*range(0, length - room, max(room - room // 4, 1)), length - room]
    if len(starts) > max_windows:
        starts = sorted({int(s) for s in np.linspace(0, length - room, max_windows).round()})
    return starts


def text_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], spec: HeadSpec
) -> tuple[list[list[int]], np.ndarray]:
    """The token ids the classifier reads, and the text each row belongs to. Every truncation but "windows" gives
    one row per text (tokenize); "windows" reads a text longer than max_length in several rows, each with the
    text's special tokens and its prefix ("query: " for e5) around a window of its own tokens, so that a text
    that fits is read exactly as under head truncation. Training, evaluation and serving all read texts here."""
    if spec.truncation != "windows":
        ids = tokenize(tokenizer, texts, spec)
        return ids, np.arange(len(ids))
    encoded = tokenizer(
        [spec.text_prefix + t for t in texts],
        return_special_tokens_mask=True,
        return_offsets_mapping=tokenizer.is_fast,
        verbose=False,
    )
    rows: list[list[int]] = []
    owners: list[int] = []
    for index, (ids, special) in enumerate(zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True)):
        content = [i for i, flag in enumerate(special) if not flag]
        offsets = encoded["offset_mapping"][index] if tokenizer.is_fast else [(len(spec.text_prefix),) * 2] * len(ids)
        prefix = [i for i in content if offsets[i][0] < len(spec.text_prefix)]
        own = content[len(prefix) :]
        lead = [i for i, flag in enumerate(special) if flag and (not own or i < own[0])]
        trail = [i for i, flag in enumerate(special) if flag and own and i > own[-1]]
        room = max(spec.max_length - len(lead) - len(prefix) - len(trail), 1)
        for start in window_starts(len(own), room, spec.max_windows):
            rows.append([ids[i] for i in (*lead, *prefix, *own[start : start + room], *trail)])
            owners.append(index)
    return rows, np.array(owners, dtype=int)


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of equal-length rows, padded on the right as BERT-style encoders expect."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def length_groups(lengths: Sequence[int], batch_size: int, max_padding: float | None = None) -> list[np.ndarray]:
    """Indices of texts to run together: ordered by length, at most `batch_size` per group and, with
    `max_padding`, cut before padding would add more than that share to the group's real tokens.

    Padding is compute thrown away: a short request batched with a long one costs as much as two long
    ones. On ONNX Runtime a forward pass has so little fixed cost that a few tightly packed passes beat
    one padded one (measured ~25% less time per text on Banking77 micro-batches of 8).
    """
    order = np.argsort(lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    real = 0
    for end, index in enumerate(order):
        size = end - start + 1
        real += lengths[index]
        too_padded = max_padding is not None and size > 1 and lengths[index] * size > (1 + max_padding) * real
        if size > batch_size or too_padded:
            groups.append(order[start:end])
            start, real = end, lengths[index]
    groups.append(order[start:])
    return [g for g in groups if len(g)]


@torch.inference_mode()
def predict_logits(
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 64,
    heads: Sequence[TextClassifier] = (),
    max_padding: float | None = None,
) -> np.ndarray:
    """Logits for each text, batched by length so padding stays small (cosine head: scale × cosine).

    `heads` are other tasks' classifiers on the same encoder: their logits follow the model's in each row,
    from the same encoder pass. `max_padding` cuts batches where padding would exceed that share of the
    real tokens (see `length_groups`).
    """
    model.eval()
    device = model.head.weight.device  # a model still on the GPU it trained on (validation); else the CPU
    with stage("tokenise"):
        encoded, owners = text_windows(tokenizer, texts, model.spec)
    rows = np.zeros((len(encoded), len(model.spec.labels) + sum(len(h.spec.labels) for h in heads)), dtype=np.float32)
    for chosen in length_groups([len(ids) for ids in encoded], batch_size, max_padding):
        with stage("data"):
            input_ids, attention_mask = pad_right([encoded[i] for i in chosen], tokenizer.pad_token_id or 0)
        with stage("forward"):
            pooled = model.embed(input_ids.to(device), attention_mask.to(device))
            logits = [classifier.logits_from_embeddings(pooled) for classifier in (model, *heads)]
            rows[chosen] = torch.cat(logits, dim=-1).float().cpu().numpy()
    if len(encoded) == len(texts):
        return rows  # one row per text: nothing to pool
    # A text read in windows says what its windows say on average (mean pooling of their logits).
    out = np.zeros((len(texts), rows.shape[1]), dtype=np.float32)
    np.add.at(out, owners, rows)
    return out / np.bincount(owners, minlength=len(texts))[:, None].astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return probabilities


def predict_proba(
    model: TextClassifier, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 64
) -> np.ndarray:
    """Class probabilities for each text."""
    return softmax(predict_logits(model, tokenizer, texts, batch_size))
