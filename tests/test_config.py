from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.assistant.definition import load_definition
from tuneloop.assistant.retrieval import load_faq
from tuneloop.config import (
    ClassifierRecipe,
    GateSettings,
    PretrainRecipe,
    ServerSettings,
    SftRecipe,
    dump_config,
    load_config,
    parse_overrides,
    stored_recipe,
)
from tuneloop.errors import TuneloopError

# The command each shipped YAML is for, by the first word of its file name.
ROOT_OF = {
    "train": ClassifierRecipe,
    "demo": ClassifierRecipe,
    "pretrain": PretrainRecipe,
    "sft": SftRecipe,
    "serve": ServerSettings,
    "gate": GateSettings,
}


def test_defaults_are_the_documented_ones():
    config = load_config()
    assert (config.name, config.model.name, config.model.head, config.model.max_length) == (
        "classifier",
        "auto",
        "cosine",
        128,
    )
    assert (config.train.epochs, config.train.lr, config.train.head_lr, config.train.patience) == (3, 1e-4, 2e-3, 2)
    assert (config.data.val_size, config.data.test_size, config.feedback.holdout) == (0.1, 0.15, 0.3)


def test_yaml_then_dotted_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: support\ntrain:\n  lr: 1.0e-5\n  epochs: 3\n")
    config = load_config(path, ["train.lr=3e-5", "data.text_column=body", "train.precision=bf16"])
    assert config.name == "support"
    assert config.train.lr == pytest.approx(3e-5)
    assert config.train.epochs == 3
    assert config.data.text_column == "body"
    assert config.train.precision == "bf16"


def test_typo_names_the_key_and_suggests():
    with pytest.raises(TuneloopError, match=r"unknown key 'train.lr_rate'.*did you mean 'train.lr'"):
        load_config(None, ["train.lr_rate=1e-4"])


def test_bad_value_names_the_key():
    with pytest.raises(TuneloopError, match=r"'train.epochs'"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize(
    ("key", "inert", "asked"),
    [("rdrop", 0, 1), ("frozen_layers", 0, 6), ("layer_lr_decay", 1.0, 0.9)],
)
def test_a_setting_that_measured_no_gain_loads_at_its_inert_value_and_refuses_any_other(key, inert, asked):
    # A version stored while the setting existed still loads (at the value that trained as today's loop does) ...
    stored = load_config().model_dump(mode="json")
    stored["train"][key] = inert
    assert key not in load_config(None, [], base=stored).train.model_dump()
    # ... and asking for it says it was removed and why, not that the key is a typo.
    with pytest.raises(TuneloopError, match=rf"train.{key} was removed \(.+; see the training guide\)"):
        load_config(None, [f"train.{key}={asked}"])


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


def test_resolved_recipe_round_trips_without_the_registry(tmp_path):
    config = load_config(
        None,
        [
            "name=x",
            "train.epochs=2",
            f"data.path={tmp_path / 'd.csv'}",
            "registry.database_url=postgresql+psycopg://user:secret@db/tl",
        ],
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert "registry" not in path.read_text() and "secret" not in path.read_text()
    assert load_config(path).stored() == config.stored()


def test_every_shipped_yaml_loads_as_its_commands_root_with_its_data_present():
    shipped = sorted(Path(str(resources.files("tuneloop") / "configs")).glob("*.yaml"))
    assert {path.stem.split("_")[0] for path in shipped} >= {"train", "pretrain", "sft", "serve", "demo"}
    for path in shipped:
        config = load_config(path, root=ROOT_OF[path.stem.split("_")[0]])
        data = [getattr(config, "data", None), *getattr(config, "tasks", {}).values()]
        for section in filter(None, data):
            assert section.path is None or section.path.is_file(), (path, section.path)


def test_relative_paths_in_a_file_are_the_files_and_in_overrides_the_working_directorys(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "c.yaml"
    path.write_text("data:\n  path: ../data/t.csv\n  test_path: /abs/test.csv\n")
    monkeypatch.chdir(tmp_path / "configs")
    config = load_config(path)
    assert config.data.path == tmp_path / "configs" / ".." / "data" / "t.csv"
    assert config.data.test_path == Path("/abs/test.csv")
    assert load_config(path, ["data.path=here.csv"]).data.path == Path("here.csv")
    served = tmp_path / "s.yaml"
    served.write_text("serve:\n  assistant: bot/assistant.yaml\n")
    assert load_config(served, root=ServerSettings).serve.assistant == tmp_path / "bot" / "assistant.yaml"


def test_each_command_takes_only_its_own_sections():
    with pytest.raises(TuneloopError, match=r"unknown key 'serve'"):
        load_config(None, ["serve.port=9000"])  # a training recipe has no server section
    with pytest.raises(TuneloopError, match=r"unknown key 'train'"):
        load_config(None, ["train.epochs=1"], root=SftRecipe)
    assert load_config(None, ["sft.epochs=1", "registry.home=h"], root=SftRecipe).sft.epochs == 1


def test_server_settings_come_from_the_file_then_the_environment_then_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELOOP_SERVE__PORT", "9100")
    monkeypatch.setenv("TUNELOOP_SERVE__RUNTIME", "onnx")
    monkeypatch.setenv("TUNELOOP_ADMIN_KEYS", "k1,k2")
    settings = load_config(None, ["serve.runtime=torch"], root=ServerSettings)
    assert (settings.serve.port, settings.serve.runtime, settings.serve.host) == (9100, "torch", "127.0.0.1")
    assert settings.admin_keys.get_secret_value() == "k1,k2" and "k1" not in repr(settings)
    monkeypatch.setenv("TUNELOOP_SERVE__PORT", "many")
    with pytest.raises(TuneloopError, match="serve.port"):
        load_config(None, [], root=ServerSettings)


def test_a_recipe_stored_by_an_older_version_loses_the_sections_it_never_used():
    old = load_config().model_dump(mode="json") | {
        "serve": {"port": 1},
        "gate": {},
        "sft": {},
        "pretrain": {},
        "registry": {"home": "/old"},
    }
    with pytest.raises(TuneloopError, match="unknown key"):
        load_config(None, [], base=old)
    assert load_config(None, ["train.epochs=1"], base=stored_recipe(old)).train.epochs == 1


def test_the_shipped_demo_assistant_loads_and_covers_every_demo_intent():
    definition = load_definition(Path(str(resources.files("tuneloop") / "demo" / "assistant.yaml")))
    intents = set(
        pd.read_csv(Path(str(resources.files("tuneloop") / "demo" / "data" / "support_intents.csv")))["intent"]
    )
    assert set(definition.templates.intents) == intents
    assert all(set(texts) == {"en", "zh"} for texts in definition.templates.intents.values())
    assert {entry.intent for entry in load_faq(definition.faq)} <= intents
    assert definition.out_of_scope_examples.is_file() and set(definition.escalation.intents) <= intents
