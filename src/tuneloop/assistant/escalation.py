"""When the assistant hands the conversation to a human, and why."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuneloop.data.clean import clean_text

# Specific phrases, not bare words: "人工" alone is also in "人工智能", "operator" in "mobile operator".
DEFAULT_KEYWORDS = {
    "en": ["human", "agent", "real person", "representative", "speak to someone", "talk to someone"],
    "zh": ["转人工", "人工客服", "人工服务", "找人工", "真人客服", "客服人员"],
}


@dataclass(frozen=True)
class TurnSignals:
    """What one turn learned about the message, as escalation needs it."""

    message: str
    lang: str
    intent: str | None  # None when out of scope
    confidence: float
    sentiment: str


@dataclass(frozen=True)
class EscalationPolicy:
    min_confidence: float = 0.5
    negative_turns: int = 2
    keywords: dict[str, list[str]] | None = None
    intents: tuple[str, ...] = ()  # intents that always mean "a person, please" (e.g. talk_to_human)

    def asks_for_a_person(self, message: str) -> bool:
        """Any language's phrases count: "I want a human agent, 订单 12345" is a request whatever its language."""
        text = clean_text(message).casefold()
        for lang, words in (self.keywords or DEFAULT_KEYWORDS).items():
            if lang == "zh" and any(word in text for word in words):
                return True
            if lang != "zh" and any(re.search(rf"\b{re.escape(word.casefold())}s?\b", text) for word in words):
                return True
        return False

    def reason(self, turn: TurnSignals, recent_sentiments: list[str]) -> str | None:
        """The first rule that fires, or None; `recent_sentiments` are earlier turns', oldest first."""
        if self.asks_for_a_person(turn.message) or (turn.intent is not None and turn.intent in self.intents):
            return "asked for a person"
        if turn.intent is None:
            return "out of scope"
        if turn.confidence < self.min_confidence:
            return "low confidence"
        streak = [*recent_sentiments, turn.sentiment][-self.negative_turns :]
        if self.negative_turns and len(streak) == self.negative_turns and all(s == "negative" for s in streak):
            return f"negative for {self.negative_turns} turns in a row"
        return None
