"""Layer-wise learning-rate decay: each encoder layer learns at train.layer_lr_decay times the rate of the one
above it."""

from __future__ import annotations

import pytest

from tuneloop.config import load_config
from tuneloop.models.classifier import encoder_layers
from tuneloop.models.encoders import EncoderSource
from tuneloop.training.classification import adamw, build_classifier


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_each_layer_learns_at_the_decayed_rate_and_every_parameter_once(tiny_overrides, tiny_encoder, decay):
    recipe = load_config(None, [*tiny_overrides, f"train.layer_lr_decay={decay}", "train.lr=1e-3"])
    model, _ = build_classifier(recipe, EncoderSource("tiny", tiny_encoder), ["a", "b"])
    optimizer = adamw(model, recipe, [])
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(held) == sorted({id(p) for p in model.parameters() if p.requires_grad})  # each exactly once
    top, bottom = encoder_layers(model.torch_encoder)[-1], encoder_layers(model.torch_encoder)[0]
    assert {rate[id(p)] for p in top.parameters()} == {1e-3}
    assert [rate[id(p)] for p in bottom.parameters()] == pytest.approx([1e-3 * decay] * len(list(bottom.parameters())))
    embeddings = model.torch_encoder.get_input_embeddings().weight
    assert rate[id(embeddings)] == pytest.approx(1e-3 * decay**2)
    assert {rate[id(p)] for p in model.head.parameters()} == {recipe.train.head_lr}
