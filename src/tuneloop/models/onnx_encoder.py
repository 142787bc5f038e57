"""Run a classifier's encoder with ONNX Runtime when serving (serve.runtime=onnx).

The encoder is exported once per registered version with torch's dynamo exporter (hidden states match
PyTorch's to ~1e-6, so predictions are the same) and cached in the home; ONNX Runtime's fused CPU
kernels then run it with less per-call overhead than eager PyTorch, which matters most for the small
batches a server sees.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from tuneloop.atomic import atomic_file, write_dir_atomically
from tuneloop.errors import TuneloopError

log = logging.getLogger(__name__)
ONNX_FILE = "encoder.onnx"
INT8_FILE = "encoder-int8.onnx"


class _HiddenStates(nn.Module):
    """The encoder as a function of (input_ids, attention_mask) → last hidden state, for the exporter."""

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_encoder(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
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
            with torch.no_grad():
                torch.onnx.export(
                    _HiddenStates(encoder.eval()),
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


class OnnxEncoder(nn.Module):
    """Stands in for the PyTorch encoder inside a TextClassifier: same call, same output field."""

    def __init__(self, path: Path, config, threads: int) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError as exc:
            raise TuneloopError("serve.runtime=onnx needs ONNX Runtime: pip install 'tuneloop[onnx]'") from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle worker threads would otherwise spin waiting for work, taking the cores the event loop needs
        # between batches (measured: 2 spinning threads ran 1.8x slower per text while anything else ran).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> BaseModelOutput:
        hidden = self.session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


def quantize_int8(folder: Path) -> None:
    """Int8 weights for the linear layers (dynamic quantization): about 1.3x faster on AVX2, and the labels
    can change where two classes are nearly tied."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_file(folder / INT8_FILE) as staging:
        quantize_dynamic(folder / ONNX_FILE, staging, weight_type=QuantType.QInt8)


def onnx_encoder(
    encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: Path, threads: int, int8: bool = False
) -> OnnxEncoder:
    """The encoder under ONNX Runtime, exported into `cache` the first time (and quantized, with int8)."""
    if not (cache / ONNX_FILE).is_file():
        log.info("exporting the encoder to ONNX in %s (once per version)", cache)
        export_encoder(encoder, tokenizer, cache)
    if int8 and not (cache / INT8_FILE).is_file():
        quantize_int8(cache)
    return OnnxEncoder(cache / (INT8_FILE if int8 else ONNX_FILE), encoder.config, threads)
