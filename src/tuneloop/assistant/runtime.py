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
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tuneloop.assistant.definition import AssistantDefinition, ScopeConfig, load_definition
from tuneloop.assistant.generate import LocalGenerator, OpenAICompatibleGenerator, ReplyGenerator, TemplateGenerator
from tuneloop.assistant.retrieval import FaqIndex, load_faq
from tuneloop.assistant.scope import ScopeMove, ScopeRefused, ScopeThreshold, moved_to, shortfalls, tune_scope
from tuneloop.assistant.turn import (
    DEFAULT_FAQ_SIMILARITY,
    FALLBACK_FAQ_SIMILARITY,
    TurnOutcome,
    detect_language,
    plan_turn,
    scope_score,
)
from tuneloop.atomic import write_text_atomically
from tuneloop.config import load_config, stored_recipe
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.load import read_table
from tuneloop.data.off_topic import off_topic_messages
from tuneloop.data.prepare import load_prepared
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.metrics import REJECTED_SCORE
from tuneloop.feedback.export import labelled_texts
from tuneloop.feedback.log import PredictionLog
from tuneloop.models.classifier import HeadSpec
from tuneloop.models.embedder import SentenceEmbedder
from tuneloop.models.encoders import resolve_encoder
from tuneloop.models.lm import resolve_lm
from tuneloop.models.predictor import Predictor, load_model
from tuneloop.registry import Home, Registry

log = logging.getLogger(__name__)


def tuning_scores(logits: np.ndarray, spec: HeadSpec, scope: ScopeConfig) -> np.ndarray:
    """The scores the scope threshold is tuned on. A message the model files under the trained out-of-scope
    label is turned away whatever its score, so tuning sees it as rejected: counted as accepted, confident
    out-of-scope predictions would push the threshold up for nothing."""
    scores = np.array([scope_score(row, spec, scope.score) for row in logits])
    if scope.label in spec.labels:
        scores[logits.argmax(1) == spec.labels.index(scope.label)] = REJECTED_SCORE
    return scores


@dataclass
class ScopeExamples:
    """What a version's scope threshold is tuned and estimated on."""

    in_scope: list[str]  # validation messages of the business's intents
    own: list[str]  # the assistant's own out-of-scope examples
    shipped: list[str]  # the shipped off-topic messages, when it has none of its own
    trained: list[str]  # the version's training texts (what "close to its training texts" means)


def tune_on(
    intent: Predictor, examples: ScopeExamples, scope: ScopeConfig, embedder: SentenceEmbedder
) -> ScopeThreshold:
    """Score the examples with the version and tune its threshold; shipped off-topic messages the version takes
    for one of its intents are left out, and the notes say so."""
    inside, own = len(examples.in_scope), len(examples.own)
    texts = examples.in_scope + examples.own + examples.shipped
    scores = tuning_scores(intent.own_logits(intent.logits(texts)), intent.spec, scope)
    in_scores, out_scores, notes = scores[:inside], scores[inside:], []
    if examples.shipped:
        kept = not_the_business(scores[inside + own :], in_scores, examples, embedder)
        out_scores = np.r_[scores[inside : inside + own], scores[inside + own :][kept]]
        left_out = [text for text, keep in zip(examples.shipped, kept, strict=True) if not keep]
        notes.append(
            "estimated on generic off-topic messages (the shipped set: weather, sport, small talk…), not on "
            "your own: messages about topics next to your intents are caught less often. Give "
            "out_of_scope_examples, or mark messages 'out of scope' on the chat or admin page"
        )
        if left_out:
            notes.append(
                f"{len(left_out)} of {len(examples.shipped)} shipped off-topic messages were left out as in scope "
                f"for this business (the intent model takes them for its intents), e.g. {left_out[0]!r}"
            )
    try:
        tuned = tune_scope(
            in_scores,
            out_scores,
            scope.max_in_scope_rejected,
            scope.target_precision,
            scope.out_of_scope_share,
            scope.folds,
        )
    except ScopeRefused as exc:
        raise ScopeRefused(
            f"{intent.ref}: {exc}. Add out-of-scope examples like your real off-topic traffic (out_of_scope_examples, "
            "or 'out of scope' on the chat and admin pages), take out examples your intents do cover, or leave "
            f"scope.target_precision out to turn away at most {scope.max_in_scope_rejected:.0%}"
        ) from None
    return replace(tuned, notes=[*notes, *tuned.notes])


