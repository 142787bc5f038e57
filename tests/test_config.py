from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.assistant.definition import load_definition
from tuneloop.assistant.retrieval import load_faq
from tuneloop.config import TuneloopConfig, dump_config, load_config, parse_overrides
from tuneloop.errors import TuneloopError


def test_defaults_validate():
    config = load_config()
    assert config.train.epochs >= 1
    assert config.model.name == "auto"


def test_yaml_then_dotted_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: support\ntrain:\n  lr: 1.0e-5\n  epochs: 3\n")
    config = load_config(path, ["train.lr=3e-5", "data.text_column=body", "train.bf16=true"])
    assert config.name == "support"
    assert config.train.lr == pytest.approx(3e-5)
    assert config.train.epochs == 3
    assert config.data.text_column == "body"
    assert config.train.bf16 is True


def test_typo_names_the_key_and_suggests():
    with pytest.raises(TuneloopError, match=r"unknown key 'train.lr_rate'.*did you mean 'train.lr'"):
        load_config(None, ["train.lr_rate=1e-4"])


def test_bad_value_names_the_key():
    with pytest.raises(TuneloopError, match=r"'train.epochs'"):
        load_config(None, ["train.epochs=many"])


def test_override_without_equals_is_rejected():
    with pytest.raises(TuneloopError, match="key=value"):
        parse_overrides(["train.lr"])


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(TuneloopError, match="mapping"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(TuneloopError, match="config file not found"):
        load_config(Path("nope.yaml"))


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["name=x", "train.epochs=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_every_shipped_yaml_config_loads():
    shipped = sorted(Path(str(resources.files("tuneloop") / "configs")).glob("*.yaml"))
    assert shipped, "the package ships at least the demo config"
    for path in shipped:
        assert isinstance(load_config(path), TuneloopConfig), path


def test_the_shipped_demo_assistant_loads_and_covers_every_demo_intent():
    definition = load_definition(Path(str(resources.files("tuneloop") / "demo" / "assistant.yaml")))
    intents = set(
        pd.read_csv(Path(str(resources.files("tuneloop") / "demo" / "data" / "support_intents.csv")))["intent"]
    )
    assert set(definition.templates.intents) == intents
    assert all(set(texts) == {"en", "zh"} for texts in definition.templates.intents.values())
    assert {entry.intent for entry in load_faq(definition.faq)} <= intents
    assert definition.out_of_scope_examples.is_file() and set(definition.escalation.intents) <= intents
