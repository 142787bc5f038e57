from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import MOODS, crashed_then_resumed, toy_rows
from tuneloop.config import DataConfig, load_config
from tuneloop.data.prepare import prepare_data
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import TextClassifier, load_encoder, pad_right, predict_proba, tokenize
from tuneloop.models.encoders import EncoderSource
from tuneloop.models.predictor import load_model
from tuneloop.models.trained_rows import TrainedRowsEmbedding, plain_embeddings, train_only_used_rows
from tuneloop.registry import VersionFolder
from tuneloop.training import classification
from tuneloop.training.classification import build_classifier, fine_tune
from tuneloop.training.steppers import length_grouped_batches


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
    random_spread = np.mean(
        [
            max(lengths[i] for i in b) - min(lengths[i] for i in b)
            for b in length_grouped_batches(lengths, 10, seed=1, grouped=False)
        ]
    )
    assert spread < random_spread / 4
    assert batches == length_grouped_batches(lengths, 10, seed=1)
    assert batches != length_grouped_batches(lengths, 10, seed=2)


def test_training_learns_the_toy_task(setup, tmp_path):
    config, _, encoder = setup
    path = tmp_path / "bigger.csv"
    pd.DataFrame(toy_rows(per_label=40, seed=1)).to_csv(path, index=False)
    data = prepare_data(DataConfig(path=path))
    config.train.epochs = 8
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model, tokenizer = TextClassifier.load(result.best_dir)
    labels = data.test["label"].map({label: i for i, label in enumerate(data.labels)}).to_numpy()
    accuracy = (predict_proba(model, tokenizer, data.test["text"].tolist()).argmax(1) == labels).mean()
    assert accuracy >= 0.8
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in logged] == [h["epoch"] for h in result.history]
    if importlib.util.find_spec("tensorboard") is not None:  # an optional extra: `pip install tuneloop[tensorboard]`
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_centroid_head_starts_better_than_chance(setup):
    config, data, encoder = setup
    model, tokenizer = build_classifier(config, encoder, data.labels)
    from tuneloop.training.classification import embed_all

    ids = tokenize(tokenizer, data.train["text"].tolist(), model.spec)
    label_ids = torch.tensor(data.train["label"].map({label: i for i, label in enumerate(data.labels)}).to_numpy())
    model.init_head_from_centroids(embed_all(model, ids, tokenizer.pad_token_id), label_ids)
    predicted = predict_proba(model, tokenizer, data.train["text"].tolist()).argmax(1)
    assert (predicted == label_ids.numpy()).mean() > 1 / len(data.labels) + 0.15


def assert_same_run(straight, resumed) -> None:
    """A resumed run logged the straight run's losses and kept its weights."""
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in straight.history], abs=1e-6
    )
    a, _ = TextClassifier.load(straight.best_dir)
    b, _ = TextClassifier.load(resumed.best_dir)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name


@pytest.mark.parametrize("eval_every", [None, 3])
def test_resume_continues_exactly(setup, tmp_path, eval_every):
    config, data, encoder = setup
    config.train.epochs = 3
    config.train.checkpoint_every = 3  # the last checkpoint before the crash is in the middle of epoch 2
    config.train.eval_every = eval_every
    straight = fine_tune(config, data, encoder, VersionFolder(tmp_path / "straight"), show_progress=False)
    resumed = crashed_then_resumed(config, data, encoder, tmp_path / "crashed", at_step=7)
    assert_same_run(straight, resumed)


