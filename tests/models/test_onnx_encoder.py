"""serve.runtime=onnx: the encoder under ONNX Runtime gives the same logits as PyTorch."""

from __future__ import annotations

import shutil

import numpy as np

from tuneloop.models.classifier import predict_logits
from tuneloop.models.onnx_encoder import ONNX_FILE, OnnxEncoder
from tuneloop.registry.store import Registry
from tuneloop.serve.models import load_version


def test_onnx_runtime_predicts_what_torch_predicts_and_exports_once(production_home, tiny_encoder, tmp_path):
    from conftest import tiny_config

    shutil.copytree(production_home, tmp_path / "copy")
    config = tiny_config(tiny_encoder, tmp_path / "copy" / "toy.csv", tmp_path / "copy" / "home")
    registry = Registry(config.registry)
    version = registry.get("toy@production")
    texts = ["refund money back please", "where is my parcel", "reset", "my login password is locked again today"]
    torch_loaded = load_version(registry, version)
    onnx_loaded = load_version(registry, version, runtime="onnx", threads=1)
    assert isinstance(onnx_loaded.model.encoder, OnnxEncoder)
    np.testing.assert_allclose(predict_logits(onnx_loaded.model, onnx_loaded.tokenizer, texts),
                               predict_logits(torch_loaded.model, torch_loaded.tokenizer, texts), atol=1e-4)
    [exported] = (registry.home / "cache" / "onnx").glob(f"*/{ONNX_FILE}")
    stamp = exported.stat().st_mtime_ns
    load_version(registry, version, runtime="onnx", threads=1)
    assert exported.stat().st_mtime_ns == stamp  # the second load reuses the export
