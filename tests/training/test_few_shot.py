"""The few-shot regime: a contrastive stage before the classifier loop, label names as texts, a minimum number of
steps and a smoothed validation score; chosen automatically when labels have few examples, and said in the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import crashed_then_resumed, toy_rows
from tuneloop.config import load_config
from tuneloop.data.prepare import prepare_data
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.schema import TrainingRegime
from tuneloop.models.classifier import CosineHead, TextClassifier
from tuneloop.models.encoders import EncoderSource
from tuneloop.registry import VersionFolder
from tuneloop.training import classification
from tuneloop.training.classification import fine_tune
from tuneloop.training.contrastive import fit_head, supervised_contrastive_loss
from tuneloop.training.distributed import ONE_PROCESS, World
from tuneloop.training.loop import smoothed_score
from tuneloop.training.regime import choose_regime, epochs_for, readable_label, with_label_names

FEW_SHOT = [
    "train.few_shot.mode=auto",
    "train.few_shot.contrastive_steps=12",
    "train.few_shot.loop_steps=20",
    "train.few_shot.labels_per_batch=3",
    "train.few_shot.lr=1e-3",
]


@pytest.fixture()
def few(tiny_overrides, tiny_encoder, tmp_path):
    """The toy task with 8 texts per label, and a recipe whose few-shot regime is short."""
    path = tmp_path / "few.csv"
    pd.DataFrame(toy_rows(per_label=8, seed=4)).to_csv(path, index=False)
    config = load_config(None, [*tiny_overrides, f"data.path={path}", *FEW_SHOT])
    return config, prepare_data(config.data), EncoderSource("tiny", tiny_encoder)


def test_the_contrastive_loss_is_low_for_clusters_and_high_for_mixed_labels():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    centres = torch.eye(3)[labels] * 5
    clustered = centres + 0.1 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    mixed = clustered[torch.tensor([0, 2, 4, 1, 3, 5])]
    assert supervised_contrastive_loss(clustered, labels, 0.1) < 0.1 < supervised_contrastive_loss(mixed, labels, 0.1)


def test_smoothed_score_is_the_mean_of_the_last_scores():
    assert smoothed_score([0.1, 0.5, 0.7], 0.9, 3) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert smoothed_score([0.1], 0.9, 3) == pytest.approx(0.5)
    assert smoothed_score([0.1, 0.5], 0.9, 1) == 0.9


def test_the_regime_is_few_shot_for_few_examples_per_label_and_says_why(few, tiny_overrides):
    config, data, _ = few
    regime = choose_regime(config, data, ONE_PROCESS, multitask=False)
    assert regime.name == "few-shot" and "at most train.few_shot.max_per_label=20" in regime.why
    config.train.few_shot.max_per_label = 3
    regime = choose_regime(config, data, ONE_PROCESS, multitask=False)
    assert regime.name == "standard" and "more than train.few_shot.max_per_label=3" in regime.why
    config.train.few_shot.mode = "on"
    assert choose_regime(config, data, ONE_PROCESS, multitask=False).name == "few-shot"
    torchrun = World(rank=0, size=2)
    with pytest.raises(TuneloopError, match="train.few_shot.mode=on: the few-shot regime does not run under several"):
        choose_regime(config, data, torchrun, multitask=False)
    config.train.few_shot.mode = "auto"
    config.train.few_shot.max_per_label = 20
    assert choose_regime(config, data, torchrun, multitask=False).name == "standard"


def test_label_names_join_the_training_texts_only_when_they_read_as_words(few):
    config, data, _ = few
    assert readable_label("card_arrival") == "card arrival" and readable_label("OrderStatus") == "order status"
    regime = choose_regime(config, data, ONE_PROCESS, multitask=False)
    named = with_label_names(data, regime, wanted=True)
    assert len(named.train) == len(data.train) + 3 and regime.label_names_added == 3
    assert set(named.train["text"]) - set(data.train["text"]) == {"refund", "delivery", "password"}
    numeric = data.train.assign(label=data.train["label"].map({"refund": "0", "delivery": "1", "password": "2"}))
    data.splits["train"], data.labels = numeric, ["0", "1", "2"]
    assert len(with_label_names(data, regime, wanted=True).train) == len(data.train)


def test_a_few_shot_run_trains_the_encoder_first_runs_enough_steps_and_reports_it(few, tmp_path):
    config, data, encoder = few
    config.train.patience = 1  # early stopping would end the loop after two epochs: loop_steps holds it
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    regime = result.regime
    assert regime.name == "few-shot" and regime.contrastive.steps == 12
    assert regime.contrastive.loss_last < regime.contrastive.loss_first  # the stage learnt the labels
    assert result.history[-1]["step"] >= 20 and regime.epochs * -(-len(data.train) // 8) >= 20
    assert all("val_macro_f1_smoothed" in h for h in result.history)


def test_without_loop_steps_the_model_is_the_stage_encoder_under_the_fitted_head(few, tmp_path):
    """The default few-shot run: contrastive stage, head fit, no classifier loop; the start is scored and saved."""
    config, data, encoder = few
    config.train.few_shot.loop_steps = 0
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    assert result.regime.epochs == 0 and [h["step"] for h in result.history] == [0]
    assert result.best_step == 0 and result.best_val_macro_f1 == result.history[0]["val_macro_f1"]
    classifier, _ = TextClassifier.load(result.best_dir)
    assert classifier.spec.labels == data.labels


def test_a_run_without_loop_steps_killed_after_training_resumes_without_training_again(few, tmp_path):
    """The model is trained once the head is fitted: a run stopped after that (while it is scored, exported or
    registered) resumes from its checkpoint like any other, instead of having nothing to resume."""
    config, data, encoder = few
    config.train.few_shot.loop_steps = 0
    run = VersionFolder(tmp_path / "run")
    first = fine_tune(config, data, encoder, run, show_progress=False)
    resumed = fine_tune(config, data, encoder, run, resume=True, show_progress=False)
    assert resumed.history == first.history and resumed.best_val_macro_f1 == first.best_val_macro_f1
    assert resumed.regime.contrastive.model_copy(update={"seconds": 0}) == first.regime.contrastive.model_copy(
        update={"seconds": 0}
    )


def test_the_few_shot_regime_runs_no_loop_unless_loop_steps_ask_and_then_at_least_train_epochs():
    standard = TrainingRegime(name="standard", why="", median_per_label=100.0)
    assert epochs_for(standard, 3, steps_per_epoch=10) == 3
    few = TrainingRegime(name="few-shot", why="", median_per_label=9.0, min_steps=0)
    assert epochs_for(few, 3, steps_per_epoch=10) == 0
    few.min_steps = 100
    assert epochs_for(few, 3, steps_per_epoch=10) == 10 and epochs_for(few, 20, steps_per_epoch=10) == 20


def test_the_head_fit_lowers_the_training_loss_from_the_centroids():
    torch.manual_seed(0)
    embeddings = torch.randn(24, 16)
    labels = np.repeat(np.arange(3), 8)
    embeddings[:, :3] += 0.8 * torch.eye(3)[labels]  # separable, but not by the centroids alone
    head = CosineHead(16, 3, 25.0)
    head.weight.data = torch.stack([embeddings[labels == k].mean(0) for k in range(3)])
    target = torch.as_tensor(labels)
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy(head(embeddings), target))
    fit_head(head, embeddings, labels, steps=100)
    with torch.no_grad():
        assert float(torch.nn.functional.cross_entropy(head(embeddings), target)) < before / 2


def test_a_few_shot_run_resumes_exactly(few, tmp_path):
    """The contrastive stage runs once: a resumed run starts from the checkpoint's weights, not the stage again."""
    config, data, encoder = few
    config.train.checkpoint_every = 5
    straight = fine_tune(config, data, encoder, VersionFolder(tmp_path / "straight"), show_progress=False)
    resumed = crashed_then_resumed(config, data, encoder, tmp_path / "crashed", at_step=12)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in straight.history])
    assert resumed.regime.contrastive == straight.regime.contrastive.model_copy(
        update={"seconds": resumed.regime.contrastive.seconds}
    )


def test_the_report_and_the_registry_say_which_regime_trained(few, tiny_overrides, tmp_path):
    config, _, _ = few
    outcome = classification.run(config, show_progress=False)
    assert outcome.report.regime.name == "few-shot" and outcome.version.metrics["regime"] == "few-shot"
    page = outcome.report_html.read_text()
    assert "Trained in the few-shot regime: the median label has" in page and "a contrastive stage of 12 steps" in page
    off = load_config(None, [*tiny_overrides, f"data.path={config.data.path}", "train.few_shot.mode=off"])
    standard = classification.run(off, show_progress=False)
    assert standard.report.regime.name == "standard" and standard.report.regime.why == "train.few_shot.mode=off"
    assert np.isfinite(standard.report.test.accuracy)