def test_a_one_layer_student_of_a_teacher_resumes_exactly(setup, tiny_overrides, tmp_path):
    """The teachers are asked again on resume, and the layers dropped again: the resumed run is the straight one."""
    config, data, encoder = setup
    fine_tune(config, data, encoder, VersionFolder(tmp_path / "teacher"), show_progress=False)
    student = load_config(
        None,
        [*tiny_overrides, "model.layers=1", f"train.teachers=[{tmp_path / 'teacher'}]", "train.epochs=3"],
    )
    student.train.checkpoint_every = 3
    straight = fine_tune(student, data, encoder, VersionFolder(tmp_path / "straight"), show_progress=False)
    resumed = crashed_then_resumed(student, data, encoder, tmp_path / "crashed", at_step=7)
    assert_same_run(straight, resumed)
    assert TextClassifier.load(resumed.best_dir)[0].encoder.config.num_hidden_layers == 1


def test_resuming_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error(setup, tmp_path):
    config, data, encoder = setup
    fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    trainer = tmp_path / "run" / "checkpoint" / "trainer.pt"
    saved = torch.load(trainer, weights_only=False)
    saved["model"] = {k.replace("word_embeddings.rows", "word_embeddings.weight"): v for k, v in saved["model"].items()}
    torch.save(saved, trainer)
    with pytest.raises(TuneloopError, match="does not fit this model"):
        fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), resume=True, show_progress=False)


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

    monkeypatch.setattr("tuneloop.training.loop.validation_macro_f1", scripted_f1)
    at_step_4 = {}

    def snapshot(state, model, tokenizer):
        if state.global_step == 4:
            with plain_embeddings(model.encoder):
                at_step_4.update({k: v.clone() for k, v in model.state_dict().items()})

    result = fine_tune(
        config,
        data,
        encoder,
        VersionFolder(tmp_path / "run"),
        show_progress=False,
        step_callback=snapshot,
        callback_every=1,
    )
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
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    assert result.stopped_early
    assert len(result.history) < 30
    assert result.best_epoch == 1


@pytest.mark.parametrize(
    "options",
    [
        {"class_weighted": True, "label_smoothing": 0.1, "schedule": "cosine"},
        {"length_grouping": False, "schedule": "constant"},
    ],
)
def test_training_options_run(setup, tmp_path, options):
    config, data, encoder = setup
    for key, value in options.items():
        setattr(config.train, key, value)
    config.model.head = "linear"
    config.model.head_init = "random"
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    assert np.isfinite(result.history[-1]["train_loss"])


def test_frozen_embeddings_get_no_gradient(setup):
    config, data, encoder = setup
    config.train.freeze_embeddings = True
    model, _ = build_classifier(config, encoder, data.labels)
    assert not model.encoder.get_input_embeddings().weight.requires_grad
    config.train.freeze_embeddings = False
    model, _ = build_classifier(config, encoder, data.labels)
    assert model.encoder.get_input_embeddings().weight.requires_grad


def test_null_freeze_embeddings_from_an_older_version_loads_as_trained():
    assert load_config(None, ["train.freeze_embeddings=null"]).train.freeze_embeddings is False


def test_training_only_used_rows_matches_training_the_whole_matrix(tiny_encoder):
    """Same steps, same weights: rows of unused tokens get no gradient, so leaving them out changes nothing."""
    dense, sparse = load_encoder(tiny_encoder), load_encoder(tiny_encoder)
    batches = [[[2, 7, 9, 3], [2, 9, 11, 12, 3]], [[2, 7, 15, 3], [2, 20, 3]]]
    train_only_used_rows(sparse, [ids for batch in batches for ids in batch])
    assert sparse.get_input_embeddings().rows.shape[0] == len({t for b in batches for ids in b for t in ids})
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0) for m in (dense, sparse)]
    for _ in range(3):
        for batch in batches:
            for encoder, optimizer in zip((dense, sparse), optimizers, strict=True):
                input_ids, mask = pad_right(batch, pad_id=0)
                encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state[mask.bool()].pow(
                    2
                ).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
    original = load_encoder(tiny_encoder).get_input_embeddings().weight
    with plain_embeddings(sparse):
        merged = sparse.get_input_embeddings()
        assert isinstance(merged, torch.nn.Embedding)
        assert torch.allclose(merged.weight, dense.get_input_embeddings().weight, atol=1e-6)
    assert not torch.equal(merged.weight[7], original[7])  # used rows did train
    assert torch.equal(merged.weight[30], original[30])
    assert isinstance(sparse.get_input_embeddings(), TrainedRowsEmbedding)  # training goes on with the subset


