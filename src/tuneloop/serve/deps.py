"""What every route needs, gathered in one object on the app, handed to routes as a dependency."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from tuneloop.assistant.runtime import AssistantRuntime
from tuneloop.assistant.store import ConversationStore
from tuneloop.config import TuneloopConfig
from tuneloop.feedback.log import PredictionLog
from tuneloop.models.classifier import META_FILE, MODEL_DIR
from tuneloop.registry.store import Registry
from tuneloop.serve.jobs import JobRunner
from tuneloop.serve.metrics import ServerMetrics
from tuneloop.serve.models import ServedModels
from tuneloop.serve.security import KeyRing


@dataclass
class ServerState:
    config: TuneloopConfig
    registry: Registry
    served: ServedModels
    prediction_log: PredictionLog
    metrics: ServerMetrics
    keys: KeyRing
    jobs: JobRunner
    assistant: AssistantRuntime | None = None
    conversations: ConversationStore | None = None
    _labels: dict[tuple[str, int], frozenset[str]] = field(default_factory=dict, repr=False)

    def labels_of(self, name: str, version: int) -> frozenset[str]:
        """The labels of any registered version (feedback may be about one no longer served)."""
        if (name, version) not in self._labels:
            record = self.registry.get(f"{name}@{version}")
            meta = json.loads((self.registry.artifacts(record) / MODEL_DIR / META_FILE).read_text())
            self._labels[name, version] = frozenset(meta["labels"])
        return self._labels[name, version]


def get_state(request: Request) -> ServerState:
    return request.app.state.tuneloop


def get_assistant(state: Annotated[ServerState, Depends(get_state)]) -> AssistantRuntime:
    if state.assistant is None:
        raise HTTPException(404, "no assistant is configured on this server (serve.assistant=assistant.yaml)")
    return state.assistant


State = Annotated[ServerState, Depends(get_state)]
Assistant = Annotated[AssistantRuntime, Depends(get_assistant)]
