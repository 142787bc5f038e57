"""Request and response bodies of the HTTP API (separate models, so the OpenAPI docs say exactly what goes
in and what comes out)."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, model_validator
from pydantic.json_schema import SkipJsonSchema

from tuneloop.config import MODEL_NAME_PATTERN, StrictModel


def _admits_null(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null" or any(_admits_null(option) for option in schema.get("anyOf", []))


class RequestBody(StrictModel):
    """A request's body, read as its schema states it: an optional field whose schema admits no null refuses
    one, booleans are StrictBool (`"explain": 0` is not false) and numbers StrictFloat (`false` is not 0); a
    fuzzer or a client generated from the document must never see the server accept what the document calls
    invalid. (Integers stay lax: JSON Schema calls 1.0 an integer.)"""

    @model_validator(mode="before")
    @classmethod
    def _no_null_where_the_schema_has_none(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [name for name, value in data.items() if value is None and name in cls._never_null()]
            if nulls:
                raise ValueError(f"leave {', '.join(nulls)} out instead of sending null")
        return data

    @classmethod
    @functools.cache
    def _never_null(cls) -> frozenset[str]:
        properties = cls.model_json_schema()["properties"]
        return frozenset(
            name
            for name, field in cls.model_fields.items()
            if not field.is_required() and not _admits_null(properties[name])
        )


class PredictRequest(RequestBody):
    texts: list[str] = Field(min_length=1, description="Texts to classify.")
    model: str | None = Field(None, description="Model name; optional when the server serves one model.")
    top_k: int | None = Field(None, ge=1, le=100, description="Ranked labels per text (default serve.top_k).")
    explain: StrictBool = Field(
        False,
        description="Add each text's word attributions (Integrated Gradients) for its label; at most "
        "serve.explain_max_texts texts per request.",
    )


class LabelScore(BaseModel):
    label: str
    score: float


class WordScore(BaseModel):
    word: str
    start: int = Field(description="Character offset of the word in the cleaned text.")
    end: int
    score: float = Field(description="What the word adds to the label's probability (negative: takes away).")


class TextExplanation(BaseModel):
    text: str = Field(description="The text as the model read it (cleaned).")
    label: str
    probability: float
    baseline_probability: float = Field(description="The label's probability with every word replaced by padding.")
    delta: float = Field(description="Sum of the word scores minus (probability - baseline_probability).")
    words: list[WordScore]


class TextPrediction(BaseModel):
    prediction_id: str = Field(description="Send this back to /v1/feedback to correct or rate the answer.")
    label: str
    score: float
    top_k: list[LabelScore]
    model: str
    version: int
    explanation: TextExplanation | None = Field(None, description='With "explain": true.')


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[TextPrediction]


class FeedbackRequest(RequestBody):
    # The two rules below are in the JSON schema too, so a client generated from it cannot send a body that
    # the server then refuses. (null is read as "not given"; the schema shows the fields as absent-or-set.)
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["prediction_id"]}, {"required": ["turn_id"]}],
            "anyOf": [
                {"required": ["corrected_label"]},
                {"required": ["rating"]},
                {"required": ["comment"], "properties": {"comment": {"minLength": 1}}},
            ],
        }
    )

    # Constraints sit on the str inside the union: on the field they would be applied to an explicit null too.
    prediction_id: Annotated[str, Field(min_length=1, max_length=64)] | SkipJsonSchema[None] = Field(
        None, description="From /v1/predict. Give this or turn_id."
    )
    turn_id: Annotated[str, Field(min_length=1, max_length=64)] | SkipJsonSchema[None] = Field(
        None, description="From /v1/chat: the feedback is about that turn's intent. Give this or prediction_id."
    )
    corrected_label: Annotated[str, Field(min_length=1, max_length=200)] | SkipJsonSchema[None] = Field(
        None, description="The right label (for a chat turn: the right intent)."
    )
    rating: Annotated[int, Field(ge=-1, le=1)] | SkipJsonSchema[None] = Field(
        None, description="-1 wrong / unhelpful (thumbs down), 0, 1 right (up)."
    )
    comment: Annotated[str, Field(max_length=2000)] | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _about_one_thing_and_says_something(self) -> FeedbackRequest:
        if (self.prediction_id is None) == (self.turn_id is None):
            raise ValueError("give exactly one of prediction_id or turn_id")
        if self.corrected_label is None and self.rating is None and not self.comment:
            raise ValueError("give at least one of corrected_label, rating or comment")
        return self


class FeedbackResponse(BaseModel):
    feedback_id: int | None = Field(
        description="The stored feedback on the prediction; null when a rating of an "
        "out-of-scope chat turn was kept on the turn only."
    )
    prediction_id: str
    turn_id: str | None = None


class ModelInfo(BaseModel):
    name: str
    version: int
    stage: str
    base_model: str
    labels: list[str]
    runtime: Literal["torch", "onnx", "onnx-int8", "baseline"] = Field(
        description="What runs this version's encoder now; baseline: it has none, its TF-IDF baseline answers alone "
        "(train.baseline=only)."
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where it runs: cuda when the gpu extra (onnxruntime-gpu) finds a GPU, else cpu."
    )
    metrics: dict[str, Any]
    created_at: datetime
    parent: str | None
    loading_version: int | None = Field(None, description="A version being loaded to replace this one.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class PromoteRequest(RequestBody):
    version: int = Field(ge=1)
    wait: StrictBool = Field(False, description="Answer only after the server answers with the new version.")


class PromoteResponse(BaseModel):
    name: str
    version: int
    stage: str
    serving_version: int | None = Field(
        description="The version answering requests when this response was sent (null: not served here)."
    )


class ChatRequest(RequestBody):
    session_id: Annotated[str, Field(min_length=1, max_length=100)] | SkipJsonSchema[None] = Field(
        None,
        description="Leave it out to start a conversation: the answer carries the session_id the server issued; "
        "send it back to continue. Only the key that opened a session may continue it.",
    )
    message: str = Field(min_length=1)


class FaqSource(BaseModel):
    question: str
    answer: str
    similarity: float
    score: float


class ChatResponse(BaseModel):
    turn_id: str = Field(description="Send it back to /v1/feedback with a rating or the right intent.")
    session_id: str = Field(description="The conversation's id (issued by the server); send it with the next message.")
    reply: str
    lang: str
    intent: str | None = Field(description="null when the message is out of scope.")
    predicted_intent: str
    confidence: float
    sentiment: str
    escalate: bool
    reason: str | None = Field(description="Why the conversation goes to a person.")
    answered_from_faq: bool
    faq_question: str | None = Field(description="The FAQ entry the reply came from, if any.")
    sources: list[FaqSource]
    model: str


class AssistantInfo(BaseModel):
    name: str
    languages: list[str]
    intents: list[str]
    out_of_scope_label: str = Field(
        description="The corrected_label that marks a message as out of scope (not for this assistant)."
    )
    intent_model: str
    sentiment_model: str


class JobRequest(RequestBody):
    kind: Literal["retrain", "gate"]
    target: str = Field(
        pattern=MODEL_NAME_PATTERN.removesuffix("$") + r"(@\d+)?$",
        description="retrain: a model name; gate: NAME@VERSION.",
    )


class ExplainRequest(RequestBody):
    model: str = Field(
        pattern=MODEL_NAME_PATTERN.removesuffix("$") + r"(@\d+)?$",
        description="NAME (its production version) or NAME@VERSION (the version that answered).",
    )
    text: str = Field(min_length=1, description="The text to explain.")
    label: str | None = Field(
        None, min_length=1, max_length=200, description="The label to explain; default: the predicted one."
    )


class AdminVersion(BaseModel):
    version: int
    stage: str
    metrics: dict[str, Any]
    parent: str | None
    base_model: str
    created_at: datetime


class AdminModel(BaseModel):
    name: str
    serving: int | None = Field(description="The version this server answers with (null: not served here).")
    versions: list[AdminVersion]


class AdminModelsResponse(BaseModel):
    models: list[AdminModel]


class FeedbackItem(BaseModel):
    feedback_id: int
    at: datetime
    model: str = Field(description="NAME@VERSION that made the prediction.")
    text: str
    predicted: str
    corrected_label: str | None
    rating: int | None
    comment: str | None
    source: str = Field(description="Where the prediction was made: api or chat.")
    sender: str = Field(description="Who sent the feedback: the API key's id (key:…) or anonymous.")
    trusted: bool = Field(description="The sender's key was trusted: its feedback trains without review.")
    review: Literal["pending", "approved", "rejected"]


class FeedbackQueue(BaseModel):
    items: list[FeedbackItem]


class ReviewGroupInfo(BaseModel):
    group: str = Field(description="The group's id, stable for the same text and label; decide on it by id.")
    text: str
    label: str = Field(description="The label this feedback would teach.")
    kind: Literal["corrected", "confirmed"] = Field(description="A correction, or an up-rating of the prediction.")
    predicted: str = Field(description="What the model said.")
    count: int
    pending: int = Field(description="How many of them wait for a decision (not reviewed, not from a trusted key).")
    senders: dict[str, int] = Field(description="Feedback per sender.")
    trusted_senders: list[str]
    feedback_ids: list[int]
    first_at: datetime
    last_at: datetime
    flags: list[str] = Field(description="Why it looks suspicious: one sender repeating it, disagreeing labels.")


class ReviewQueueResponse(BaseModel):
    model: str
    groups: list[ReviewGroupInfo]


class SimilarInfo(BaseModel):
    prediction_id: str
    text: str
    predicted: str = Field(description="What the model said of it.")
    similarity: float = Field(description="Cosine to the suggestion's text (the version's base sentence encoder).")


class SuggestionInfo(BaseModel):
    prediction_id: str
    text: str
    predicted: str = Field(description="What the model said.")
    confidence: float = Field(description="Its calibrated probability.")
    runner_up: str = Field(description="The second most probable label.")
    margin: float = Field(description="Difference of the two best probabilities: small means unsure.")
    near_copies: int = Field(
        description="Near-copies of it in the window, which it stands for (they are not suggested)."
    )
    trained_rows: int = Field(description="Training rows of the predicted label.")
    priority: float
    why: str
    similar: list[SimilarInfo] = Field(
        default_factory=list,
        description="Messages of the window close to this one, most similar first: the label given to this one can "
        "be given to them in the same POST /v1/admin/labels (one click), after a person has looked at them.",
    )


class ScopeShare(BaseModel):
    value: float
    low: float = Field(description="95% interval (Wilson), lower end.")
    high: float
    messages: int = Field(description="Messages it was measured on.")


class ScopePoint(BaseModel):
    threshold: float
    in_scope_rejected: float
    out_of_scope_caught: float


class ScopeMove(BaseModel):
    threshold: float | None = Field(description="The curve point chosen; null: back to the policy's.")
    by: str
    at: str


class ScopeInfo(BaseModel):
    """Where the assistant says no for the intent version it serves, and the curve it can move along."""

    intent_model: str
    threshold: float
    policy: str
    in_scope_rejected: ScopeShare = Field(description="Expected share of in-scope messages turned away.")
    out_of_scope_caught: ScopeShare = Field(description="Expected share of out-of-scope messages caught.")
    in_scope_examples: int
    out_of_scope_examples: int
    max_in_scope_rejected: float
    min_out_of_scope_caught: float
    curve: list[ScopePoint]
    notes: list[str]
    moves: list[ScopeMove] = Field(description="Where admins moved this version's point, oldest first.")


class ScopeMoveRequest(RequestBody):
    threshold: StrictFloat | None = Field(
        ge=-1, le=1, description="A threshold on the curve (the nearest curve point is taken); null: the policy's."
    )


class SuggestionsResponse(BaseModel):
    model: str
    labels: list[str] = Field(description="The labels of the version in production, to choose from.")
    out_of_scope_label: str = Field(description="The label that marks a message none of those labels covers.")
    suggestions: list[SuggestionInfo]


class LabelsRequest(RequestBody):
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="The model whose predictions are labelled.")
    labels: dict[Annotated[str, Field(max_length=32)], Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=1000, description="Prediction id → the right label, from the suggestions."
    )


class NextRetrainInfo(BaseModel):
    """What the next retrain of the model would learn from feedback (its production recipe's feedback policy)."""

    examples: int = Field(description="Labelled examples: corrections, and confirmations where the policy counts them.")
    corrected: int
    confirmed: int
    labels: dict[str, int] = Field(description="Examples per label.")
    awaiting_review: int = Field(description="Feedback rows that train only once an admin approves them.")


class LabelsResponse(BaseModel):
    recorded: int = Field(description="Labels recorded (one already given by the same admin is not repeated).")
    next_retrain: NextRetrainInfo = Field(
        description="What the next retrain learns from feedback, these labels included: a labelling page's progress."
    )


class ReviewDecisionRequest(RequestBody):
    # "Say which feedback" is in the JSON schema too, as for FeedbackRequest.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["groups"], "properties": {"groups": {"minItems": 1}}},
                {"required": ["feedback_ids"], "properties": {"feedback_ids": {"minItems": 1}}},
                {"required": ["sender"], "properties": {"sender": {"minLength": 1}}},
            ]
        }
    )

    model: str = Field(pattern=MODEL_NAME_PATTERN, description="The model whose feedback is decided on.")
    decision: Literal["approve", "reject"]
    groups: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=1000, description="Group ids from the review queue: all their feedback."
    )
    feedback_ids: list[Annotated[int, Field(ge=1, le=2**53 - 1)]] = Field(
        default_factory=list, max_length=10_000, description="Single feedback rows."
    )
    sender: Annotated[str, Field(min_length=1, max_length=80)] | SkipJsonSchema[None] = Field(
        None, description="All this sender's feedback on the model."
    )

    @model_validator(mode="after")
    def _says_which(self) -> ReviewDecisionRequest:
        if not (self.groups or self.feedback_ids or self.sender):
            raise ValueError("say which feedback to decide on: groups, feedback_ids or sender")
        return self


