"""The bundled demo: bilingual customer-service intents and sentiment, trained, evaluated, registered, and
put behind a support assistant with the bundled FAQ.

`run` is the whole sequence; whoever calls it (the CLI) is told of each stage through a `DemoReport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tuneloop.config import ClassifierRecipe, load_config, split_overrides

if TYPE_CHECKING:  # the assistant pulls in torch and the server; `tuneloop --help` should not wait for them
    from tuneloop.assistant.scope import ScopeThreshold
    from tuneloop.assistant.turn import TurnOutcome
    from tuneloop.models.predictor import Prediction
    from tuneloop.registry import ModelVersion, Registry
    from tuneloop.training.classification import ClassifierOutcome

DEMO_EXAMPLES = [
    "where is my parcel? it was supposed to arrive yesterday",
    "I want my money back for the broken headphones",
    "can I use two coupon codes on one order?",
    "我的快递怎么还没到啊",
    "忘记密码了，登录不上去",
    "给我转人工客服",
]
# (session, message): one calm question, an angry customer twice, Chinese, off-topic, an explicit request.
DEMO_CHAT = [
    ("a", "how long does a refund take?"),
    ("b", "my order is STILL not here, this is ridiculous"),
    ("b", "third time I'm asking, where is my package??"),
    ("c", "发票什么时候能开好？"),
    ("d", "what's the weather in Paris tomorrow?"),
    ("e", "给我转人工客服"),
]
# Overrides for the server only: the demo's recipes take the rest.
SERVER_SECTIONS = ("serve",)


def packaged_file(*parts: str) -> Path:
    return Path(str(resources.files("tuneloop").joinpath(*parts)))


def demo_config(
    path: Path | None = None, overrides: list[str] | None = None, kind: str = "intents"
) -> ClassifierRecipe:
    """The shipped demo recipe for `kind` (intents or sentiment, on the bundled data), or the user's file."""
    shipped = {"intents": "demo.yaml", "sentiment": "demo_sentiment.yaml"}
    return load_config(path or packaged_file("configs", shipped[kind]), overrides)


def demo_assistant() -> Path:
    return packaged_file("demo", "assistant.yaml")


@dataclass
class DemoTurn:
    session: str
    message: str
    outcome: TurnOutcome


@dataclass
class DemoOutcome:
    recipe: ClassifierRecipe
    intents: ClassifierOutcome
    intents_version: ModelVersion
    sentiment: ClassifierOutcome
    sentiment_version: ModelVersion
    turns: list[DemoTurn]
    assistant: Path
    scope: ScopeThreshold  # where the assistant says no, and what it expects that to do


class DemoReport(Protocol):
    """What the caller hears while the demo runs (training prints its own progress in between)."""

    def stage(self, number: int, title: str) -> None: ...

    def intents_trained(
        self, outcome: ClassifierOutcome, version: ModelVersion, examples: list[Prediction]
    ) -> None: ...

    def sentiment_trained(self, outcome: ClassifierOutcome, version: ModelVersion) -> None: ...


def demo_conversation(registry: Registry) -> tuple[list[DemoTurn], ScopeThreshold]:
    """Build the demo assistant over the promoted models and play DEMO_CHAT through it; also its scope."""
    from tuneloop.assistant.definition import load_definition
    from tuneloop.assistant.runtime import AssistantRuntime

    runtime = AssistantRuntime(load_definition(demo_assistant()), registry)
    intent, sentiment = runtime.load_models()
    moods: dict[str, list[str]] = {}
    turns = []
    for session, message in DEMO_CHAT:
        outcome = runtime.respond(message, intent, sentiment, moods.setdefault(session, []))
        moods[session].append(outcome.sentiment)
        turns.append(DemoTurn(session, message, outcome))
    return turns, runtime.calibrate(intent)


def run(
    config_file: Path | None = None, overrides: list[str] | None = None, report: DemoReport | None = None
) -> DemoOutcome:
    """Train and promote the intent model, then the sentiment model, then play a conversation through the
    support assistant built on both. `overrides` apply to both recipes (serve.* ones are the server's)."""
    from tuneloop.models.predictor import load_model
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    _, recipe_overrides = split_overrides(overrides or [], SERVER_SECTIONS)
    recipe = demo_config(config_file, recipe_overrides)
    registry = Registry(recipe.registry)
    if report:
        report.stage(1, f"bilingual customer-service intents ({recipe.data.path})")
    intents = classification.run(recipe)
    assert intents.version is not None  # registered: the demo trains in one process
    intents_version = registry.promote(intents.version.ref)
    if report:
        examples = load_model(f"{intents_version.name}@production", registry).rank(DEMO_EXAMPLES)
        report.intents_trained(intents, intents_version, examples)
        report.stage(2, "sentiment (negative / neutral / positive)")
    sentiment = classification.run(demo_config(None, recipe_overrides, kind="sentiment"))
    assert sentiment.version is not None
    sentiment_version = registry.promote(sentiment.version.ref)
    if report:
        report.sentiment_trained(sentiment, sentiment_version)
        report.stage(3, "the support assistant")
    turns, scope = demo_conversation(registry)
    return DemoOutcome(recipe, intents, intents_version, sentiment, sentiment_version, turns, demo_assistant(), scope)
