from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import toy_rows
from tuneloop.config import DataConfig, load_config
from tuneloop.data.prepare import prepare_data
from tuneloop.models.classifier import TextClassifier, predict_proba
from tuneloop.models.encoders import EncoderSource
from tuneloop.train.classification import (
    build_classifier,
    length_grouped_batches,
    train_classifier,
)


@pytest.fixture()
def setup(tiny_overrides, toy_csv, tiny_encoder):
    config = load_config(None, tiny_overrides)
    data = prepare_data(DataConfig(path=toy_csv))
    return config, data, EncoderSource("tiny", tiny_encoder)


def test_length_grouped_batches_cover_every_index_once_and_group_lengths():
    lengths = list(np.random.default_rng(0).integers(1, 100, size=1000))
    batches = length_grouped_batches(lengths, 10, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    random_spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b)
                             for b in length_grouped_batches(lengths, 10, seed=1, grouped=False)])
    assert spread < random_spread / 4
    assert batches == length_grouped_batches(lengths, 10, seed=1)
    assert batches != length_grouped_batches(lengths, 10, seed=2)


def test_training_learns_the_toy_task(setup, tmp_path):
    config, _, encoder = setup
    path = tmp_path / "bigger.csv"
    pd.DataFrame(toy_rows(per_label=40, seed=1)).to_csv(path, index=False)
    data = prepare_data(DataConfig(path=path))
    config.train.epochs = 8
    result = train_classifier(config, data, encoder, tmp_path / "run", show_progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model, tokenizer = TextClassifier.load(result.best_dir)
    labels = data.test["label"].map({label: i for i, label in enumerate(data.labels)}).to_numpy()
    accuracy = (predict_proba(model, tokenizer, data.test["text"].tolist()).argmax(1) == labels).mean()
    assert accuracy >= 0.8
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in logged] == [h["epoch"] for h in result.history]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_centroid_head_starts_better_than_chance(setup):
    config, data, encoder = setup
    model, tokenizer = build_classifier(config, encoder, data.labels)
    from tuneloop.models.classifier import tokenize
    from tuneloop.train.classification import _embed_all

    ids = tokenize(tokenizer, data.train["text"].tolist(), model.spec)
    label_ids = torch.tensor(data.train["label"].map({l: i for i, l in enumerate(data.labels)}).to_numpy())
    model.init_head_from_centroids(_embed_all(model, ids, tokenizer.pad_token_id), label_ids)
    predicted = predict_proba(model, tokenizer, data.train["text"].tolist()).argmax(1)
    assert (predicted == label_ids.numpy()).mean() > 1 / len(data.labels) + 0.15


@pytest.mark.parametrize("eval_every", [None, 3])
def test_resume_continues_exactly(setup, tmp_path, eval_every):
    config, data, encoder = setup
    config.train.epochs = 3
    config.train.checkpoint_every = 4
    config.train.eval_every = eval_every
    straight = train_classifier(config, data, encoder, tmp_path / "straight", show_progress=False)

    class Crash(Exception):
        pass

    def crash(state, model, tokenizer):
        if state["global_step"] == 7:
            raise Crash

    with pytest.raises(Crash):
        train_classifier(config, data, encoder, tmp_path / "crashed", show_progress=False, step_callback=crash,
                         callback_every=1)
    resumed = train_classifier(config, data, encoder, tmp_path / "crashed", resume=True, show_progress=False)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in straight.history],
                                                                       abs=1e-6)
    a, _ = TextClassifier.load(straight.best_dir)
    b, _ = TextClassifier.load(resumed.best_dir)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_validation_every_n_steps_can_keep_a_model_from_inside_an_epoch(setup, tmp_path, monkeypatch):
    config, data, encoder = setup
    config.train.epochs = 2
    config.train.batch_size = 4
    config.train.eval_every = 2
    assert len(data.train) // 4 > 4  # step 4 falls inside the first epoch
    calls = []

    def scripted_f1(*args) -> float:
        calls.append(len(calls))
        return 0.9 if len(calls) == 2 else 0.01  # the second scoring (step 4) is the best
    monkeypatch.setattr("tuneloop.train.classification.validation_macro_f1", scripted_f1)
    at_step_4 = {}

    def snapshot(state, model, tokenizer):
        if state["global_step"] == 4:
            at_step_4.update({k: v.clone() for k, v in model.state_dict().items()})

    result = train_classifier(config, data, encoder, tmp_path / "run", show_progress=False, step_callback=snapshot,
                              callback_every=1)
    assert (result.best_step, result.best_epoch, result.best_val_macro_f1) == (4, 1, 0.9)
    assert [h["step"] for h in result.history][:2] == [2, 4]
    kept, _ = TextClassifier.load(result.best_dir)
    for name, value in kept.state_dict().items():
        assert torch.allclose(value, at_step_4[name], atol=1e-6), name


def test_early_stopping_with_patience(setup, tmp_path):
    config, data, encoder = setup
    config.train.epochs = 30
    config.train.patience = 1
    config.train.lr = 1e-9
    config.train.head_lr = 1e-9
    result = train_classifier(config, data, encoder, tmp_path / "run", show_progress=False)
    assert result.stopped_early
    assert len(result.history) < 30
    assert result.best_epoch == 1


@pytest.mark.parametrize("options", [{"class_weighted": True, "label_smoothing": 0.1, "schedule": "cosine"},
                                     {"length_grouping": False, "schedule": "constant"}])
def test_training_options_run(setup, tmp_path, options):
    config, data, encoder = setup
    for key, value in options.items():
        setattr(config.train, key, value)
    config.model.head = "linear"
    config.model.head_init = "random"
    result = train_classifier(config, data, encoder, tmp_path / "run", show_progress=False)
    assert np.isfinite(result.history[-1]["train_loss"])


def test_big_vocabulary_embeddings_are_frozen(setup):
    config, data, encoder = setup
    config.train.freeze_embeddings = True
    model, _ = build_classifier(config, encoder, data.labels)
    assert not model.encoder.get_input_embeddings().weight.requires_grad
    config.train.freeze_embeddings = None
    model, _ = build_classifier(config, encoder, data.labels)
    assert model.encoder.get_input_embeddings().weight.requires_grad
