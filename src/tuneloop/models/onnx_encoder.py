"""A classifier's encoder under ONNX Runtime: how versions serve by default (serving.runtime).

The encoder is exported once per version with torch's dynamo exporter (hidden states match PyTorch's to
~1e-6, so predictions are the same) into the version's folder; ONNX Runtime's fused CPU kernels then run it
with less per-call overhead than eager PyTorch, which matters most for the small batches a server sees. An
int8 copy (weights quantized per output channel) runs 1.5-2x as fast again; whether a version may
serve it is measured at the end of training (tuneloop.evaluate.serving).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from tuneloop.atomic import atomic_file, write_dir_atomically

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)
ONNX_FILE = "encoder.onnx"
INT8_FILE = "encoder-int8.onnx"


class _HiddenStates(nn.Module):
    """The encoder as a function of (input_ids, attention_mask) → last hidden state, for the exporter."""

    def __init__(self, encoder: PreTrainedModel | PeftModel) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden


def export_encoder(encoder: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write the encoder as ONNX into `folder` (atomically: a crash never leaves half a model)."""
    example = tokenizer(
        ["a short example", "a longer example, so that the batch has padding in it"], padding=True, return_tensors="pt"
    )
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("sequence", min=2)}

    def write(target: Path) -> None:
        target.mkdir(parents=True)
        # The exporter warns that torchvision's operators are missing (a vision model's, not ours) and would
        # print its progress into the server's log; the log line above says what is happening.
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration.level
        registration.setLevel(logging.ERROR)
        try:
            # It also warns, for every export, that two dynamic axes share constraints (batch and sequence
            # of the two inputs are the same axes, as they should be).
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
                torch.onnx.export(
                    _HiddenStates(encoder).eval(),
                    (example["input_ids"], example["attention_mask"]),
                    target / ONNX_FILE,
                    input_names=["input_ids", "attention_mask"],
                    output_names=["last_hidden_state"],
                    dynamic_shapes=(dims, dims),
                    dynamo=True,
                    verbose=False,
                )
        finally:
            registration.setLevel(level)

    write_dir_atomically(write, folder)


def execution_providers(int8: bool, available: list[str] | None = None) -> list[str]:
    """Where ONNX Runtime runs an encoder: on a CUDA GPU when the `gpu` extra (onnxruntime-gpu) is installed and
    sees one, else on the CPU. int8 stays on the CPU: its quantized MatMuls are CPU kernels, and on a GPU fp32
    is the faster of the two anyway."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    if not int8 and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEncoder(nn.Module):
    """Stands in for the PyTorch encoder inside a TextClassifier: same call, same output field."""

    def __init__(self, path: Path, config: PreTrainedConfig, threads: int, providers: list[str] | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle worker threads would otherwise spin waiting for work, taking the cores the event loop needs
        # between batches (measured: 2 spinning threads ran 1.8x slower per text while anything else ran).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = providers or execution_providers(int8=path.name == INT8_FILE)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=chosen)
        self.config = config

    @property
    def provider(self) -> str:
        """The execution provider that runs it (CUDAExecutionProvider or CPUExecutionProvider)."""
        provider: str = self.session.get_providers()[0]
        return provider

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> BaseModelOutput:
        hidden = self.session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


def int8_nodes(model_path: Path) -> list[str]:
    """The MatMul nodes int8 quantizes: those multiplying by a weight. Embeddings, LayerNorms, the attention's
    products of two activations and the head (run by PyTorch) stay fp32. (Measured on Banking77: keeping any
    one kind of layer or any one layer in fp32 instead moved the agreement with fp32 by less than half a
    point; the close-call fallback of `tuneloop.evaluate.serving` is what closes the gap.)"""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(i in constants for i in n.input)]


def quantize_int8(folder: Path) -> None:
    """An int8 copy of the folder's export (dynamic quantization: int8 weights per output channel, each
    batch's activations scaled as they come)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_file(folder / INT8_FILE) as staging:
        quantize_dynamic(
            folder / ONNX_FILE,
            staging,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # 7-bit weights: without VNNI instructions the 8-bit products can saturate (ONNX Runtime's advice
            # for AVX2/AVX-512 CPUs); measured here it was also 1.15x faster, agreeing with fp32 as often.
            reduce_range=True,
            nodes_to_quantize=int8_nodes(folder / ONNX_FILE),
        )


def onnx_encoder(
    encoder: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    cache: Path,
    threads: int,
    int8: bool = False,
) -> OnnxEncoder:
    """The encoder under ONNX Runtime, exported into `cache` the first time (and quantized, with int8)."""
    if not (cache / ONNX_FILE).is_file():
        log.info("exporting the encoder to ONNX in %s (once per version)", cache)
        export_encoder(encoder, tokenizer, cache)
    if int8 and not (cache / INT8_FILE).is_file():
        quantize_int8(cache)
    return OnnxEncoder(cache / (INT8_FILE if int8 else ONNX_FILE), encoder.config, threads)
