"""Differentially private training (train.dp, DP-SGD with Opacus) on the tiny model: the guarantee is counted
and recorded, each text's influence is clipped, nothing reads the training texts without noise, runs resume
exactly, and bad settings are one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from helpers import crashed_then_resumed
from tuneloop.cli import app
from tuneloop.config import DataConfig, DPConfig, load_config
from tuneloop.data.prepare import prepare_data
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import TextClassifier, predict_proba
from tuneloop.models.encoders import EncoderSource
from tuneloop.registry import Registry, VersionFolder
from tuneloop.training import private as dpsgd
from tuneloop.training.classification import fine_tune
from tuneloop.training.private import PrivateTraining

runner = CliRunner()
DP = ["train.dp.epsilon=8", "train.epochs=3"]


@pytest.fixture(params=["per-text gradients", "ghost clipping"])
def clipping(request, monkeypatch) -> str:
    """Both ways Opacus bounds each text's gradient (the choice follows the number of trainable weights)."""
    if request.param == "ghost clipping":
        monkeypatch.setattr(dpsgd, "GHOST_CLIPPING_ABOVE", 0)
    return request.param


@pytest.fixture()
def setup(tiny_overrides, toy_csv, tiny_encoder):
    config = load_config(None, [*tiny_overrides, *DP])
    data = prepare_data(DataConfig(path=toy_csv))
    return config, data, EncoderSource("tiny", tiny_encoder)


def test_a_private_version_records_the_privacy_it_spent(tiny_overrides, home):
    result = runner.invoke(app, ["train", *tiny_overrides, *DP, "train.dp.delta=1e-3"])
    assert result.exit_code == 0, result.output
    version = Registry(load_config(None, tiny_overrides).registry).get("toy@1")
    spent = version.metrics["dp_epsilon"]
    assert f"differential privacy: ε = {spent:.2f} spent of 8" in result.output
    assert 0.5 * 8 < spent <= 8 * 1.01  # every planned step ran: nearly the whole budget, never more
    assert version.metrics["dp_delta"] == 1e-3
    folder = Registry(load_config(None, tiny_overrides).registry).folder(version)
    report = json.loads(folder.report_json.read_text())
    assert report["privacy"]["epsilon"] == spent and report["privacy"]["steps"] > 0
    assert report["privacy"]["noise_multiplier"] > 0.3
    assert "ε" in folder.report_html.read_text()
    assert "baseline" not in report  # its n-gram vocabulary would carry the training texts without privacy
    model, tokenizer = TextClassifier.load(folder.model)
    assert predict_proba(model, tokenizer, ["my parcel is late"]).shape == (1, len(model.spec.labels))


def test_nothing_reads_the_training_texts_without_noise(setup, tmp_path, tiny_encoder, clipping):
    config, data, encoder = setup
    result = fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)
    trained, _ = TextClassifier.load(result.best_dir)
    untouched = TextClassifier(trained.encoder.__class__.from_pretrained(tiny_encoder), trained.spec)
    for name, module in trained.encoder.named_modules():
        if isinstance(module, torch.nn.Embedding):  # which rows a text touches is information: all frozen
            assert torch.equal(module.weight, untouched.encoder.get_submodule(name).weight), name
    layer = "encoder.layer.0.attention.self.query.weight"  # while the transformer layers did train
    assert not torch.equal(trained.encoder.get_parameter(layer), untouched.encoder.get_parameter(layer))
    assert result.privacy.epsilon <= 8 * 1.01


def test_each_texts_influence_on_a_step_is_clipped(clipping):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = PrivateTraining(
        DPConfig(epsilon=1e4, max_grad_norm=0.5, accountant="rdp"),
        model,
        optimizer,
        torch.nn.CrossEntropyLoss(),
        [1] * 100,
        10,
        1,
        seed=0,
    )
    inputs = torch.randn(10, 4)
    inputs[0] *= 1e4  # one text with an enormous gradient
    before = [p.detach().clone() for p in model.parameters()]
    private.step(lambda rows: (model(inputs[rows]), torch.zeros(len(rows), dtype=torch.long)), list(range(10)))
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    # The update is the mean of clipped gradients (+ almost no noise at this ε): at most 0.5 however large one is.
    assert 0 < moved <= 0.5 * 1.05
    assert private.ghost_clipping == (clipping == "ghost clipping")


