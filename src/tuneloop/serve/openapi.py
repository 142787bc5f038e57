"""The OpenAPI document as this server behaves, not only as its code reads.

FastAPI builds the document from the routes alone. Three things depend on how the server runs, and a client
generated from the document (or a fuzzer such as schemathesis) must not be told otherwise:
- with no client keys configured, the client routes take no key, so they declare no security requirement
  (nor does /metrics unless serve.metrics_need_key);
- with several models served, /v1/predict needs `model`, and it is one of their names;
- the request limits (serve.max_texts, serve.max_text_chars, serve.explain_max_texts) are the schemas'
  maxItems and maxLength.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from tuneloop.serve.deps import ServerState
from tuneloop.serve.security import require_client, require_metrics_access


def _operations_depending_on(routers: Iterable[APIRouter], dependency: Callable[..., Any]) -> list[tuple[str, str]]:
    """(path, method) of every route that depends on `dependency`, whether the route or a parameter declares it."""
    return [
        (route.path, method.lower())
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and any(d.call is dependency for d in route.dependant.dependencies)
        for method in route.methods or ()
    ]


def serve_live_document(app: FastAPI, routers: Iterable[APIRouter], state: ServerState) -> None:
    """Make `app.openapi()` (and so /openapi.json and /docs) describe the running server; call it once
    `routers` are included."""
    code_document = app.openapi()  # built from the routes once and kept by FastAPI
    client_operations = _operations_depending_on(routers, require_client)
    metrics_operations = _operations_depending_on(routers, require_metrics_access)
    settings = state.config.serve

    def live_document() -> dict[str, Any]:
        document = copy.deepcopy(code_document)
        open_operations = (client_operations if state.keys.client_open else []) + (
            [] if settings.metrics_need_key else metrics_operations
        )
        for path, method in open_operations:
            document["paths"][path][method].pop("security", None)
        schemas = document["components"]["schemas"]
        predict = schemas["PredictRequest"]
        predict["properties"]["texts"]["maxItems"] = settings.max_texts
        predict["properties"]["texts"]["items"]["maxLength"] = settings.max_text_chars
        if settings.explain_max_texts:  # explanations cost far more than predictions: fewer texts per request
            predict["if"] = {"properties": {"explain": {"const": True}}, "required": ["explain"]}
            predict["then"] = {"properties": {"texts": {"maxItems": settings.explain_max_texts}}}
        else:
            predict["properties"]["explain"]["const"] = False
        if "ChatRequest" in schemas:
            schemas["ChatRequest"]["properties"]["message"]["maxLength"] = settings.max_text_chars
        names = state.served.names
        if len(names) > 1:
            predict["properties"]["model"] = {
                "type": "string",
                "enum": names,
                "title": "Model",
                "description": "Model name: this server serves several.",
            }
            predict["required"] = [*predict.get("required", []), "model"]
        return document

    app.openapi = live_document  # type: ignore[method-assign]
