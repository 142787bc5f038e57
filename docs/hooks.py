"""MkDocs hooks: the reference pages and the benchmarks page are generated from the code and from
bench/results/ at build time, so they can never drift from what the program does or what was measured.

A page asks for a generated block with a marker line: `<!-- generated: NAME -->`.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)
# A figure in a sentence, from a results file: {{ result train_classifier-banking77 tuneloop.accuracy percent }}.
FIGURE = re.compile(r"\{\{ result ([\w.+-]+) ([\w.]+) (\w+) \}\}")


def on_page_markdown(markdown: str, page: Any = None, **_: Any) -> str:
    depth = page.file.src_uri.count("/") if page is not None else 0
    benchmarks = "../" * depth + "benchmarks.md"
    markdown = FIGURE.sub(lambda match: _bench_report().figure(*match.groups(), page=benchmarks), markdown)
    return MARKER.sub(lambda match: GENERATORS[match[1]](), markdown)


# --- configuration reference -------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return " \\| ".join(_type_name(arg) for arg in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = str(value)
    if hasattr(value, "get_secret_value"):
        value = "****"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _fields_table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | what |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _section_model(field.annotation) is not None and get_origin(field.annotation) is not dict:
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
    return rows if len(rows) > 2 else []


def config_reference() -> str:
    from tuneloop.config import (
        ClassifierRecipe,
        GateSettings,
        PredictSettings,
        PretrainRecipe,
        ServerSettings,
        SftRecipe,
    )

    roots = [
        ("tuneloop train, eval, data, retrain, feedback export, demo", ClassifierRecipe),
        ("tuneloop pretrain", PretrainRecipe),
        ("tuneloop sft", SftRecipe),
        ("tuneloop serve", ServerSettings),
        ("tuneloop gate", GateSettings),
        ("tuneloop predict", PredictSettings),
    ]
    out: list[str] = []
    for commands, root in roots:
        out += [f"## {root.__name__}", "", f"*{commands}.* {inspect.getdoc(root) or ''}", ""]
        out += _fields_table(root, "")
        # The shared registry section last: each root's own sections first.
        out += _sections(root, "", sorted(root.model_fields.items(), key=lambda item: item[0] == "registry"))
        out.append("")
    return "\n".join(out)


def _sections(model: type[BaseModel], prefix: str, fields: list[tuple[str, Any]]) -> list[str]:
    """A table per section of `model`, and per section within it (train.dp)."""
    out: list[str] = []
    for name, field in fields:
        section = _section_model(field.annotation)
        if section is None:
            continue
        keyed = get_origin(field.annotation) is dict
        inner = f"{prefix}{name}.<task>." if keyed else f"{prefix}{name}."
        out += ["", f"### `{inner.rstrip('.')}`", "", inspect.getdoc(section) or "", ""]
        out += _fields_table(section, inner)
        out += _sections(section, inner, list(section.model_fields.items()))
    return out


# --- command reference -------------------------------------------------------------------------------


def _commands(group: Any, prefix: str) -> list[tuple[str, Any]]:
    """(command path, command) of every leaf command under a (typer's own click) group."""
    found: list[tuple[str, Any]] = []
    for name in sorted(group.commands):
        command = group.commands[name]
        if hasattr(command, "commands"):
            found += _commands(command, f"{prefix} {name}")
        else:
            found.append((f"{prefix} {name}", command))
    return found


def cli_reference() -> str:
    from tuneloop.cli import app

    out: list[str] = []
    for path, command in _commands(typer.main.get_command(app), "tuneloop"):
        out += [f"## `{path}`", "", inspect.cleandoc(command.help or ""), ""]
        rows = ["| argument or option | what |", "|---|---|"]
        for param in command.params:
            if param.name == "help":
                continue
            is_option = param.param_type_name == "option"
            label = (
                " / ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
                if is_option
                else (f"`{(param.name or '').upper()}`" + (" …" if param.nargs == -1 else ""))
            )
            help_text = (getattr(param, "help", None) or "").replace("|", "\\|")
            if is_option and not param.is_flag and param.default not in (None, ()):
                help_text += f" (default {param.default})"
            rows.append(f"| {label} | {help_text} |")
        out += rows + [""]
    return "\n".join(out)


# --- HTTP routes -------------------------------------------------------------------------------------


def http_routes() -> str:
    from fastapi.routing import APIRoute

    from tuneloop.serve.routes import admin, chat, feedback, models, ops, predict

    rows = ["| method and path | key | what |", "|---|---|---|"]
    for module in (predict, feedback, models, chat, admin, ops):
        for route in module.router.routes:
            if not isinstance(route, APIRoute):
                continue
            dependencies = [*module.router.dependencies, *route.dependencies]
            needs = {getattr(d.dependency, "__name__", "") for d in dependencies}
            key = "admin" if "require_admin" in needs else ("client" if "require_client" in needs else "none")
            summary = (inspect.getdoc(route.endpoint) or "").split("\n\n")[0].replace("\n", " ")
            rows.append(f"| `{' '.join(sorted(route.methods))} {route.path}` | {key} | {summary} |")
    return "\n".join(rows)


# --- benchmarks --------------------------------------------------------------------------------------


def _bench_report() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmarks() -> str:
    return str(_bench_report().benchmarks_markdown())


GENERATORS = {
    "config-reference": config_reference,
    "cli-reference": cli_reference,
    "http-routes": http_routes,
    "benchmarks": benchmarks,
    # Only the assistant guide (docs/guide/) asks for it: its links go one folder up.
    "scope-results": lambda: str(_bench_report().scope_table(page="../benchmarks.md")),
}