def test_batches_are_poisson_samples():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private = PrivateTraining(
        DPConfig(epsilon=8), model, optimizer, torch.nn.CrossEntropyLoss(), [1] * 1000, 50, 100, 0
    )
    sizes = [len(batch) for _ in range(5) for batch in private.epoch_batches()]
    assert len(sizes) == 5 * 20 and len(set(sizes)) > 5  # sizes vary, as every text joins by a coin toss
    assert 45 < sum(sizes) / len(sizes) < 55


def test_an_empty_batch_still_steps_with_noise_and_is_counted(clipping):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = PrivateTraining(DPConfig(epsilon=8), model, optimizer, torch.nn.CrossEntropyLoss(), [1] * 100, 10, 10, 0)
    before = model.weight.detach().clone()
    private.step(lambda rows: (model(torch.randn(len(rows), 4)), torch.zeros(len(rows), dtype=torch.long)), [])
    assert not torch.equal(model.weight, before) and private.spent().steps == 1


def test_a_private_run_resumes_exactly(setup, tmp_path, clipping):
    config, data, encoder = setup
    config.train.checkpoint_every = 2
    straight = fine_tune(config, data, encoder, VersionFolder(tmp_path / "straight"), show_progress=False)
    resumed = crashed_then_resumed(config, data, encoder, tmp_path / "crashed", at_step=7)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in straight.history])
    assert resumed.privacy == straight.privacy
    a, _ = TextClassifier.load(straight.best_dir)
    b, _ = TextClassifier.load(resumed.best_dir)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name


def test_lora_trains_privately(tiny_overrides):
    result = runner.invoke(app, ["train", *tiny_overrides, *DP, "train.method=lora"])
    assert result.exit_code == 0, result.output
    version = Registry(load_config(None, tiny_overrides).registry).get("toy@1")
    assert 0 < version.metrics["dp_epsilon"] <= 8 * 1.01


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.dp.epsilon=0"], "'train.dp.epsilon': Input should be greater than 0"),
        (["train.dp.epsilon=-1"], "'train.dp.epsilon': Input should be greater than 0"),
        (["train.dp.delta=0.001"], "'train.dp.epsilon': Field required"),
        (["train.dp.epsilon=8", "train.class_weighted=true"], "set train.class_weighted=false"),
        (["train.dp.epsilon=8", "data.kfold=3"], "unset data.kfold"),
        (["train.dp.epsilon=8", "train.batch_size=5000"], "must be smaller than the training split"),
    ],
)
def test_bad_private_settings_are_one_clear_error(tiny_overrides, home, overrides, message):
    result = runner.invoke(app, ["train", *tiny_overrides, *overrides])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (home / "models" / "toy").exists()  # nothing registered


def test_a_layer_dp_sgd_cannot_train_is_one_clear_error(setup, tmp_path, monkeypatch):
    config, data, encoder = setup
    from tuneloop.training import classification

    build = classification.build_classifier

    def with_batch_norm(*args, **kwargs):
        model, tokenizer = build(*args, **kwargs)
        model.dropout = torch.nn.BatchNorm1d(model.encoder.config.hidden_size)  # mixes the texts of a batch
        return model, tokenizer

    monkeypatch.setattr(classification, "build_classifier", with_batch_norm)
    with pytest.raises(TuneloopError, match="trainable layer DP-SGD cannot train privately.*BatchNorm1d"):
        fine_tune(config, data, encoder, VersionFolder(tmp_path / "run"), show_progress=False)


def test_noisy_centroids_are_paid_for_from_the_same_budget():
    def private(centroid_init: bool) -> PrivateTraining:
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return PrivateTraining(
            DPConfig(epsilon=3), model, optimizer, torch.nn.CrossEntropyLoss(), [1] * 1000, 50, 100, 0, centroid_init
        )

    plain, with_centroids = private(False), private(True)
    assert with_centroids.noise_multiplier > plain.noise_multiplier  # the steps get less of the budget
    embeddings, labels = torch.randn(1000, 4), torch.randint(0, 2, (1000,))
    centroids = with_centroids.noisy_centroids(embeddings, labels, 2)
    exact = torch.zeros(2, 4).index_add_(0, labels, torch.nn.functional.normalize(embeddings, dim=-1))
    assert centroids.shape == (2, 4) and not torch.allclose(centroids, exact)
    spent = with_centroids.spent()
    assert spent.steps == 0 and 0 < spent.epsilon < 3  # the release is counted before any step