def not_the_business(
    shipped_scores: np.ndarray, in_scores: np.ndarray, examples: ScopeExamples, embedder: SentenceEmbedder
) -> np.ndarray:
    """Which shipped off-topic messages are off-topic for this business: not those the intent model places in one
    of its intents as confidently as a typical in-scope message, nor those as close to one of its training texts
    (cosine of the retrieval encoder) as a typical validation message is (a business whose intents cover the
    weather keeps weather questions in scope)."""
    confident = shipped_scores >= np.median(in_scores)
    trained = embedder.encode(examples.trained)

    def nearest(texts: list[str]) -> np.ndarray:
        similarities: list[np.ndarray] = [
            (embedder.encode(texts[i : i + 512]) @ trained.T).max(1) for i in range(0, len(texts), 512)
        ]
        return np.concatenate(similarities)

    close = nearest(examples.shipped) >= np.median(nearest(examples.in_scope))
    kept: np.ndarray = ~(confident | close)
    return kept


def build_generator(definition: AssistantDefinition, registry: Registry) -> ReplyGenerator:
    settings = definition.generator
    # GeneratorConfig's validator made sure each kind has its model (and server); the conditions narrow the types.
    if settings.kind == "local" and settings.model:
        return LocalGenerator(resolve_lm(settings.model, registry), settings.max_new_tokens, settings.temperature)
    if settings.kind == "openai" and settings.base_url and settings.model:
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


DEFINITION_FILE = "definition.json"


def find_definition(name: str, registry: Registry) -> AssistantDefinition:
    """An assistant by its definition file, or by the name of one that has run on this home (its definition is
    kept in the home's assistants/NAME/ folder)."""
    if Path(name).is_file():
        return load_definition(Path(name))
    kept = Home(registry.home).assistant(name) / DEFINITION_FILE
    if not kept.is_file():
        raise TuneloopError(
            f"no assistant '{name}' has run on {registry.home} (and no such definition file): give its YAML file"
        )
    return AssistantDefinition.model_validate_json(kept.read_text(encoding="utf-8"))