def test_a_saved_model_holds_the_trained_rows_in_a_plain_embedding(setup, tmp_path):
    config, data, encoder = setup
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    kept, tokenizer = TextClassifier.load(result.best_dir)
    trained = kept.encoder.get_input_embeddings().weight
    original = load_encoder(encoder.path).get_input_embeddings().weight
    used = sorted({t for ids in tokenize(tokenizer, data.train["text"].tolist(), kept.spec) for t in ids})
    unused = sorted(set(range(len(original))) - set(used))
    assert (trained[used] - original[used]).abs().max() > 1e-3  # more than weight decay alone would move them
    assert torch.equal(trained[unused], original[unused])


def test_max_length_is_capped_at_the_encoders_positions(tiny_overrides, tmp_path, tiny_encoder):
    """Regression: model.max_length=128 on an encoder with 64 positions failed on the first long text."""
    rows = toy_rows() + [{"text": " ".join(["refund money back please"] * 30), "label": "refund"}] * 4
    path = tmp_path / "long.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    config = load_config(None, [*tiny_overrides, f"data.path={path}", "model.max_length=128", "train.epochs=1"])
    data = prepare_data(config.data)
    result = fine_tune(config, data, EncoderSource("tiny", tiny_encoder), VersionFolder(tmp_path / "run"))
    model, _ = TextClassifier.load(result.best_dir)
    assert model.spec.max_length == 64  # the tiny encoder's max_position_embeddings


def test_model_layers_trains_saves_and_serves_the_lower_layers_only(setup, tiny_overrides, tmp_path):
    _, data, encoder = setup
    config = load_config(None, [*tiny_overrides, "model.layers=1"])
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    kept, tokenizer = TextClassifier.load(result.best_dir)
    assert kept.encoder.config.num_hidden_layers == 1
    assert len(kept.encoder.encoder.layer) == 1
    whole = load_encoder(encoder.path)
    # The kept layer is the encoder's lowest one, fine-tuned from its pretrained weights (same shapes, moved).
    before = whole.encoder.layer[0].attention.self.query.weight
    after = kept.encoder.encoder.layer[0].attention.self.query.weight
    assert before.shape == after.shape and not torch.equal(before, after)
    texts = data.val["text"].tolist()
    again, _ = TextClassifier.load(result.best_dir)
    assert np.allclose(predict_proba(kept, tokenizer, texts), predict_proba(again, tokenizer, texts), atol=1e-6)


@pytest.mark.parametrize("layers", [0, 3])
def test_model_layers_outside_the_encoder_is_one_clear_error(setup, tiny_overrides, layers):
    encoder = setup[2]
    if layers < 1:
        with pytest.raises(TuneloopError, match="'model.layers': Input should be greater than or equal to 1"):
            load_config(None, [*tiny_overrides, f"model.layers={layers}"])
        return
    config = load_config(None, [*tiny_overrides, f"model.layers={layers}"])
    with pytest.raises(TuneloopError, match="model.layers=3, and the encoder has 2 layers: use 1 to 2"):
        build_classifier(config, encoder, ["a", "b"])


def test_model_layers_with_lora_is_refused(setup, tiny_overrides):
    encoder = setup[2]
    config = load_config(None, [*tiny_overrides, "model.layers=1", "train.method=lora"])
    with pytest.raises(TuneloopError, match="model.layers does not go with train.method=lora"):
        build_classifier(config, encoder, ["a", "b"])


