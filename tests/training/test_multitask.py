"""Multi-task: one encoder, an intent head and a sentiment head, trained jointly and served from one pass."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import MOODS, toy_rows
from tuneloop.config import load_config
from tuneloop.data.prepare import load_prepared
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import TextClassifier, load_task_heads, predict_logits, predict_proba
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry
from tuneloop.training import classification


@pytest.fixture()
def two_tasks(tmp_path, tiny_encoder, home) -> list[str]:
    pd.DataFrame(toy_rows(per_label=40, seed=1)).to_csv(tmp_path / "intents.csv", index=False)
    pd.DataFrame(toy_rows(per_label=40, seed=2, topics=MOODS)).to_csv(tmp_path / "moods.csv", index=False)
    return [
        f"model.name={tiny_encoder}",
        f"registry.home={home}",
        "name=nlu",
        "train.epochs=6",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.head_lr=1e-2",
        "model.max_length=32",
        "train.threads=1",
        "serving.runtime=torch",
        "train.patience=10",
        f"tasks.intent.path={tmp_path / 'intents.csv'}",
        f"tasks.sentiment.path={tmp_path / 'moods.csv'}",
    ]


def accuracy(model: TextClassifier, tokenizer, split: pd.DataFrame) -> float:
    predicted = predict_proba(model, tokenizer, split["text"].tolist()).argmax(1)
    return float((np.array(model.spec.labels)[predicted] == split["label"].to_numpy()).mean())


def test_both_heads_learn_on_one_encoder_and_register_as_one_version(two_tasks):
    outcome = classification.run(load_config(None, two_tasks), show_progress=False)
    folder = outcome.folder.model
    model, tokenizer = TextClassifier.load(folder)  # single-task code paths see the first task
    heads = load_task_heads(folder, model)
    assert model.spec.task == "intent" and set(model.spec.labels) == {"refund", "delivery", "password"}
    assert list(heads) == ["sentiment"] and set(heads["sentiment"].spec.labels) == set(MOODS)
    assert heads["sentiment"].encoder is model.encoder
    # Each head is scored on its own task's test split, well above chance (1/3) for both.
    assert outcome.report.test.accuracy >= 0.8
    assert outcome.report.tasks["sentiment"].test.accuracy >= 0.8
    sentiment_test = load_prepared(outcome.folder.data("sentiment")).test
    assert accuracy(heads["sentiment"], tokenizer, sentiment_test) >= 0.8
    history = outcome.train.history
    assert {"val_macro_f1/intent", "val_macro_f1/sentiment"} <= set(history[-1])
    assert history[-1]["val_macro_f1"] == pytest.approx(
        (history[-1]["val_macro_f1/intent"] + history[-1]["val_macro_f1/sentiment"]) / 2
    )
    assert "task sentiment" in outcome.report_html.read_text()
    assert outcome.version.metrics["sentiment.accuracy"] == outcome.report.tasks["sentiment"].test.accuracy


def test_one_encoder_pass_gives_every_tasks_logits(two_tasks):
    outcome = classification.run(load_config(None, two_tasks), show_progress=False)
    registry = Registry(load_config(None, two_tasks).registry)
    loaded = load_model(outcome.version, registry)
    texts = ["refund money please", "thanks great parcel"]
    rows = predict_logits(loaded.model, loaded.tokenizer, texts, heads=list(loaded.tasks.values()))
    assert rows.shape == (2, 3 + 3)
    np.testing.assert_allclose(
        loaded.own_logits(rows), predict_logits(loaded.model, loaded.tokenizer, texts), rtol=1e-5, atol=1e-5
    )
    mood, mood_rows = loaded.task("sentiment", rows)
    assert mood.name == "nlu:sentiment" and mood.labels == loaded.tasks["sentiment"].spec.labels
    np.testing.assert_allclose(mood_rows, predict_logits(mood.model, loaded.tokenizer, texts), rtol=1e-5, atol=1e-5)
    with pytest.raises(TuneloopError, match="has no 'topic' task"):
        loaded.task("topic", rows)


def test_multitask_config_mistakes_are_named(two_tasks, toy_csv):
    with pytest.raises(TuneloopError, match="set data.path or tasks, not both"):
        load_config(None, [*two_tasks, f"data.path={toy_csv}"])
    with pytest.raises(TuneloopError, match="two or more"):
        load_config(None, [t for t in two_tasks if not t.startswith("tasks.sentiment")])
    with pytest.raises(TuneloopError, match="cross-validation is for single-task"):
        load_config(None, [*two_tasks, "data.kfold=3"])


def test_resume_continues_a_multitask_run(two_tasks, tmp_path):
    config = load_config(None, [*two_tasks, "train.epochs=2", "train.checkpoint_every=1000"])
    straight = classification.run(config, show_progress=False, register=False)

    class Crash(RuntimeError):
        pass

    def crash(state, *_):
        if state.global_step == 30:  # into epoch 2 (24 steps an epoch), after the epoch-end checkpoint
            raise Crash

    with pytest.raises(Crash):
        classification.run(config, show_progress=False, register=False, step_callback=crash, callback_every=1)
    [crashed] = [r for r in (config.registry.home / "runs").iterdir() if r != straight.folder.root]
    resumed = classification.run(config, resume=crashed, show_progress=False, register=False)
    assert [round(h["train_loss"], 5) for h in resumed.train.history] == [
        round(h["train_loss"], 5) for h in straight.train.history
    ]
    assert json.loads((resumed.folder.model / "tasks.json").read_text())["sentiment"]["task"] == "sentiment"
    a, b = (TextClassifier.load(run.folder.model)[0] for run in (straight, resumed))
    a_heads, b_heads = load_task_heads(straight.folder.model, a), load_task_heads(resumed.folder.model, b)
    assert torch.allclose(a_heads["sentiment"].head.weight, b_heads["sentiment"].head.weight, atol=1e-6)
    assert torch.allclose(a.head.weight, b.head.weight, atol=1e-6)


def test_feedback_retraining_refuses_a_multitask_model_with_a_way_forward(two_tasks):
    from tuneloop.feedback.retrain import retrain

    config = load_config(None, two_tasks)
    Registry(config.registry).promote(classification.run(config, show_progress=False).version.ref)
    with pytest.raises(TuneloopError, match="nlu@1 is a multi-task model .*run tuneloop train again"):
        retrain("nlu", overrides=[f"registry.home={config.registry.home}"], show_progress=False)
