"""Real packaged encoder on a real data slice, through the CLI (skipped without ../shared)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import SHARED
from tuneloop.cli import app

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not (SHARED / "banking77").is_dir(), reason="../shared/datasets/banking77 is not present")
def test_minilm_finetunes_on_a_banking77_slice(tmp_path, home):
    train = pd.read_csv(SHARED / "banking77" / "train.csv")
    intents = sorted(train["category"].unique())[:8]
    subset = train[train["category"].isin(intents)].groupby("category").head(30)
    path = tmp_path / "banking.csv"
    subset.to_csv(path, index=False)
    result = CliRunner().invoke(app, ["train", f"data.path={path}", "data.label_column=category", "name=bank",
                                      "model.name=auto", "train.epochs=1", "model.max_length=48"])
    assert result.exit_code == 0, result.output
    report = json.loads((home / "models" / "bank" / "v1" / "report.json").read_text())
    assert report["base_model"] == "all-MiniLM-L6-v2"
    assert report["test"]["accuracy"] >= 0.7  # 8 intents: chance is 12.5%


def test_demo_trains_both_models_and_builds_the_assistant(tiny_encoder, home):
    """The demo end to end with the tiny encoder for speed (the FAQ search still uses packaged e5)."""
    result = CliRunner().invoke(app, ["demo", f"model.name={tiny_encoder}", "train.epochs=1", "train.threads=1"])
    assert result.exit_code == 0, result.output
    assert "registered and promoted: support-intents@1" in result.output
    assert "support-sentiment@1" in result.output and "A few turns" in result.output
    assert "chat with it: tuneloop serve serve.assistant=" in result.output
    assert list((home / "assistants" / "support" / "scope").glob("support-intents@1-*.json"))
