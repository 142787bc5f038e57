"""Serving runtimes: the encoder under ONNX Runtime gives PyTorch's logits; an int8 copy serves only where the
end-of-training check accepted it, and the report scores the version with the runtime that serves it."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from helpers import tiny_config
from tuneloop.config import ServingConfig
from tuneloop.errors import TuneloopError
from tuneloop.evaluate import serving
from tuneloop.evaluate.report import evaluate_version, score_split
from tuneloop.models.classifier import predict_logits
from tuneloop.models.onnx_encoder import INT8_FILE, ONNX_FILE, OnnxEncoder, int8_nodes, onnx_encoder
from tuneloop.models.predictor import load_model, top_two_gap
from tuneloop.registry import Registry
from tuneloop.training import classification

TEXTS = ["refund money back please", "where is my parcel", "reset", "my login password is locked again today"]


@pytest.fixture()
def toy_version(production_home, tiny_encoder, tmp_path):
    shutil.copytree(production_home, tmp_path / "copy")
    registry = Registry(tiny_config(tiny_encoder, tmp_path / "copy" / "toy.csv", tmp_path / "copy" / "home").registry)
    version = registry.get("toy@production")
    exact = load_model(version, registry)
    assert exact.runtime == "torch"  # as its recipe said (serving.runtime=torch)
    return registry, version, predict_logits(exact.model, exact.tokenizer, TEXTS)


def exports(registry, version, name=ONNX_FILE):
    """Exports belong to the version: they live in its folder."""
    return list((registry.folder(version).root / "onnx").glob(f"*/{name}"))


def test_onnx_runtime_predicts_what_torch_predicts_and_exports_once(toy_version):
    registry, version, exact = toy_version
    loaded = load_model(version, registry, runtime="onnx", threads=1)
    assert isinstance(loaded.model.encoder, OnnxEncoder)
    np.testing.assert_allclose(predict_logits(loaded.model, loaded.tokenizer, TEXTS), exact, atol=1e-4)
    [exported] = exports(registry, version)
    stamp = exported.stat().st_mtime_ns
    load_model(version, registry, runtime="onnx", threads=1)
    assert exported.stat().st_mtime_ns == stamp  # the second load reuses the export


def test_int8_never_serves_a_version_whose_check_did_not_accept_it(toy_version, caplog):
    registry, version, exact = toy_version
    with caplog.at_level(logging.WARNING):
        loaded = load_model(version, registry, runtime="onnx-int8", threads=1)
    assert loaded.runtime == "onnx" and not exports(registry, version, INT8_FILE)
    np.testing.assert_allclose(predict_logits(loaded.model, loaded.tokenizer, TEXTS), exact, atol=1e-4)
    assert "serves fp32 ONNX, not int8: it was never checked" in caplog.text


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
    assert len(exports(registry, version)) == 2


@pytest.fixture()
def toy_data(production_home, tmp_path):
    shutil.copy(production_home / "toy.csv", tmp_path / "toy.csv")
    return tmp_path / "toy.csv"


def train(tiny_encoder, toy_data, tmp_path, *settings):
    config = tiny_config(tiny_encoder, toy_data, tmp_path / "home", "train.epochs=2", *settings)
    outcome = classification.run(config, show_progress=False)
    return Registry(config.registry), outcome


def test_a_version_serves_and_is_scored_with_the_int8_copy_its_check_accepted(tiny_encoder, toy_data, tmp_path):
    registry, outcome = train(
        tiny_encoder,
        toy_data,
        tmp_path,
        "serving.runtime=onnx-int8",
        "serving.int8_min_agreement=0.5",
        "serving.int8_max_accuracy_drop=0.5",
    )
    record = json.loads(registry.folder(outcome.version).serving.read_text())
    assert record["runtime"] == "onnx-int8" and record["int8"]["plan"] == "int8"
    assert outcome.report.serving == record  # the report says what it was scored with
    assert exports(registry, outcome.version, INT8_FILE)  # registered with the version

    served = load_model(outcome.version, registry)  # the default: what the version was checked with
    assert served.runtime == "onnx-int8"
    test = registry.folder(outcome.version).data() / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    predicted = served.predict([r["text"] for r in rows], cleaned=True)
    accuracy = np.mean([p == r["label"] for p, r in zip(predicted, rows, strict=True)])
    assert accuracy == pytest.approx(outcome.report.test.accuracy)  # what serves is what was evaluated
    torch_logits = predict_logits(
        *(lambda m: (m.model, m.tokenizer))(load_model(outcome.version, registry, "torch")), TEXTS
    )
    assert not np.allclose(predict_logits(served.model, served.tokenizer, TEXTS), torch_logits, atol=1e-4)


def test_a_version_served_by_int8_with_fp32_for_close_calls_is_scored_with_the_fallback(
    tiny_encoder, toy_data, tmp_path, monkeypatch
):
    """Regression: when the accepted plan was int8 with fp32 for close calls, the report scored the int8 model
    alone, not what serves. Here every text is a close call, so what serves answers as fp32 does."""
    verdicts = iter([(False, "int8 alone: rejected by the test"), (True, "accepted by the test")])
    monkeypatch.setattr(serving, "int8_verdict", lambda *args: next(verdicts))
    monkeypatch.setattr(serving, "cross_fitted_fallback", lambda fp32, int8: (1e9, 0.0, 1.0))
    registry, outcome = train(tiny_encoder, toy_data, tmp_path, "serving.runtime=onnx-int8")
    assert outcome.report.serving["int8"]["plan"] == "int8, fp32 for close calls"
    served = load_model(outcome.version, registry)
    assert served.runtime == "onnx-int8" and served.fallback is not None
    test = pd.read_json(registry.folder(outcome.version).data() / "test.jsonl", lines=True)
    eval_config = tiny_config(tiny_encoder, toy_data, tmp_path / "home").eval
    fp32 = load_model(outcome.version, registry, "onnx")
    as_served = score_split(served, test, eval_config)
    int8_alone = score_split(replace(served, fallback=None), test, eval_config)
    assert as_served.calibration.ece == pytest.approx(score_split(fp32, test, eval_config).calibration.ece)
    assert int8_alone.calibration.ece != pytest.approx(as_served.calibration.ece, abs=1e-6)  # it can fail
    for key in ("accuracy", "macro_f1", "confusion_matrix"):
        assert getattr(outcome.report.test, key) == getattr(as_served, key), key
    assert outcome.report.test.calibration.ece == pytest.approx(as_served.calibration.ece, abs=1e-9)


def test_eval_of_a_version_served_by_int8_with_fp32_for_close_calls_scores_what_serves(
    tiny_encoder, toy_data, tmp_path, monkeypatch
):
    """Regression: `tuneloop eval` scored such a version's int8 model alone (evaluate_version handed the bare
    model to the scorer). Every text is a close call here, so what serves answers as fp32 does."""
    verdicts = iter([(False, "int8 alone: rejected by the test"), (True, "accepted by the test")])
    monkeypatch.setattr(serving, "int8_verdict", lambda *args: next(verdicts))
    monkeypatch.setattr(serving, "cross_fitted_fallback", lambda fp32, int8: (1e9, 0.0, 1.0))
    registry, outcome = train(tiny_encoder, toy_data, tmp_path, "serving.runtime=onnx-int8", "eval.explanations=0")
    recipe = tiny_config(tiny_encoder, toy_data, tmp_path / "home", "eval.explanations=0")
    evaluated, _ = evaluate_version(registry, outcome.version.ref, recipe, out=tmp_path / "eval")
    # The training report scores through the predictor (what serves): eval must say the same, to the digit.
    assert evaluated.test.calibration.ece == pytest.approx(outcome.report.test.calibration.ece, abs=1e-9)
    assert evaluated.test.confusion_matrix == outcome.report.test.confusion_matrix


def test_a_rejected_int8_copy_leaves_fp32_serving_and_says_why(tiny_encoder, toy_data, tmp_path, monkeypatch):
    verdicts = []

    def reject(*args):
        verdicts.append(args)
        return False, "rejected by the test"

    monkeypatch.setattr(serving, "int8_verdict", reject)
    registry, outcome = train(tiny_encoder, toy_data, tmp_path, "serving.runtime=onnx-int8")
    record = outcome.report.serving
    assert record["runtime"] == "onnx" and record["int8_tried"][0]["plan"] == "int8"
    assert [t["plan"] for t in record["int8_tried"]][1:] in ([], ["int8, fp32 for close calls"])
    assert record["int8"] == record["int8_tried"][-1] and not record["int8"]["accepted"]
    assert len(verdicts) == len(record["int8_tried"])
    assert not exports(registry, outcome.version, INT8_FILE) and exports(registry, outcome.version)
    assert load_model(outcome.version, registry).runtime == "onnx"
    assert load_model(outcome.version, registry, "onnx-int8").runtime == "onnx"  # asked for: still refused


@pytest.mark.parametrize(
    ("agreement", "fp32", "int8", "accepted", "says"),
    [
        (0.999, 0.90, 0.899, True, "agrees with fp32 on 99.90%"),
        (0.990, 0.90, 0.900, False, "99.00% of the validation split"),
        (1.000, 0.90, 0.897, False, "0.30 points below fp32"),
        (0.995, 0.90, 0.898, True, "test accuracy 89.80% (fp32 90.00%)"),
    ],
)
def test_int8_verdict_needs_both_agreement_and_accuracy(agreement, fp32, int8, accepted, says):
    verdict, reason = serving.int8_verdict(agreement, fp32, int8, ServingConfig())
    assert verdict is accepted and says in reason


def test_int8_quantizes_every_weight_matmul_and_nothing_else(toy_version):
    registry, version, _ = toy_version
    load_model(version, registry, runtime="onnx", threads=1)
    [exported] = exports(registry, version)
    layers = 2  # the tiny encoder's
    assert len(int8_nodes(exported)) == 6 * layers  # q, k, v, attention output, feed-forward in and out


def test_close_calls_are_answered_by_the_fp32_fallback(toy_version):
    registry, version, _ = toy_version
    exact = load_model(version, registry, runtime="onnx", threads=1)
    fast = load_model(version, registry, runtime="torch", threads=1)
    fast.model.encoder = onnx_encoder(
        fast.model.encoder, fast.tokenizer, exports(registry, version)[0].parent, 1, int8=True
    )
    fp32_rows, int8_rows = exact.logits(TEXTS), fast.logits(TEXTS)
    assert not np.allclose(fp32_rows, int8_rows, atol=1e-5)
    gaps = top_two_gap(int8_rows)
    cut = float(np.median(gaps))
    mixed = replace(fast, fallback=exact, fallback_margin=cut).logits(TEXTS)
    close = gaps < cut
    assert close.any() and not close.all()
    np.testing.assert_allclose(mixed[close], fp32_rows[close], atol=1e-6)  # close calls: fp32's answer
    np.testing.assert_allclose(mixed[~close], int8_rows[~close], atol=1e-6)  # the rest: int8's


def test_the_fallback_margin_covers_every_disagreement_and_its_agreement_is_measured_out_of_sample():
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=(400, 5)) * 3
    int8 = fp32 + rng.normal(scale=0.3, size=fp32.shape)  # quantization noise: flips only close calls
    wrong = fp32.argmax(1) != int8.argmax(1)
    assert 0 < wrong.sum() < 40
    margin = serving.fallback_margin(fp32, int8)
    assert (top_two_gap(int8)[wrong] < margin).all()
    served, share, agreement = serving.cross_fitted_fallback(fp32, int8)
    assert served == margin and 0 < share < 0.5  # the larger half's margin is the whole set's
    assert 1 - wrong.mean() < agreement <= 1.0  # better than int8 alone; not 100% by construction
    assert serving.fallback_margin(fp32, fp32) == 0.0  # nothing to fall back for


@pytest.mark.parametrize(
    "content",
    ['{"runtime": "onnx-int8"', '{"runtime": "gpu"}', '{"runtime": "onnx-int8", "int8": {"accepted": false}}', "[]"],
)
def test_a_damaged_or_forged_serving_record_is_one_clear_error(toy_version, content):
    """A half-copied or hand-edited serving.json must not crash with a traceback, nor make int8 serve
    without its check."""
    registry, version, _ = toy_version
    registry.folder(version).serving.write_text(content)
    with pytest.raises(TuneloopError, match="is not a serving record tuneloop wrote .*delete it"):
        load_model(version, registry, threads=1)


def test_the_int8_check_copes_with_an_empty_validation_split(toy_version):
    """Regression: a run without validation rows trained to its end, then the int8 check crashed (IndexError in
    the tokenizer on an empty list) and nothing was registered."""
    from tuneloop.data.prepare import load_prepared

    registry, version, _ = toy_version
    folder = registry.folder(version)
    data = load_prepared(folder.data())
    data.splits["val"] = data.val.iloc[:0]
    record = serving.choose_runtime(folder, data, ServingConfig(runtime="onnx-int8"), threads=1)
    checked = record["int8"]["checked"]
    assert checked == {"validation": 0, "training": min(serving.MIN_AGREEMENT_TEXTS, len(data.train))}
    assert f"{checked['training']} training texts" in record["int8"]["reason"]


def test_training_with_a_train_test_split_column_and_ten_examples_per_label_serves_int8(tiny_encoder, tmp_path):
    """Regression: a split column with train and test values only (10 examples per label) trained to the end, then
    crashed in the int8 check; now a validation split is carved from train, and the run registers."""
    from helpers import toy_rows

    rows = [dict(r, split="test" if i % 5 == 0 else "train") for i, r in enumerate(toy_rows(per_label=12, seed=5))]
    data = tmp_path / "split.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    registry, outcome = train(tiny_encoder, data, tmp_path, "serving.runtime=onnx-int8", "data.split_column=split")
    assert outcome.version is not None and outcome.report.serving["runtime"] in ("onnx-int8", "onnx")
    assert "no validation rows" in outcome.report.data["validation_carved"]
    assert outcome.report.serving["int8"]["checked"]["validation"] == len(load_prepared_val(registry, outcome))


def load_prepared_val(registry, outcome):
    from tuneloop.data.prepare import load_prepared

    return load_prepared(registry.folder(outcome.version).data()).val
