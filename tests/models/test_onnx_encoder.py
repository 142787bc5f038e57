"""serve.runtime=onnx: the encoder under ONNX Runtime gives the same logits as PyTorch (onnx-int8: close)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import tiny_config
from tuneloop.models.classifier import predict_logits
from tuneloop.models.onnx_encoder import INT8_FILE, ONNX_FILE, OnnxEncoder
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry

TEXTS = ["refund money back please", "where is my parcel", "reset", "my login password is locked again today"]


@pytest.fixture()
def toy_version(production_home, tiny_encoder, tmp_path):
    shutil.copytree(production_home, tmp_path / "copy")
    registry = Registry(tiny_config(tiny_encoder, tmp_path / "copy" / "toy.csv", tmp_path / "copy" / "home").registry)
    version = registry.get("toy@production")
    exact = load_model(version, registry)
    return registry, version, predict_logits(exact.model, exact.tokenizer, TEXTS)


def test_onnx_runtime_predicts_what_torch_predicts_and_exports_once(toy_version):
    registry, version, exact = toy_version
    loaded = load_model(version, registry, runtime="onnx", threads=1)
    assert isinstance(loaded.model.encoder, OnnxEncoder)
    np.testing.assert_allclose(predict_logits(loaded.model, loaded.tokenizer, TEXTS), exact, atol=1e-4)
    [exported] = (registry.home / "cache" / "onnx").glob(f"*/{ONNX_FILE}")
    stamp = exported.stat().st_mtime_ns
    load_model(version, registry, runtime="onnx", threads=1)
    assert exported.stat().st_mtime_ns == stamp  # the second load reuses the export


def test_int8_runtime_runs_a_quantized_copy_with_close_logits(toy_version):
    registry, version, exact = toy_version
    loaded = load_model(version, registry, runtime="onnx-int8", threads=1)
    assert list((registry.home / "cache" / "onnx").glob(f"*/{INT8_FILE}"))
    logits = predict_logits(loaded.model, loaded.tokenizer, TEXTS)
    assert not np.array_equal(logits, exact)  # it really runs the int8 copy...
    np.testing.assert_allclose(logits, exact, atol=0.5)  # ...which stays close to the exact model


def test_an_export_is_never_reused_for_other_weights(toy_version, tmp_path):
    """Regression: exports were cached by NAME-vN only, so a registry rebuilt (or another one sharing the
    home) whose toy@1 has other weights ran the old export: other predictions, silently."""
    import torch
    from safetensors.torch import load_file, save_file

    registry, version, exact = toy_version
    load_model(version, registry, runtime="onnx", threads=1)
    weights = next(registry.folder(version).model.rglob("model.safetensors"))
    changed = {
        k: (v + 0.05 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in load_file(weights).items()
    }
    save_file(changed, weights)
    now = load_model(version, registry, threads=1)  # torch, from the changed weights
    onnx = load_model(version, registry, runtime="onnx", threads=1)
    expected = predict_logits(now.model, now.tokenizer, TEXTS)
    assert not np.allclose(expected, exact, atol=1e-3)  # the change is visible...
    np.testing.assert_allclose(predict_logits(onnx.model, onnx.tokenizer, TEXTS), expected, atol=1e-4)  # ...to ONNX
    assert len(list((registry.home / "cache" / "onnx").glob(f"*/{ONNX_FILE}"))) == 2
