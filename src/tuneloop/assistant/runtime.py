"""An assistant ready to answer: its FAQ index built, its scope thresholds tuned per intent-model version.

The server's chat service gets the models' outputs through its micro-batchers and calls `plan` (then has the
reply generated, whole or streamed); `respond` does the same turn with the models run here (benchmarks, the
demo).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from tuneloop.assistant.definition import AssistantDefinition, ScopeConfig
from tuneloop.assistant.generate import LocalGenerator, OpenAICompatibleGenerator, ReplyGenerator, TemplateGenerator
from tuneloop.assistant.retrieval import FaqIndex, load_faq
from tuneloop.assistant.scope import ScopeThreshold, tune_threshold
from tuneloop.assistant.turn import (
    DEFAULT_FAQ_SIMILARITY,
    FALLBACK_FAQ_SIMILARITY,
    TurnOutcome,
    detect_language,
    plan_turn,
    scope_score,
)
from tuneloop.atomic import write_text_atomically
from tuneloop.data.clean import clean_text
from tuneloop.data.load import read_table
from tuneloop.data.off_topic import off_topic_messages
from tuneloop.data.prepare import load_prepared
from tuneloop.errors import TuneloopError
from tuneloop.models.classifier import HeadSpec
from tuneloop.models.embedder import SentenceEmbedder
from tuneloop.models.encoders import resolve_encoder
from tuneloop.models.lm import resolve_lm
from tuneloop.models.predictor import Predictor, load_model
from tuneloop.registry import Home, Registry

log = logging.getLogger(__name__)


REJECTED_SCORE = -2.0  # below any probability or cosine


def tuning_scores(logits: np.ndarray, spec: HeadSpec, scope: ScopeConfig) -> np.ndarray:
    """The scores the scope threshold is tuned on. A message the model files under the trained out-of-scope
    label is turned away whatever its score, so tuning sees it as rejected: counted as accepted, confident
    out-of-scope predictions would push the threshold up for nothing."""
    scores = np.array([scope_score(row, spec, scope.score) for row in logits])
    if scope.label in spec.labels:
        scores[logits.argmax(1) == spec.labels.index(scope.label)] = REJECTED_SCORE
    return scores


def build_generator(definition: AssistantDefinition, registry: Registry) -> ReplyGenerator:
    settings = definition.generator
    if settings.kind == "local":
        return LocalGenerator(resolve_lm(settings.model, registry), settings.max_new_tokens, settings.temperature)
    if settings.kind == "openai":
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not key:
            raise TuneloopError(f"generator.api_key_env names {settings.api_key_env}, which is not set")
        return OpenAICompatibleGenerator(
            settings.base_url,
            settings.model,
            api_key=key,
            timeout=settings.timeout,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
        )
    return TemplateGenerator()


def out_of_scope_texts(path: Path | None) -> list[str]:
    if path is None:
        return []
    frame = read_table(path)
    if "text" not in frame.columns:
        raise TuneloopError(f"{path}: out-of-scope examples need a 'text' column (columns: {', '.join(frame.columns)})")
    return [t for t in (clean_text(str(x)) for x in frame["text"]) if t]


class AssistantRuntime:
    def __init__(self, definition: AssistantDefinition, registry: Registry) -> None:
        self.definition = definition
        self.registry = registry
        self.folder = Home(registry.home).assistant(definition.name)
        entries = load_faq(definition.faq)
        source = resolve_encoder(definition.retrieval.encoder, registry, [e.question for e in entries])
        self.embedder = SentenceEmbedder(source)
        self.faq = FaqIndex(entries, self.embedder, cache_dir=self.folder / "faq-index")
        self.faq_similarity = definition.retrieval.min_similarity or DEFAULT_FAQ_SIMILARITY.get(
            source.name, FALLBACK_FAQ_SIMILARITY
        )
        self.generator = build_generator(definition, registry)
        self.out_of_scope = out_of_scope_texts(definition.out_of_scope_examples)
        self.thresholds: dict[str, ScopeThreshold | None] = {}

    def calibrate(self, intent: Predictor) -> ScopeThreshold | None:
        """Tune (or read back) the scope threshold of one intent-model version: its validation split as the
        in-scope side, the definition's out-of-scope examples as the other."""
        if intent.ref in self.thresholds:
            return self.thresholds[intent.ref]
        if self.multitask and self.definition.sentiment_task not in intent.tasks:
            raise TuneloopError(
                f"the assistant takes sentiment from {intent.ref}'s '{self.definition.sentiment_task}' "
                f"task, and it has none (tasks: {', '.join(intent.tasks) or 'none'}); set "
                f"sentiment_model to a sentiment classifier or sentiment_task to one of its tasks"
            )
        scope = self.definition.scope
        if scope.label and scope.label not in intent.labels:
            raise TuneloopError(
                f"scope.label '{scope.label}' is not a label of {intent.ref} "
                f"({', '.join(intent.labels)}); train it as an intent or unset scope.label"
            )
        if scope.score == "cosine" and (intent.spec.head != "cosine" or intent.blend is not None):
            raise TuneloopError(
                f"scope.score=cosine needs a cosine head's scores, and {intent.ref} serves "
                f"{'a blend with its baseline' if intent.blend else f'a {intent.spec.head} head'}; use "
                "scope.score=probability"
            )
        out_of_scope = self.out_of_scope + self.shipped_off_topic()
        if not out_of_scope and not scope.label:
            log.warning(
                "%s: no out-of-scope examples (out_of_scope_examples, scope.shipped_off_topic) and no "
                "scope.label, so no scope threshold: every message counts as in scope",
                self.definition.name,
            )
            self.thresholds[intent.ref] = None
            return None
        # Keyed by everything the threshold depends on, so editing the definition or the examples re-tunes it.
        inputs = json.dumps([scope.model_dump(), out_of_scope], ensure_ascii=False)
        cached = self.folder / "scope" / f"{intent.ref}-{hashlib.sha256(inputs.encode()).hexdigest()[:12]}.json"
        threshold = self._read_cached(cached)
        if threshold is None:
            data = load_prepared(intent.folder.data())
            split = data.val if len(data.val) else data.test
            if split.empty:
                raise TuneloopError(f"{intent.ref} has no validation or test split to tune the scope threshold on")
            # Validation messages labelled with the trained out-of-scope intent belong on the other side.
            trained_out = (split["label"] == scope.label).to_numpy() if scope.label else np.zeros(len(split), bool)
            in_texts = split.loc[~trained_out, "text"].tolist()
            out_texts = split.loc[trained_out, "text"].tolist() + out_of_scope
            scores = tuning_scores(intent.own_logits(intent.logits(in_texts + out_texts)), intent.spec, scope)
            threshold = tune_threshold(
                scores[: len(in_texts)], scores[len(in_texts) :], scope.target_precision, scope.out_of_scope_share
            )
            write_text_atomically(cached, json.dumps(threshold.to_dict(), indent=2))
        log.info(
            "%s: scope threshold %.3f (in-scope precision %.3f on tuning data)",
            intent.ref,
            threshold.threshold,
            threshold.precision,
        )
        self.thresholds[intent.ref] = threshold
        return threshold

    def shipped_off_topic(self) -> list[str]:
        """The shipped off-topic messages' tuning part in the assistant's languages, for an assistant with no
        out-of-scope examples of its own (scope.shipped_off_topic). Mixed into a user's own examples, these
        easy negatives lowered the threshold below what that kind of traffic needs (bench/assistant_eval.py:
        the unseen intents' recall fell and in-scope precision missed its target)."""
        if not self.definition.scope.shipped_off_topic or self.out_of_scope or self.definition.scope.label:
            return []
        return off_topic_messages("tune", self.definition.languages)["text"].map(clean_text).tolist()

    @property
    def multitask(self) -> bool:
        """Intent and sentiment from one multi-task model: one encoder pass gives both."""
        return self.definition.sentiment_model == self.definition.intent_model

    def split(
        self, intent: Predictor, rows: np.ndarray, sentiment_output: tuple[Predictor, np.ndarray] | None
    ) -> tuple[np.ndarray, Predictor, np.ndarray]:
        """(intent logits, sentiment model, sentiment logits) from the models' outputs; a multi-task intent
        model brings the sentiment in its own rows (and there is no sentiment output)."""
        if self.multitask:
            return (intent.own_logits(rows), *intent.task(self.definition.sentiment_task, rows))
        sentiment, sentiment_rows = sentiment_output
        return intent.own_logits(rows), sentiment, sentiment.own_logits(sentiment_rows)

    @property
    def turns_to_recall(self) -> int:
        """Earlier turns a new turn needs: the history shown to the generator and the negative streak."""
        return max(self.definition.history_turns, self.definition.escalation.negative_turns - 1)

    @staticmethod
    def _read_cached(path: Path) -> ScopeThreshold | None:
        """A cached threshold, or None when there is none or it cannot be read (then it is tuned again)."""
        try:
            return ScopeThreshold(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def plan(
        self,
        message: str,
        intent: Predictor,
        intent_logits: np.ndarray,
        sentiment: Predictor,
        sentiment_logits: np.ndarray,
        query_vector: np.ndarray,
        recent_sentiments: list[str],
        history: list[tuple[str, str]],
    ) -> TurnOutcome:
        """The turn decided, its reply not yet generated (see plan_turn)."""
        lang = detect_language(message, self.definition.languages)
        hits = self.faq.search(message, self.definition.retrieval.top_k, lang, query_vector)
        return plan_turn(
            self.definition,
            message,
            lang,
            intent.labels,
            intent_logits,
            intent.spec,
            self.calibrate(intent),
            sentiment.labels,
            sentiment_logits,
            hits,
            self.faq_similarity,
            recent_sentiments,
            history,
        )

    def load_models(self) -> tuple[Predictor, Predictor | None]:
        """The production intent and sentiment versions, for `respond` (no sentiment model when the intent
        model is multi-task)."""
        intent = load_model(f"{self.definition.intent_model}@production", self.registry)
        if self.multitask:
            return intent, None
        return intent, load_model(f"{self.definition.sentiment_model}@production", self.registry)

    def respond(
        self,
        message: str,
        intent: Predictor,
        sentiment: Predictor | None,
        recent_sentiments: list[str] | None = None,
    ) -> TurnOutcome:
        """One whole turn with the models run here: one encoder pass each, or one for both when multi-task."""
        text = clean_text(message)
        sentiment_output = None if sentiment is None else (sentiment, sentiment.logits([text]))
        intent_logits, sentiment, sentiment_logits = self.split(intent, intent.logits([text]), sentiment_output)
        outcome = self.plan(
            text,
            intent,
            intent_logits[0],
            sentiment,
            sentiment_logits[0],
            self.embedder.encode([text])[0],
            recent_sentiments or [],
            [],
        )
        if outcome.request is not None:
            outcome.reply = self.generator.generate(outcome.request)
        return outcome
