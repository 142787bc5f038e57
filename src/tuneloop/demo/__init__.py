"""The bundled demo: bilingual customer-service intents and sentiment, trained, evaluated, registered, and
put behind a support assistant with the bundled FAQ."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.config import TuneloopConfig, load_config

if TYPE_CHECKING:  # the assistant pulls in torch and the server; `tuneloop --help` should not wait for them
    from tuneloop.assistant.turn import TurnOutcome
    from tuneloop.registry.store import Registry

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


def packaged_file(*parts: str) -> Path:
    return Path(str(resources.files("tuneloop").joinpath(*parts)))


def demo_config(path: Path | None = None, overrides: list[str] | None = None, kind: str = "intents") -> TuneloopConfig:
    """The shipped demo config for `kind` (intents or sentiment), or the user's file, with the bundled
    data filled in."""
    shipped = {"intents": ("demo.yaml", "support_intents.csv"), "sentiment": ("demo_sentiment.yaml", "sentiment.csv")}
    config_file, data_file = shipped[kind]
    config = load_config(path or packaged_file("configs", config_file), overrides)
    if config.data.path is None:
        config.data.path = packaged_file("demo", "data", data_file)
    return config


def demo_assistant() -> Path:
    return packaged_file("demo", "assistant.yaml")


@dataclass
class DemoTurn:
    session: str
    message: str
    outcome: TurnOutcome


def demo_conversation(registry: Registry) -> list[DemoTurn]:
    """Build the demo assistant over the promoted models and play DEMO_CHAT through it."""
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
    return turns
