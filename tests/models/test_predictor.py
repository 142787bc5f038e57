"""The one loaded-model path: load_model by reference, by version folder or by exported folder, with
scikit-learn's predict / predict_proba / classes_."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import server_settings
from tuneloop.errors import NotFound, TuneloopError
from tuneloop.models.classifier import export_classifier
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry

TEXTS = ["refund money back please", "<b>where</b> is my parcel", "my login password is locked"]


@pytest.fixture()
def registry(served):
    settings, _ = served
    return Registry(settings.registry)


def test_predict_and_predict_proba_agree_with_classes_in_scikit_learns_shape(registry):
    model = load_model("toy", registry)
    assert (model.name, model.version, model.ref, model.record.stage) == ("toy", 1, "toy@1", "production")
    probs = model.predict_proba(TEXTS)
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert list(model.classes_) == model.labels == sorted(model.labels)
    assert model.predict(TEXTS) == list(model.classes_[probs.argmax(1)])
    # Raw texts are cleaned as training data was: the HTML tags of the second text change nothing.
    assert np.allclose(model.predict_proba(["where is my parcel"])[0], probs[1], atol=1e-6)
    [ranked] = model.rank(["refund money back please"], top_k=2)
    assert ranked.label == model.predict(["refund money back please"])[0] and len(ranked.top_k) == 2


def test_a_version_folder_and_an_exported_folder_load_the_same_model(registry, tmp_path):
    from_registry = load_model("toy@1", registry)
    folder = registry.folder(registry.get("toy@1"))
    export_classifier(folder.model, tmp_path / "exported", merge=False)
    for source in (folder.root, tmp_path / "exported", str(tmp_path / "exported")):
        loaded = load_model(source)
        assert loaded.version is None and loaded.record is None
        np.testing.assert_allclose(loaded.predict_proba(TEXTS), from_registry.predict_proba(TEXTS), atol=1e-6)


def test_a_folder_named_like_a_model_does_not_shadow_it(registry, tmp_path, monkeypatch):
    (tmp_path / "toy").mkdir()  # e.g. the project's own folder
    monkeypatch.chdir(tmp_path)
    assert load_model("toy", registry).ref == "toy@1"


def test_a_reference_is_looked_up_in_the_given_registry_only(registry, tmp_path):
    elsewhere = Registry(server_settings(tmp_path / "other-home").registry)
    with pytest.raises(NotFound, match="no model named 'toy'"):
        load_model("toy", elsewhere)
    with pytest.raises(TuneloopError, match="unknown runtime 'tpu'"):
        load_model("toy", registry, runtime="tpu")


def test_the_onnx_export_of_lora_adapters_is_keyed_by_their_base_encoders_weights_too(tmp_path):
    """Review (minor finding): the ONNX cache was keyed by the version's own files, which for a LoRA version are
    the adapters alone; new base weights under the same path reused an export holding the old ones merged."""
    import json

    from tuneloop.models.predictor import onnx_cache

    base, version = tmp_path / "base", tmp_path / "v1"
    base.mkdir()
    version.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    (version / "adapter_model.safetensors").write_bytes(b"adapters")
    (version / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    before = onnx_cache(tmp_path, version)
    assert onnx_cache(tmp_path, version) == before  # the same files: the same export
    (base / "model.safetensors").write_bytes(b"other base weights")
    assert onnx_cache(tmp_path, version) != before
