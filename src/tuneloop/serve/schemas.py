"""Request and response bodies of the HTTP API (separate models, so the OpenAPI docs say exactly what goes
in and what comes out)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    texts: list[str] = Field(min_length=1, description="Texts to classify.")
    model: str | None = Field(None, description="Model name; optional when the server serves one model.")
    top_k: int | None = Field(None, ge=1, le=100, description="Ranked labels per text (default serve.top_k).")


class LabelScore(BaseModel):
    label: str
    score: float


class TextPrediction(BaseModel):
    prediction_id: str = Field(description="Send this back to /v1/feedback to correct or rate the answer.")
    label: str
    score: float
    top_k: list[LabelScore]
    model: str
    version: int


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[TextPrediction]


class FeedbackRequest(_Strict):
    prediction_id: str = Field(min_length=1, max_length=64)
    corrected_label: str | None = Field(None, min_length=1, max_length=200, description="The right label.")
    rating: int | None = Field(None, ge=-1, le=1, description="-1 wrong / unhelpful, 0 neutral, 1 right.")
    comment: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackRequest:
        if self.corrected_label is None and self.rating is None and not self.comment:
            raise ValueError("give at least one of corrected_label, rating or comment")
        return self


class FeedbackResponse(BaseModel):
    feedback_id: int
    prediction_id: str


class ModelInfo(BaseModel):
    name: str
    version: int
    stage: str
    base_model: str
    labels: list[str]
    metrics: dict
    created_at: datetime
    parent: str | None
    loading_version: int | None = Field(None, description="A version being loaded to replace this one.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class PromoteRequest(_Strict):
    version: int = Field(ge=1)
    wait: bool = Field(False, description="Answer only after the server answers with the new version.")


class PromoteResponse(BaseModel):
    name: str
    version: int
    stage: str
    serving_version: int | None = Field(
        description="The version answering requests when this response was sent (null: not served here).")


class ErrorResponse(BaseModel):
    detail: str
    errors: list[dict[str, str]] | None = None