class ReviewDecisionResponse(BaseModel):
    decided: int = Field(description="Feedback rows now approved or rejected.")


class JobInfo(BaseModel):
    id: str
    kind: str
    target: str
    status: Literal["running", "succeeded", "rejected", "failed"]
    exit_code: int | None
    started_at: datetime
    finished_at: datetime | None
    log: str = Field(description="The end of the job's output.")


class JobsResponse(BaseModel):
    jobs: list[JobInfo]


class ErrorResponse(BaseModel):
    detail: str
    errors: list[dict[str, str]] | None = None


class ReadyResponse(BaseModel):
    ready: bool
    models: dict[str, int] = Field(description="Served model name: version.")
    unavailable: dict[str, str] = Field(description="A model that is not served: why.")


_ERROR_MEANINGS = {
    400: "The body is not JSON (or not UTF-8).",
    401: "No API key, or not a valid one.",
    403: "The key does not have this route's scope, or admin routes are disabled.",
    404: "No such model, version, prediction, turn or job.",
    409: "The state changed underneath the request (e.g. production moved); read it again and retry.",
    413: "The body is larger than serve.max_body_bytes.",
    422: "A field is missing or out of range (the document states the ranges); `errors` names each one.",
    429: "Too many feedback requests from this sender, or failed keys from this address; retry after the "
    "`Retry-After` header's seconds.",
    503: "Overloaded, or the model is not loaded; retry after the `Retry-After` header's seconds.",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": meaning} for code, meaning in _ERROR_MEANINGS.items()
}
