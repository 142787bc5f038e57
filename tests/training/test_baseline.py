"""The classical baseline beside every training, and the blend a version serves when it wins on validation."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline, make_union
from typer.testing import CliRunner

from helpers import tiny_config, toy_rows
from tuneloop.cli import app
from tuneloop.config import GateSettings, load_config
from tuneloop.errors import TuneloopError
from tuneloop.feedback.gate import run_gate
from tuneloop.models.baseline import SETTINGS_FILE, Blend, TfidfBaseline
from tuneloop.models.classifier import BASELINE_FOLDER, BLEND_FILE, TextClassifier, predict_proba
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry
from tuneloop.training import classification
from tuneloop.training.baseline import fit_baseline

# A transformer that has learned nothing (a random head, learning rates too small to move it): any blend with a
# baseline that has learned the toy words beats it.
UNTRAINED = ("model.head_init=random", "train.lr=1e-9", "train.head_lr=1e-9", "train.epochs=1")
# Enough validation rows (36) for a blend to be weighed on.
WIDE_VALIDATION = "data.val_size=0.3"


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baseline-data")
    pd.DataFrame(toy_rows(per_label=40, seed=3)).to_csv(folder / "toy.csv", index=False)
    return folder / "toy.csv"


@pytest.fixture(scope="module")
def blended(tiny_encoder, toy_data, tmp_path_factory):
    """toy@1: an untrained transformer, which the blend with its baseline beats on validation."""
    home = tmp_path_factory.mktemp("blended") / "home"
    recipe = tiny_config(tiny_encoder, toy_data, home, *UNTRAINED, WIDE_VALIDATION)
    return recipe, classification.run(recipe, show_progress=False)


def forbid_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    joblib = pytest.importorskip("joblib")
    monkeypatch.setattr(joblib, "load", refuse)


def test_the_stored_baseline_predicts_what_scikit_learns_own_pipeline_predicts():
    rows = pd.DataFrame(toy_rows(per_label=30, seed=1))
    texts, labels = rows["text"].tolist(), sorted(rows["label"].unique())
    ids = rows["label"].map(labels.index).to_numpy()
    ours = fit_baseline(texts, ids, labels)
    theirs = make_pipeline(
        make_union(
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
        ),
        LogisticRegression(C=10, max_iter=1000),
    ).fit(texts, ids)
    unseen = [r["text"] for r in toy_rows(per_label=5, seed=9)] + ["nothing it has seen"]
    assert np.allclose(ours.predict_proba(unseen), theirs.predict_proba(unseen), atol=1e-5)


def test_a_binary_baseline_stores_one_logit_per_label_and_chinese_is_cut_into_characters(tmp_path):
    texts = ["很好吃 推荐", "太难吃了", "非常好吃", "难吃 不推荐", "好吃好吃", "真难吃"] * 3
    ids = np.array([1, 0, 1, 0, 1, 0] * 3)
    baseline = fit_baseline(texts, ids, ["bad", "good"])
    assert [b.analyzer for b in baseline.settings.blocks] == ["char"]
    theirs = LogisticRegression(C=10, max_iter=1000).fit(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True).fit_transform(texts), ids
    )
    baseline.save(tmp_path)
    loaded = TfidfBaseline.load(tmp_path)
    assert loaded.coef.shape == (2, len(baseline.settings.blocks[0].terms))
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True).fit(texts)
    assert np.allclose(
        loaded.predict_proba(["好吃", "难吃"]), theirs.predict_proba(vectorizer.transform(["好吃", "难吃"]))
    )


def test_every_training_reports_the_baseline_beside_the_transformer(tiny_encoder, toy_data, tmp_path):
    outcome = classification.run(tiny_config(tiny_encoder, toy_data, tmp_path / "home"), show_progress=False)
    compared = outcome.report.baseline
    assert compared.method.startswith("TF-IDF word 1–2-grams and character 2–5-grams")
    assert compared.baseline.test.n == compared.transformer.test.n == outcome.report.test.n
    assert compared.baseline.validation.n == compared.transformer.validation.n > 0
    # 12 validation rows: too few to weigh a blend on, so the transformer serves alone.
    assert compared.hybrid is None and compared.served == "transformer" and "fewer than the 30" in compared.reason
    assert not (outcome.folder.model / BLEND_FILE).exists()
    page = outcome.report_html.read_text()
    assert "Against a baseline" in page and "This version serves the transformer alone" in page
    saved = json.loads(outcome.folder.report_json.read_text())
    assert saved["baseline"]["baseline"]["test"]["accuracy"] == compared.baseline.test.accuracy


def test_train_baseline_off_fits_none(tiny_encoder, toy_data, tmp_path):
    recipe = tiny_config(tiny_encoder, toy_data, tmp_path / "home", "train.baseline=off", "train.epochs=1")
    assert classification.run(recipe, show_progress=False).report.baseline is None


def test_a_blend_that_wins_on_validation_is_what_the_version_serves(blended):
    recipe, outcome = blended
    compared = outcome.report.baseline
    assert compared.served == "hybrid" and compared.hybrid.gain >= recipe.train.hybrid_min_gain
    assert compared.hybrid.validation.macro_f1 > compared.transformer.validation.macro_f1
    # The test report is the served blend's: its accuracy is the blend's in the comparison.
    assert outcome.report.test.accuracy == pytest.approx(compared.hybrid.test.accuracy)
    assert outcome.report.test.accuracy > compared.transformer.test.accuracy
    page = outcome.report_html.read_text()
    assert "This version serves the blend of the two" in page and "transformer&#x27;s share" in page


def test_the_registered_blend_serves_the_labels_of_in_process_scoring_and_unpickles_nothing(blended, monkeypatch):
    recipe, outcome = blended
    folder = Registry(recipe.registry).folder(outcome.version)
    assert (folder.model / BASELINE_FOLDER / SETTINGS_FILE).is_file()
    test = pd.read_json(folder.data() / "test.jsonl", lines=True)
    texts = test["text"].tolist()
    # In process: the transformer and the baseline as training left them, mixed by hand.
    transformer, tokenizer = TextClassifier.load(folder.model)
    weight = json.loads((folder.model / BLEND_FILE).read_text())["transformer_weight"]
    baseline = TfidfBaseline.load(folder.model / BASELINE_FOLDER)
    by_hand = weight * predict_proba(transformer, tokenizer, texts) + (1 - weight) * baseline.predict_proba(texts)
    forbid_unpickling(monkeypatch)
    served = load_model(outcome.version.ref, Registry(recipe.registry))
    assert isinstance(served.blend, Blend) and served.blend.transformer_weight == weight
    assert served.predict(texts, cleaned=True) == [served.labels[i] for i in by_hand.argmax(1)]
    assert np.allclose(served.predict_proba(texts, cleaned=True), by_hand, atol=1e-5)


def test_tuneloop_eval_and_the_gate_score_the_blend(blended, tiny_encoder, toy_data, tmp_path):
    recipe, outcome = blended
    home = tmp_path / "home"
    shutil.copytree(recipe.registry.home, home)
    registry = Registry(load_config(None, [f"registry.home={home}"], GateSettings).registry)
    result = CliRunner().invoke(
        app, ["eval", "--model", "toy@1", "--out", str(tmp_path / "eval"), f"registry.home={home}"]
    )
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert evaluated["test"]["accuracy"] == pytest.approx(outcome.report.test.accuracy)
    # Production: the same untrained transformer, alone; the candidate blend is judged better on the same test split.
    plain = tiny_config(tiny_encoder, toy_data, home, *UNTRAINED, WIDE_VALIDATION, "train.baseline=off")
    alone = classification.run(plain, show_progress=False).version
    registry.promote(alone.ref)
    decision = run_gate("toy@1", load_config(None, [f"registry.home={home}"], GateSettings), promote=False)
    assert decision.metrics["candidate"]["test"]["accuracy"] == pytest.approx(outcome.report.test.accuracy)
    assert decision.metrics["candidate"]["test"]["accuracy"] > decision.metrics["production"]["test"]["accuracy"]


def test_a_baseline_tuneloop_did_not_write_is_one_clear_error(blended, tmp_path):
    recipe, outcome = blended
    model = tmp_path / "model"
    shutil.copytree(Registry(recipe.registry).folder(outcome.version).model, model)
    settings = json.loads((model / BASELINE_FOLDER / SETTINGS_FILE).read_text())
    settings["blocks"][0]["terms"].pop()
    (model / BASELINE_FOLDER / SETTINGS_FILE).write_text(json.dumps(settings))
    with pytest.raises(TuneloopError, match="is not a baseline tuneloop wrote"):
        load_model(model)


def test_train_baseline_only_registers_the_baseline_alone_and_serves_it(tiny_overrides, home, monkeypatch):
    runner = CliRunner()
    trained = runner.invoke(app, ["train", *tiny_overrides, "train.baseline=only"])
    assert trained.exit_code == 0, trained.output
    assert "served by its TF-IDF baseline alone" in trained.output and "against a baseline" in trained.output
    version = home / "models" / "toy" / "v1"
    assert not list((version / "model").glob("*.safetensors")), "no encoder weights"
    report = json.loads((version / "report.json").read_text())
    assert report["baseline"]["served"] == "baseline" and "transformer" not in report["baseline"]
    forbid_unpickling(monkeypatch)
    served = load_model("toy@1", Registry(load_config(None, [f"registry.home={home}"], GateSettings).registry))
    assert served.runtime == "baseline" and served.model is None
    test = pd.read_json(version / "data" / "test.jsonl", lines=True)
    predicted = served.predict(test["text"].tolist(), cleaned=True)
    assert np.mean(np.array(predicted) == test["label"].to_numpy()) == pytest.approx(report["test"]["accuracy"])
    explained = runner.invoke(app, ["explain", "-m", "toy", "refund my money please", f"registry.home={home}"])
    assert explained.exit_code != 0 and "served by its TF-IDF baseline alone" in explained.output
    assert "Traceback" not in explained.output


def test_train_baseline_only_is_refused_where_it_cannot_apply(tiny_overrides):
    from tuneloop.config import ClassifierRecipe

    with pytest.raises(TuneloopError, match="train.baseline=only with train.dp"):
        load_config(None, [*tiny_overrides, "train.baseline=only", "train.dp.epsilon=8"], ClassifierRecipe)
    with pytest.raises(TuneloopError, match="not with tasks, data.kfold or train.teachers"):
        load_config(None, [*tiny_overrides, "train.baseline=only", "data.kfold=3"], ClassifierRecipe)


def test_a_merged_export_of_a_lora_blend_serves_the_blend(tiny_encoder, toy_data, tmp_path):
    """Regression: merging the adapters re-saved the encoder and head only, and the export served the transformer
    alone."""
    from tuneloop.models.classifier import export_classifier

    recipe = tiny_config(tiny_encoder, toy_data, tmp_path / "home", *UNTRAINED, WIDE_VALIDATION, "train.method=lora")
    outcome = classification.run(recipe, show_progress=False)
    assert outcome.report.baseline.served == "hybrid"
    export_classifier(outcome.folder.model, tmp_path / "export", merge=True)
    exported, registered = load_model(tmp_path / "export"), load_model(outcome.version.ref, Registry(recipe.registry))
    texts = [r["text"] for r in toy_rows(per_label=4, seed=5)]
    assert exported.blend is not None
    assert np.allclose(exported.predict_proba(texts), registered.predict_proba(texts), atol=1e-4)
