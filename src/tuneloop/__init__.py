"""tuneloop: from a company's own text to a deployed, self-improving language model.

The Python API is the same code the `tuneloop` command runs:

    import tuneloop

    recipe = tuneloop.load_config("train.yaml", ["data.path=tickets.csv", "name=tickets"])
    outcome = tuneloop.train(recipe)                 # data → fine-tune → evaluate → register
    tuneloop.Registry(recipe.registry).promote(outcome.version.ref)
    model = tuneloop.load_model("tickets@production")
    model.predict(["my card hasn't arrived"]), model.predict_proba(["我的卡还没到"]), model.classes_

Importing tuneloop changes nothing in the process (no environment variables, no matplotlib backend) and
loads nothing heavy: the names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tuneloop.config import ClassifierRecipe, load_config
    from tuneloop.errors import TuneloopError
    from tuneloop.models.predictor import Predictor, load_model
    from tuneloop.registry import Registry
    from tuneloop.training.classification import run as train

_EXPORTS = {
    "load_config": ("tuneloop.config", "load_config"),
    "ClassifierRecipe": ("tuneloop.config", "ClassifierRecipe"),
    "train": ("tuneloop.training.classification", "run"),
    "load_model": ("tuneloop.models.predictor", "load_model"),
    "Predictor": ("tuneloop.models.predictor", "Predictor"),
    "Registry": ("tuneloop.registry", "Registry"),
    "TuneloopError": ("tuneloop.errors", "TuneloopError"),
}
__all__ = [
    "ClassifierRecipe",
    "Predictor",
    "Registry",
    "TuneloopError",
    "__version__",
    "load_config",
    "load_model",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tuneloop' has no attribute '{name}'")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)
