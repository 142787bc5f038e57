"""One turn of the assistant, from the models' outputs to the reply: pure, so the server and the
benchmark decide the same way.

The models run elsewhere (batched in the server, directly in the benchmark); this module gets their
logits and the FAQ hits and decides: in scope or not, which intent, how the user feels, whether to
answer from the FAQ, what to say, and whether to hand over to a person.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tuneloop.assistant.definition import AssistantDefinition
from tuneloop.assistant.escalation import EscalationPolicy, TurnSignals
from tuneloop.assistant.generate import ReplyRequest, compose
from tuneloop.assistant.retrieval import FaqHit
from tuneloop.assistant.scope import ScopeThreshold
from tuneloop.data.clean import cjk_share
from tuneloop.models.classifier import HeadSpec, softmax

# Cosine at which an FAQ entry may answer, per packaged encoder. e5's cosines crowd near the top of the
# range, MiniLM's spread out. Measured on the demo (each support message against the demo FAQ): at these
# values half the messages clear the bar, and for those the top entry's intent is the message's in 87%
# (e5, 753 messages in both languages) and 94% (MiniLM, 378 English) of cases; the reply also requires
# the entry's intent to agree with the classifier's.
DEFAULT_FAQ_SIMILARITY = {"multilingual-e5-small": 0.89, "all-MiniLM-L6-v2": 0.5}
FALLBACK_FAQ_SIMILARITY = 0.75


def detect_language(text: str, languages: Sequence[str]) -> str:
    """zh for a message with any Chinese characters (when zh is supported), else the first language."""
    if "zh" in languages and cjk_share([text]) > 0:
        return "zh"
    return "en" if "en" in languages else languages[0]


def scope_score(logits: np.ndarray, spec: HeadSpec, kind: str) -> float:
    """The confidence the scope threshold applies to: top probability, or cosine to the closest class."""
    if kind == "cosine" and spec.head == "cosine":
        return float(logits.max() / spec.cosine_scale)
    return float(softmax(logits).max())


@dataclass
class TurnOutcome:
    reply: str
    lang: str
    intent: str | None  # None: out of scope
    predicted_intent: str
    confidence: float  # top intent probability
    scope_score: float
    sentiment: str
    sentiment_confidence: float
    escalate: bool
    reason: str | None
    faq: list[FaqHit] = field(default_factory=list)
    faq_answer: FaqHit | None = None  # the entry the reply came from
    request: ReplyRequest | None = None  # what the generator was asked to write (None for a hand-over)


def _text(texts: dict[str, str], lang: str) -> str:
    return texts.get(lang) or texts.get("en") or next(iter(texts.values()), "")


def plan_turn(
    definition: AssistantDefinition,
    message: str,
    lang: str,
    intent_labels: list[str],
    intent_logits: np.ndarray,
    intent_spec: HeadSpec,
    threshold: ScopeThreshold | None,
    sentiment_labels: list[str],
    sentiment_logits: np.ndarray,
    hits: list[FaqHit],
    faq_similarity: float,
    recent_sentiments: list[str],
    history: list[tuple[str, str]] | None = None,
) -> TurnOutcome:
    """Everything after the forward passes but the generated words: scope, escalation, FAQ or template, tone.

    A hand-over's reply is fixed here; otherwise `request` says what the generator should write.
    """
    intent_probs = softmax(intent_logits)
    top = int(intent_probs.argmax())
    predicted, confidence = intent_labels[top], float(intent_probs[top])
    score = scope_score(intent_logits, intent_spec, definition.scope.score)
    in_scope = (threshold is None or score >= threshold.threshold) and predicted != definition.scope.label
    intent = predicted if in_scope else None
    sentiment_probs = softmax(sentiment_logits)
    mood = int(sentiment_probs.argmax())
    sentiment = sentiment_labels[mood]

    policy = EscalationPolicy(
        min_confidence=definition.escalation.min_confidence,
        negative_turns=definition.escalation.negative_turns,
        keywords=definition.escalation.keywords,
        intents=tuple(definition.escalation.intents),
    )
    reason = policy.reason(TurnSignals(message, lang, intent, confidence, sentiment), recent_sentiments)
    templates = definition.templates
    tone = _text(templates.tone.get(sentiment, {}), lang) if sentiment in templates.tone else ""
    # The FAQ answers with the best-ranked entry that is close enough and, if it names an intent, agrees.
    best = next(
        (h for h in hits if intent is not None and h.similarity >= faq_similarity and h.entry.intent in (None, intent)),
        None,
    )
    reply, request = "", None
    if reason is not None or intent is None:  # no intent means out of scope: the policy gave a reason
        # A hand-over keeps only an apology: cheerfulness reads wrong when we cannot help.
        body = _text(templates.out_of_scope if reason == "out of scope" else templates.escalate, lang)
        reply = compose(
            ReplyRequest(message, lang, intent, sentiment, None, body, tone if sentiment == "negative" else "")
        )
    else:
        request = ReplyRequest(
            message=message,
            lang=lang,
            intent=intent,
            sentiment=sentiment,
            faq_answer=best.entry.answer if best is not None else None,
            template=_text(templates.intents.get(intent, templates.fallback), lang),
            tone=tone,
            history=history or [],
        )
    return TurnOutcome(
        reply=reply,
        lang=lang,
        intent=intent,
        predicted_intent=predicted,
        confidence=confidence,
        scope_score=score,
        sentiment=sentiment,
        sentiment_confidence=float(sentiment_probs[mood]),
        escalate=reason is not None,
        reason=reason,
        faq=hits,
        faq_answer=best if reason is None else None,
        request=request,
    )
