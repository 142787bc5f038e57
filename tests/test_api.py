"""The public Python API: the names the README shows, and an import that changes nothing in the process."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

import tuneloop
from helpers import toy_rows


def test_importing_tuneloop_sets_no_environment_variable_and_loads_nothing_heavy():
    probe = (
        "import json, os, sys; before = dict(os.environ); import tuneloop; "
        "print(json.dumps({'env': sorted(set(os.environ.items()) ^ set(before.items())), "
        "'heavy': sorted(m for m in ('torch', 'matplotlib', 'transformers', 'sqlalchemy') if m in sys.modules)}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == {"env": [], "heavy": []}


def test_the_five_line_example_trains_registers_promotes_and_predicts(tiny_encoder, tmp_path):
    data = tmp_path / "tickets.csv"
    pd.DataFrame(toy_rows(per_label=20)).to_csv(data, index=False)
    recipe = tuneloop.load_config(
        None,
        [
            f"data.path={data}",
            "name=tickets",
            f"model.name={tiny_encoder}",
            f"registry.home={tmp_path / 'home'}",
            "train.epochs=2",
            "train.few_shot.mode=off",
            "train.threads=1",
            "serving.runtime=torch",
        ],
    )
    outcome = tuneloop.train(recipe, show_progress=False)
    tuneloop.Registry(recipe.registry).promote(outcome.version.ref)
    model = tuneloop.load_model("tickets@production", tuneloop.Registry(recipe.registry))
    assert isinstance(model, tuneloop.Predictor)
    assert model.predict(["refund my money"])[0] in model.classes_
    assert model.predict_proba(["我的卡还没到"]).shape == (1, 3)
    assert sorted(tuneloop.__all__) == sorted(
        [
            "ClassifierRecipe",
            "Predictor",
            "Registry",
            "TuneloopError",
            "__version__",
            "load_config",
            "load_model",
            "train",
        ]
    )
