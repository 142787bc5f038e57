"""When the assistant hands the conversation to a human, and why."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuneloop.data.clean import clean_text

DEFAULT_KEYWORDS = {
    "en": ["human", "agent", "real person", "representative", "operator", "speak to someone", "talk to someone"],
    "zh": ["人工", "转人工", "真人", "客服人员", "人工客服"],
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

    def asks_for_a_person(self, message: str, lang: str) -> bool:
        words = (self.keywords or DEFAULT_KEYWORDS).get(lang, [])
        text = clean_text(message).casefold()
        if lang == "zh":
            return any(word in text for word in words)
        return any(re.search(rf"\b{re.escape(word.casefold())}s?\b", text) for word in words)

    def reason(self, turn: TurnSignals, recent_sentiments: list[str]) -> str | None:
        """The first rule that fires, or None; `recent_sentiments` are earlier turns', oldest first."""
        if self.asks_for_a_person(turn.message, turn.lang) or (turn.intent is not None and turn.intent in self.intents):
            return "asked for a person"
        if turn.intent is None:
            return "out of scope"
        if turn.confidence < self.min_confidence:
            return "low confidence"
        streak = [*recent_sentiments, turn.sentiment][-self.negative_turns:]
        if self.negative_turns and len(streak) == self.negative_turns and all(s == "negative" for s in streak):
            return f"negative for {self.negative_turns} turns in a row"
        return None