class AssistantRuntime:
    def __init__(self, definition: AssistantDefinition, registry: Registry) -> None:
        self.definition = definition
        self.registry = registry
        self.folder = Home(registry.home).assistant(definition.name)
        # What was set, not the defaults: read back, it is the same definition (scope.label set or not).
        write_text_atomically(self.folder / DEFINITION_FILE, definition.model_dump_json(indent=2, exclude_unset=True))
        entries = load_faq(definition.faq)
        source = resolve_encoder(definition.retrieval.encoder, registry, [e.question for e in entries])
        self.embedder = SentenceEmbedder(source)
        self.faq = FaqIndex(entries, self.embedder, cache_dir=self.folder / "faq-index")
        self.faq_similarity = definition.retrieval.min_similarity or DEFAULT_FAQ_SIMILARITY.get(
            source.name, FALLBACK_FAQ_SIMILARITY
        )
        self.generator = build_generator(definition, registry)
        self.out_of_scope = out_of_scope_texts(definition.out_of_scope_examples)
        self.thresholds: dict[str, ScopeThreshold] = {}  # by intent-model version: what it answers with
        self.tuned: dict[str, ScopeThreshold] = {}  # the same before an admin moved it
        self._moving = threading.Lock()

    def calibrate(self, intent: Predictor) -> ScopeThreshold:
        """The scope threshold one intent-model version answers with: tuned (or read back) on its validation split
        and the out-of-scope examples, then moved wherever an admin moved it for this version."""
        if intent.ref in self.thresholds:
            return self.thresholds[intent.ref]
        self._check(intent)
        self.tuned[intent.ref] = self._tuned(intent)
        threshold = self.thresholds[intent.ref] = self._answering(intent.ref)
        log.info("%s: scope %s", intent.ref, threshold.summary())
        for note in threshold.notes:
            log.warning("%s: %s", intent.ref, note)
        return threshold

    def _answering(self, ref: str) -> ScopeThreshold:
        """The tuned threshold of a version where an admin last moved it, with what a person should know."""
        tuned, moves, scope = self.tuned[ref], self.moves(ref), self.definition.scope
        latest = moves[-1] if moves else None
        threshold = tuned
        if latest is not None and latest["threshold"] is not None:
            threshold = moved_to(tuned, latest["threshold"], latest["by"], latest["at"])
        notes = shortfalls(threshold, scope.max_in_scope_rejected, scope.min_out_of_scope_caught)
        return replace(threshold, notes=[*threshold.notes, *notes])

    def _check(self, intent: Predictor) -> None:
        """The definition and the version fit together, or one error that says what to change."""
        if self.multitask and self.definition.sentiment_task not in intent.tasks:
            raise TuneloopError(
                f"the assistant takes sentiment from {intent.ref}'s '{self.definition.sentiment_task}' "
                f"task, and it has none (tasks: {', '.join(intent.tasks) or 'none'}); set "
                f"sentiment_model to a sentiment classifier or sentiment_task to one of its tasks"
            )
        scope = self.definition.scope
        if "label" in scope.model_fields_set and scope.label not in intent.labels:
            raise TuneloopError(
                f"scope.label '{scope.label}' is not a label of {intent.ref} "
                f"({', '.join(intent.labels)}); train it as an intent or leave scope.label out"
            )
        if scope.score == "cosine" and (intent.spec.head != "cosine" or intent.blend is not None):
            raise TuneloopError(
                f"scope.score=cosine needs a cosine head's scores, and {intent.ref} serves "
                f"{'a blend with its baseline' if intent.blend else f'a {intent.spec.head} head'}; use "
                "scope.score=probability"
            )

    def _tuned(self, intent: Predictor) -> ScopeThreshold:
        """The policy's threshold for a version, tuned once for each set of inputs and kept in the home."""
        scope = self.definition.scope
        examples = self.tuning_examples(intent)
        # Keyed by everything the threshold depends on, so editing the definition or the examples re-tunes it.
        inputs = json.dumps([scope.model_dump(), examples.own, examples.shipped], ensure_ascii=False)
        cached = self.folder / "scope" / f"{intent.ref}-{hashlib.sha256(inputs.encode()).hexdigest()[:12]}.json"
        threshold = self._read_cached(cached)
        if threshold is None:
            threshold = tune_on(intent, examples, scope, self.embedder)
            write_text_atomically(cached, json.dumps(threshold.to_dict(), indent=2, ensure_ascii=False))
        return threshold

    def tuning_examples(self, intent: Predictor) -> ScopeExamples:
        """The in-scope side (the version's validation split, or its test split if it has none) and the
        out-of-scope side: the assistant's own examples — validation messages labelled scope.label, the
        out_of_scope_examples file, reviewed 'out of scope' corrections — less any text the version trained on;
        with none of those, the shipped off-topic messages' tuning part (scope.shipped_off_topic)."""
        label = self.definition.scope.label
        if intent.folder is None:
            raise TuneloopError(f"{intent.ref} is not a registered version: it has no validation split to tune on")
        data = load_prepared(intent.folder.data())
        split = data.val if len(data.val) else data.test
        if split.empty:
            raise TuneloopError(f"{intent.ref} has no validation or test split to tune the scope threshold on")
        labelled_out = (split["label"] == label).to_numpy()
        trained_on = set(data.train["text"].map(dedup_key))
        own = [
            text
            for text in dict.fromkeys(
                split.loc[labelled_out, "text"].tolist() + self.out_of_scope + self.corrected_out_of_scope(intent)
            )
            if dedup_key(text) not in trained_on
        ]
        return ScopeExamples(
            in_scope=split.loc[~labelled_out, "text"].tolist(),
            own=own,
            shipped=[] if own else self.shipped_off_topic(),
            trained=data.train["text"].tolist(),
        )

    def corrected_out_of_scope(self, intent: Predictor) -> list[str]:
        """Messages people marked out of scope (scope.label) in feedback on the intent model, as far as the
        version's feedback rules admit them to training: reviewed, or from a trusted key."""
        feedback = load_config(None, [], base=stored_recipe(intent.record.config)).feedback if intent.record else None
        prediction_log = PredictionLog(self.registry.database_url, self.registry.home)
        try:
            rows = prediction_log.feedback_for(intent.name)
        finally:
            prediction_log.close()
        return labelled_texts(rows, self.definition.scope.label, feedback)

    def shipped_off_topic(self) -> list[str]:
        """The shipped off-topic messages' tuning part in the assistant's languages (scope.shipped_off_topic)."""
        if not self.definition.scope.shipped_off_topic:
            return []
        return off_topic_messages("tune", self.definition.languages)["text"].map(clean_text).tolist()

    def moves(self, ref: str) -> list[ScopeMove]:
        """Where admins moved a version's operating point, oldest first (threshold None: back to the policy)."""
        path = self.folder / "scope" / f"{ref}.moves.json"
        try:
            return list(json.loads(path.read_text()))
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise TuneloopError(f"{path} is not the JSON tuneloop writes ({exc}); delete it to start over") from None

    def move(self, intent: Predictor, threshold: float | None, by: str) -> ScopeThreshold:
        """Move a version's operating point along its curve (None: back to the policy's), recorded with who and
        when; it answers from the next turn."""
        self.calibrate(intent)
        at = datetime.now(UTC).isoformat(timespec="seconds")
        landed = None if threshold is None else moved_to(self.tuned[intent.ref], threshold, by, at).threshold
        with self._moving:  # two admins moving it at once both get their move recorded
            moves = [*self.moves(intent.ref), ScopeMove(threshold=landed, by=by, at=at)]
            write_text_atomically(self.folder / "scope" / f"{intent.ref}.moves.json", json.dumps(moves, indent=2))
            answering = self.thresholds[intent.ref] = self._answering(intent.ref)
        log.info("%s: scope moved by %s: %s", intent.ref, by, answering.summary())
        return answering

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
        assert sentiment_output is not None  # only a multi-task intent model brings no sentiment output
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
            return ScopeThreshold.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
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
