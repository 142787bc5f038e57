"""The bundled demo: bilingual customer-service intents, trained, evaluated, registered, queried."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tuneloop.config import TuneloopConfig, load_config

DEMO_EXAMPLES = [
    "where is my parcel? it was supposed to arrive yesterday",
    "I want my money back for the broken headphones",
    "can I use two coupon codes on one order?",
    "我的快递怎么还没到啊",
    "忘记密码了，登录不上去",
    "给我转人工客服",
]


def packaged_file(*parts: str) -> Path:
    return Path(str(resources.files("tuneloop").joinpath(*parts)))


def demo_config(path: Path | None = None, overrides: list[str] | None = None) -> TuneloopConfig:
    """The shipped demo.yaml (or the user's file) with the bundled data filled in."""
    config = load_config(path or packaged_file("configs", "demo.yaml"), overrides)
    if config.data.path is None:
        config.data.path = packaged_file("demo", "data", "support_intents.csv")
    return config
