"""When the assistant hands over to a person."""

from __future__ import annotations

import pytest

from tuneloop.assistant.escalation import EscalationPolicy, TurnSignals

POLICY = EscalationPolicy(min_confidence=0.5, negative_turns=2, intents=("talk_to_human",))


def signals(message="where is my parcel", lang="en", intent="delivery", confidence=0.9, sentiment="neutral"):
    return TurnSignals(message, lang, intent, confidence, sentiment)


@pytest.mark.parametrize(
    "message, lang",
    [("can I talk to a HUMAN please", "en"), ("agents?", "en"), ("给我转人工", "zh"), ("要真人客服", "zh")],
)
def test_explicit_requests_in_both_languages(message, lang):
    assert POLICY.reason(signals(message, lang), []) == "asked for a person"


def test_words_that_merely_contain_a_keyword_do_not_count():
    assert POLICY.reason(signals("that was not very humane of the courier"), []) is None
    assert POLICY.reason(signals("你们用人工智能客服吗", "zh"), []) is None
    assert POLICY.reason(signals("my mobile operator blocked the payment"), []) is None


def test_a_request_in_either_language_counts_whatever_the_message_language():
    assert POLICY.reason(signals("I want a human agent, 订单 12345", "zh"), []) == "asked for a person"
    assert POLICY.reason(signals("order 12345 转人工", "en"), []) == "asked for a person"


@pytest.mark.parametrize(
    "turn, history, reason",
    [
        (signals(intent=None), [], "out of scope"),
        (signals(confidence=0.3), [], "low confidence"),
        (signals(sentiment="negative"), ["negative"], "negative for 2 turns in a row"),
        (signals(sentiment="negative"), ["negative", "neutral"], None),
        (signals(sentiment="negative"), [], None),
        (signals(intent="talk_to_human"), [], "asked for a person"),
    ],
)
def test_rules(turn, history, reason):
    assert POLICY.reason(turn, history) == reason


def test_negative_streak_rule_can_be_switched_off():
    assert EscalationPolicy(negative_turns=0).reason(signals(sentiment="negative"), ["negative"] * 5) is None
