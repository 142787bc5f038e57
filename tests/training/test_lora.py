"""LoRA fine-tuning on the tiny model: few trainable weights, a small version that stores only adapters,
the same predictions loaded merged or not, and a standalone merged export."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.config import load_config
from tuneloop.models.classifier import TextClassifier, predict_proba
from tuneloop.models.encoders import EncoderSource
from tuneloop.registry import Registry
from tuneloop.training.classification import build_classifier

runner = CliRunner()
TEXTS = ["my parcel is late", "refund my money please", "reset my password", "where is the courier"]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_trains_a_small_share_of_the_weights(tiny_overrides, tiny_encoder):
    full, _ = build_classifier(load_config(None, tiny_overrides), EncoderSource("tiny", tiny_encoder), ["a", "b"])
    lora, _ = build_classifier(
        load_config(None, [*tiny_overrides, "train.method=lora", "train.lora_rank=2"]),
        EncoderSource("tiny", tiny_encoder),
        ["a", "b"],
    )
    adapters = [n for n, p in lora.named_parameters() if p.requires_grad and "lora_" in n]
    assert adapters and all("query" in n or "value" in n for n in adapters)
    assert trainable(lora) < 0.1 * trainable(full)


def test_bad_lora_targets_are_one_clear_error(tiny_overrides):
    result = runner.invoke(app, ["train", *tiny_overrides, "train.method=lora", "train.lora_targets=[nonexistent]"])
    assert result.exit_code == 1 and "train.lora_targets ['nonexistent'] do not name layers" in result.output


def test_a_lora_version_stores_adapters_predicts_like_its_merged_export(tiny_overrides, home, tmp_path):
    result = runner.invoke(app, ["train", *tiny_overrides, "train.method=lora", "train.lr=5e-3", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    folder = home / "models" / "toy" / "v1" / "model"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    merged, tokenizer = TextClassifier.load(folder)
    unmerged, _ = TextClassifier.load(folder, merge_adapter=False)
    probs = predict_proba(merged, tokenizer, TEXTS)
    assert np.allclose(probs, predict_proba(unmerged, tokenizer, TEXTS), atol=1e-5)
    with unmerged.encoder.disable_adapter():
        without = predict_proba(unmerged, tokenizer, TEXTS)
    assert not np.allclose(probs, without, atol=1e-4)  # the adapters changed the model

    exported = runner.invoke(app, ["models", "export", "toy@1", "--out", str(tmp_path / "merged"), "--merge"])
    assert exported.exit_code == 0, exported.output
    standalone, standalone_tokenizer = TextClassifier.load(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert np.allclose(predict_proba(standalone, standalone_tokenizer, TEXTS), probs, atol=1e-5)
    adapter_bytes = sum(f.stat().st_size for f in folder.iterdir())
    merged_bytes = sum(f.stat().st_size for f in (tmp_path / "merged").iterdir())
    assert adapter_bytes < merged_bytes
    assert Registry(load_config(None, tiny_overrides).registry).get("toy@1").config["train"]["method"] == "lora"
    again = runner.invoke(app, ["models", "export", "toy@1", "--out", str(tmp_path / "merged")])
    assert again.exit_code == 1 and "exists and is not empty" in again.output