def test_a_student_learns_its_teachers_answers_not_only_its_labels(setup, tiny_overrides, tmp_path):
    """The student's data has every label moved to the next one; learning only from the teacher's soft labels
    (distill_weight=1), it answers as the teacher does, by label name, and not as its own labels say. (No
    validation split: validating against the moved labels would keep the epoch that learnt the least.)"""
    _, _, encoder = setup
    rows = pd.DataFrame(toy_rows(per_label=30, seed=1))
    rows.to_csv(tmp_path / "teacher.csv", index=False)
    teacher_data = prepare_data(DataConfig(path=tmp_path / "teacher.csv"))
    config = load_config(None, [*tiny_overrides, "train.epochs=8"])
    teacher = fine_tune(config, teacher_data, encoder, VersionFolder(tmp_path / "teacher"), show_progress=False)

    names = sorted(rows["label"].unique())
    moved = rows.assign(label=rows["label"].map(dict(zip(names, names[1:] + names[:1], strict=True))))
    moved.to_csv(tmp_path / "student.csv", index=False)
    data = prepare_data(DataConfig(path=tmp_path / "student.csv"))
    data.splits["val"] = data.val.iloc[:0]
    texts = data.train["text"].tolist()
    student = load_config(
        None,
        [*tiny_overrides, "train.epochs=8", f"train.teachers=[{tmp_path / 'teacher'}]", "train.distill_weight=1"],
    )
    result = fine_tune(student, data, encoder, VersionFolder(tmp_path / "student"), show_progress=False)

    assert result.distillation.teachers == ["teacher"]
    assert result.distillation.teachers_agree_with_training_labels < 0.2  # every label was moved
    answers = load_model(result.best_dir, runtime="torch").predict(texts, cleaned=True)
    teacher_answers = load_model(teacher.best_dir, runtime="torch").predict(texts, cleaned=True)
    assert np.mean(np.array(answers) == np.array(teacher_answers)) >= 0.9
    assert np.mean(np.array(answers) == data.train["label"].to_numpy()) < 0.2


def test_a_teacher_trained_on_other_labels_is_one_clear_error(setup, tiny_overrides, tmp_path):
    _, data, encoder = setup
    moods = tmp_path / "moods.csv"
    pd.DataFrame(toy_rows(per_label=10, topics=MOODS)).to_csv(moods, index=False)
    config = load_config(None, tiny_overrides)
    fine_tune(
        config, prepare_data(DataConfig(path=moods)), encoder, VersionFolder(tmp_path / "moods"), show_progress=False
    )
    student = load_config(None, [*tiny_overrides, f"train.teachers=[{tmp_path / 'moods'}]"])
    with pytest.raises(TuneloopError, match="train.teachers: moods was trained on other labels than this data's"):
        fine_tune(student, data, encoder, VersionFolder(tmp_path / "student"), show_progress=False)


@pytest.mark.parametrize(
    ("teacher", "says"),
    [
        ("nosuch@9", "no model named 'nosuch'"),
        ("toy@production", "no model named 'toy'"),
        ("'; DROP TABLE x;--", "is not a model reference"),
        ("../../etc", "is not a model reference"),
    ],
)
def test_a_teacher_that_names_no_model_is_refused_before_the_data_is_prepared(
    tiny_overrides, monkeypatch, teacher, says
):
    def prepared(*_args, **_kwargs):
        raise AssertionError("the data was prepared before the teachers were checked")

    monkeypatch.setattr(classification, "prepare_for_model", prepared)
    recipe = load_config(None, tiny_overrides)
    recipe.train.teachers = [teacher]
    with pytest.raises(TuneloopError, match=f"^train.teachers: {re.escape(teacher)}: .*{re.escape(says)}"):
        classification.run(recipe, show_progress=False)


def test_teachers_under_differential_privacy_are_refused(tiny_overrides):
    with pytest.raises(TuneloopError, match="train.teachers with train.dp"):
        load_config(None, [*tiny_overrides, "train.teachers=[toy@1]", "train.dp.epsilon=8"])
