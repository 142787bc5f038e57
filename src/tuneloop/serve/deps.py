"""What every route needs, gathered in one object on the app, handed to routes as a dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, cast

from fastapi import Depends, Request

from tuneloop.assistant.service import ChatService
from tuneloop.assistant.store import ConversationStore
from tuneloop.config import OUT_OF_SCOPE, ServerSettings
from tuneloop.db.schema import PredictionRecord
from tuneloop.errors import NotFound
from tuneloop.feedback.log import PredictionLog
from tuneloop.feedback.suggest import version_labels
from tuneloop.registry import Registry
from tuneloop.serve.jobs import JobRunner
from tuneloop.serve.metrics import ServerMetrics
from tuneloop.serve.security import KeyRing
from tuneloop.serve.slots import ServedModels
from tuneloop.serve.throttle import Throttle


@dataclass
class ServerState:
    config: ServerSettings
    registry: Registry
    served: ServedModels
    prediction_log: PredictionLog
    metrics: ServerMetrics
    keys: KeyRing
    throttle: Throttle
    jobs: JobRunner
    chat: ChatService | None = None
    conversations: ConversationStore | None = None
    _labels: dict[tuple[str, int], frozenset[str]] = field(default_factory=dict, repr=False)

    def labels_of(self, name: str, version: int) -> frozenset[str]:
        """The labels of any registered version (feedback may be about one no longer served)."""
        if (name, version) not in self._labels:
            self._labels[name, version] = version_labels(self.registry, name, version)
        return self._labels[name, version]

    def allowed_labels(self, prediction: PredictionRecord) -> frozenset[str]:
        """The labels feedback may give a prediction: its version's, those of the version now served, or "out of
        scope"."""
        slot = self.served.slots.get(prediction.model_name)
        return (
            self.labels_of(prediction.model_name, prediction.model_version)
            | set(slot.current.labels if slot else ())
            | {self.out_of_scope_label(prediction.model_name)}
        )

    def out_of_scope_label(self, name: str) -> str:
        """The label that marks a message none of a model's labels covers: the assistant's scope.label for its
        intent model, out_of_scope for any other (it trains as a label of its own)."""
        if self.chat is not None and name == self.chat.runtime.definition.intent_model:
            return self.chat.runtime.definition.scope.label
        return OUT_OF_SCOPE


async def get_state(request: Request) -> ServerState:
    return cast(ServerState, request.app.state.tuneloop)


async def get_chat(state: Annotated[ServerState, Depends(get_state)]) -> ChatService:
    if state.chat is None:
        raise NotFound("no assistant is configured on this server (serve.assistant=assistant.yaml)")
    return state.chat


State = Annotated[ServerState, Depends(get_state)]
Chat = Annotated[ChatService, Depends(get_chat)]
