"""The assistant definition: which models, which FAQ, which templates and rules — typed, from YAML.

Paths in the file are relative to the file itself, so a definition and its FAQ travel together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tuneloop.config import OUT_OF_SCOPE, StrictModel, anchor_paths, read_yaml_mapping, validated

Language = Literal["en", "zh"]
LANGUAGES: tuple[Language, ...] = ("en", "zh")
SENTIMENTS = ("negative", "neutral", "positive")
Texts = dict[str, str]  # language → text


class ScopeConfig(StrictModel):
    """Out-of-scope detection: which point of the curve (in-scope messages turned away vs out-of-scope ones
    caught) the assistant answers at."""

    max_in_scope_rejected: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of in-scope messages the assistant may turn away (estimated on the intent model's "
        "validation split). Without target_precision the threshold turns away this share and catches as many "
        "out-of-scope messages as that allows; with it, a tuned threshold that would turn away more is refused.",
    )
    min_out_of_scope_caught: float = Field(
        0.85,
        ge=0,
        le=1,
        description="Share of out-of-scope messages the assistant should catch: when the estimate falls short, "
        "the start says so and what would help (it never moves the threshold).",
    )
    target_precision: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Instead: the lowest threshold that reaches this in-scope precision at out_of_scope_share "
        "(needs out-of-scope examples like the real off-topic traffic).",
    )
    out_of_scope_share: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of real traffic expected to be out of scope, for target_precision: precision is "
        "computed at this mix, not at the mix of the tuning examples.",
    )
    folds: int = Field(10, ge=2, le=20, description="Cross-validation folds of the start-up estimate.")
    score: Literal["probability", "cosine"] = Field(
        "probability", description="Confidence measure: top class probability, or cosine to the closest class."
    )
    label: str = Field(
        OUT_OF_SCOPE,
        description="The intent label that means out of scope: a message the model files under it is turned "
        "away whatever its confidence. The chat page's and the admin page's 'out of scope' corrections record it, "
        "so retraining on them teaches the model this label.",
    )
    shipped_off_topic: bool = Field(
        True,
        description="With no out-of-scope examples of its own (out_of_scope_examples, reviewed 'out of scope' "
        "corrections, validation messages labelled scope.label), estimate what the threshold catches on the "
        "tuning part of tuneloop's shipped off-topic messages (weather, sport, small talk... in the assistant's "
        "languages), less those the intent model takes for one of its intents.",
    )


class RetrievalConfig(StrictModel):
    encoder: str = Field("auto", description="auto, all-MiniLM-L6-v2, multilingual-e5-small or a local folder.")
    top_k: int = Field(3, ge=1)
    min_similarity: float | None = Field(
        None, description="Cosine above which the best FAQ entry answers the message; default per encoder."
    )


class EscalationConfig(StrictModel):
    min_confidence: float = Field(0.5, ge=0, le=1, description="Below this intent confidence, hand over.")
    negative_turns: int = Field(2, ge=0, description="Hand over after this many negative turns in a row (0: never).")
    intents: list[str] = Field(default_factory=list, description="Intents that mean 'a person, please'.")
    keywords: dict[str, list[str]] | None = Field(None, description="Per language; default: human/agent/人工/...")


class TemplatesConfig(StrictModel):
    intents: dict[str, Texts] = Field(default_factory=dict, description="Reply per intent, per language.")
    fallback: Texts = Field(
        default_factory=lambda: {
            "en": "Thanks for your message. Could you tell me a bit more so I can help?",
            "zh": "感谢您的留言，可以再详细说明一下吗？",
        }
    )
    out_of_scope: Texts = Field(
        default_factory=lambda: {
            "en": "Sorry, I can only help with questions about your orders and account. Let me get a colleague.",
            "zh": "抱歉，我只能回答订单和账户相关的问题，正在为您转接人工客服。",
        }
    )
    escalate: Texts = Field(
        default_factory=lambda: {
            "en": "I'm passing you to a colleague who will take it from here.",
            "zh": "正在为您转接人工客服，请稍候。",
        }
    )
    tone: dict[str, Texts] = Field(
        default_factory=lambda: {
            "negative": {
                "en": "I'm sorry about this, and I'll make it quick.",
                "zh": "非常抱歉给您带来不便，马上为您处理。",
            },
            "positive": {"en": "Glad I could help!", "zh": "很高兴能帮到您！"},
        }
    )

    @model_validator(mode="after")
    def _known_tones(self) -> TemplatesConfig:
        unknown = set(self.tone) - set(SENTIMENTS)
        if unknown:
            raise ValueError(
                f"tone keys must be sentiments ({', '.join(SENTIMENTS)}), not {', '.join(sorted(unknown))}"
            )
        return self


class GeneratorConfig(StrictModel):
    kind: Literal["template", "local", "openai"] = "template"
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1")
    model: str | None = Field(
        None,
        description="local: SmolLM2-135M-Instruct, a version NAME@VERSION from "
        "tuneloop sft, or a folder; openai: the server's model name.",
    )
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.0, ge=0, description="0: greedy, the same reply every time.")
    api_key_env: str | None = Field(None, description="Environment variable holding the server's API key.")
    timeout: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _openai_needs_a_server(self) -> GeneratorConfig:
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("generator.kind=openai needs generator.base_url and generator.model")
        if self.kind == "local" and not self.model:
            raise ValueError("generator.kind=local needs generator.model (e.g. SmolLM2-135M-Instruct or replies@1)")
        return self


class AssistantDefinition(StrictModel):
    """Everything that makes a support assistant, besides the models' weights."""

    name: str = Field("assistant", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    intent_model: str = Field(description="Registry name of the intent classifier (its production version).")
    sentiment_model: str = Field(
        description="Registry name of the negative/neutral/positive classifier; the "
        "intent model's name when that is a multi-task model with a sentiment head."
    )
    sentiment_task: str = Field(
        "sentiment",
        description="Multi-task intent model: its task that gives the sentiment (one encoder pass per turn for both).",
    )
    faq: Path = Field(description="csv/jsonl with question, answer and optional intent, lang columns.")
    out_of_scope_examples: Path | None = Field(
        None, description="Messages the assistant should not handle (a text column): tune the scope threshold."
    )
    languages: list[Language] = Field(default_factory=lambda: list(LANGUAGES))
    scope: ScopeConfig = Field(default_factory=ScopeConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)
    templates: TemplatesConfig = Field(default_factory=TemplatesConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    history_turns: int = Field(6, ge=0, description="Earlier turns kept in view (sentiment streak, generator).")


def load_definition(path: Path) -> AssistantDefinition:
    """Read and validate an assistant YAML; relative paths are taken from the file's folder."""
    path = Path(path)
    tree = anchor_paths(read_yaml_mapping(path, "assistant definition"), AssistantDefinition, path.resolve().parent)
    return validated(AssistantDefinition, tree, f"{path}: ")
