"""The `tuneloop` command: one verb per lifecycle stage, each a thin shell over the packages.

A command reads its config root (see `tuneloop.config`), calls one function and prints what it returned.
Any `TuneloopError` becomes one red line and exit code 1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tuneloop.config import (
    ClassifierRecipe,
    GateSettings,
    PredictSettings,
    PretrainRecipe,
    PrivacyConfig,
    RegistrySettings,
    ServerSettings,
    SftRecipe,
    is_override,
    load_config,
    split_overrides,
)
from tuneloop.errors import TuneloopError, first_line

if TYPE_CHECKING:
    from tuneloop.assistant.scope import ScopeThreshold
    from tuneloop.data.prepare import DataReport
    from tuneloop.evaluate.explain import Explanation
    from tuneloop.evaluate.schema import SplitScores
    from tuneloop.feedback.log import PredictionLog
    from tuneloop.feedback.retention import Erased
    from tuneloop.feedback.review import Decision
    from tuneloop.models.predictor import Prediction, Predictor
    from tuneloop.profiling import SummaryJson
    from tuneloop.registry import ModelVersion, Registry, VersionFolder
    from tuneloop.training.classification import ClassifierOutcome

app = typer.Typer(
    help="From labelled texts to a served classifier that learns from its users' corrections.",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and prepare labelled data.", no_args_is_help=True)
models_app = typer.Typer(
    help="List, show, promote, roll back, export and archive model versions.", no_args_is_help=True
)
feedback_app = typer.Typer(help="Turn user feedback into labelled examples.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the server.", no_args_is_help=True)
db_app = typer.Typer(help="The database behind the registry and the prediction log.", no_args_is_help=True)
log_app = typer.Typer(help="The prediction log.", no_args_is_help=True)
privacy_app = typer.Typer(help="Users' texts: how long they are kept, and erasing one.", no_args_is_help=True)
assistant_app = typer.Typer(help="The support assistant: where it says no.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(feedback_app, name="feedback")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(log_app, name="log")
app.add_typer(privacy_app, name="privacy")
app.add_typer(assistant_app, name="assistant")

console = Console()
errors = Console(stderr=True)
Root = TypeVar("Root", bound=BaseModel)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=3e-5 name=support.")]
DataOption = Annotated[Path | None, typer.Option("--data", help="Data file (same as data.path=...).")]
ResumeOption = Annotated[str | None, typer.Option(help="Run folder to continue, or 'latest'.")]


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a TuneloopError into one red line and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TuneloopError as exc:
            errors.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            errors.print("[yellow]interrupted[/yellow]; training runs continue with --resume latest")
            raise typer.Exit(130) from None

    return wrapper


def _config(root: type[Root], path: Path | None, overrides: list[str] | None, data: Path | None = None) -> Root:
    pairs = list(overrides or [])
    if data is not None:
        pairs.append(f"data.path={data}")
    return load_config(path, pairs, root)


def _registry(path: Path | None, overrides: list[str] | None) -> Registry:
    from tuneloop.registry import Registry

    return Registry(_config(RegistrySettings, path, overrides).registry)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show info logs.")] = False) -> None:
    # Weights come only from installed packages and local folders; never let a library reach for a hub.
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(variable, "1")
    # Busy-waiting OpenMP threads slowed training ~7x when another process shared the 2 cores (measured);
    # passive waiting costs nothing when the machine is idle. Only effective before torch loads, which the
    # commands below do lazily.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Everything tuneloop writes (registry database, version folders with users' texts, rescue files, keys'
    # hashes) is readable by its owner only.
    os.umask(0o077)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=errors, show_path=False)],
        force=True,
    )
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _print_data_report(report: DataReport) -> None:
    table = Table(title=f"Data: {report['source']}")
    for column in ("label", "train", "val", "test"):
        table.add_column(column, justify="left" if column == "label" else "right")
    counts = report["class_counts"]
    for label in report["labels"]:
        table.add_row(label, *(str(counts[s][label]) for s in ("train", "val", "test")))
    console.print(table)
    lengths = report["text_length"]
    console.print(
        f"rows read {report['rows_read']}, kept {report['rows_kept']}; dropped: "
        + ", ".join(f"{k} {v}" for k, v in report["dropped"].items())
        + f"; imbalance (max/min train class) {report['imbalance_ratio']}"
    )
    console.print(
        f"text length in {lengths.get('unit')}: p50 {lengths.get('p50')}, p95 {lengths.get('p95')}, "
        f"max {lengths.get('max')}"
    )
    for conflict in report["conflicts"][:5]:
        console.print(
            f"[yellow]conflicting labels[/yellow] {escape(str(conflict['labels']))} for: "
            f"{escape(repr(conflict['text'][:80]))} "
            f"(rows {conflict['rows']}, kept: {conflict['kept_label']})"
        )
    near = report.get("near_duplicates")  # absent from data reports written before the check existed
    if near and near["clusters"]:
        console.print(
            f"near-duplicates (Jaccard ≥ {near['threshold']}): {near['clusters']} clusters, "
            f"{near['rows_in_clusters']} rows, {near['clusters_with_different_labels']} with different labels"
            + (f"; {near['dropped']} rows dropped" if "dropped" in near else " (data.near_duplicates=drop keeps one)")
        )
    leakage = report.get("leakage")
    if leakage:
        for name in ("val", "test"):
            found = leakage[name]
            if found["rows"]:
                verb = "dropped" if leakage["policy"] == "drop" else "have"
                console.print(
                    f"[yellow]leakage[/yellow]: {found['rows']} {name} rows ({found['share']:.1%}) {verb} a "
                    f"near-duplicate in train, e.g. {escape(repr(found['examples'][0]['text'][:60]))} ~ "
                    f"{escape(repr(found['examples'][0]['train_text'][:60]))}"
                )


def _print_label_suspects(metrics: SplitScores) -> None:
    suspects = metrics.label_suspects
    if suspects and suspects.count:
        console.print(
            f"{suspects.count} test rows may be mislabelled (the model is ≥ {suspects.confidence:.2f} "
            f"sure of another label): listed under 'Possible label errors' in the report"
        )


def _print_profile(summary: SummaryJson, folder: VersionFolder) -> None:
    from tuneloop.profiling import PROFILE_FOLDER, TRACE_FILE, ProfileSummary

    console.print(f"[bold]where the time went[/bold] (trace: {folder.root / PROFILE_FOLDER / TRACE_FILE})")
    for line in ProfileSummary.from_dict(summary).lines():
        console.print(line, markup=False, highlight=False)


def _print_test_scores(outcome: ClassifierOutcome) -> None:
    from tuneloop.evaluate.report import baseline_line, calibration_line, leakage_line, long_texts_line, regime_line
    from tuneloop.evaluate.serving import describe

    assert outcome.report is not None
    test = outcome.report.test
    console.print(
        f"[green]test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}, "
        f"ECE {test.calibration.ece:.3f}[/green] (trained {outcome.train.train_seconds:.0f}s on "
        f"{outcome.train.device}, best epoch {outcome.train.best_epoch})"
    )
    if outcome.report.serving:
        console.print(f"scored as it serves: {describe(outcome.report.serving)}", markup=False)
    if outcome.report.regime:
        console.print(regime_line(outcome.report.regime), markup=False)
    if outcome.report.baseline:
        console.print(baseline_line(outcome.report.baseline), markup=False)
    if outcome.report.long_texts:
        console.print(long_texts_line(outcome.report.long_texts), markup=False)
    if test.calibration_before is not None:
        console.print(calibration_line(test), markup=False)
    if test.leakage and test.leakage.rows:
        console.print(leakage_line(test.leakage, test.n), markup=False)
    privacy = outcome.train.privacy
    if privacy:
        console.print(
            f"differential privacy: ε = {privacy.epsilon:.2f} spent of {privacy.target_epsilon:g} "
            f"(δ = {privacy.delta:.1e}, noise multiplier {privacy.noise_multiplier:.3f})"
        )
    for task, task_report in outcome.report.other_tasks().items():
        console.print(
            f"[green]task {task}: test accuracy {task_report.test.accuracy:.4f}, "
            f"macro-F1 {task_report.test.macro_f1:.4f}[/green]"
        )


@data_app.command("inspect")
def data_inspect(
    config: ConfigOption = None,
    data: DataOption = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Clean, deduplicate and split in memory; print the data report."""
    from tuneloop.models.encoders import prepare_for_model
    from tuneloop.registry import Registry

    recipe = _config(ClassifierRecipe, config, overrides, data)
    prepared, encoder = prepare_for_model(recipe, Registry(recipe.registry))
    prepared.report["encoder"] = encoder.name
    if as_json:
        print(json.dumps(prepared.report, indent=2, ensure_ascii=False))
        return
    _print_data_report(prepared.report)
    console.print(f"encoder for this data: [bold]{encoder.name}[/bold]; fingerprint {prepared.fingerprint}")


@data_app.command("audit")
def data_audit(
    config: ConfigOption = None,
    data: DataOption = None,
    overrides: Overrides = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the ranked, editable CSV of likely label errors.")
    ] = Path("label_issues.csv"),
    show: Annotated[int, typer.Option("--show", min=0, help="Rows to print, most suspicious first.")] = 15,
) -> None:
    """Find training rows whose label is probably wrong (confident learning on out-of-fold probabilities)."""
    from tuneloop.evaluate.audit import audit_training_labels
    from tuneloop.models.encoders import prepare_for_model
    from tuneloop.registry import Registry

    recipe = _config(ClassifierRecipe, config, overrides, data)
    prepared, encoder = prepare_for_model(recipe, Registry(recipe.registry))
    audit = audit_training_labels(prepared, encoder, recipe.data.kfold, recipe.data.seed)
    audit.write_csv(out)
    _print_audit(audit.summary, show)
    console.print(
        f"wrote {out}: mark the rows you confirm (confirmed = yes), then train with data.exclude={out}", markup=False
    )


def _print_audit(summary: dict[str, Any], show: int) -> None:
    console.print(
        f"{summary['flagged']} of {summary['rows_audited']} training rows ({summary['share']:.1%}) look mislabelled "
        f"({summary['method']}, {summary['folds']} folds)",
        markup=False,
    )
    if not summary["flagged"] or not show:
        return
    table = Table(title="Likely label errors, most suspicious first")
    for column in ("row", "text", "label", "suggested", "p(label)"):
        table.add_column(column)
    for issue in summary["top"][:show]:
        table.add_row(
            str(issue["row"]),
            escape(str(issue["text"])[:100]),
            escape(issue["label"]),
            escape(issue["suggested"]),
            f"{issue['label_probability']:.2f}",
        )
    console.print(table)


@data_app.command("prepare")
def data_prepare(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the splits and report.")],
    config: ConfigOption = None,
    data: DataOption = None,
    overrides: Overrides = None,
) -> None:
    """Write cleaned train/val/test splits (jsonl) and data_report.json to a folder."""
    from tuneloop.data.prepare import save_prepared
    from tuneloop.models.encoders import prepare_for_model
    from tuneloop.registry import Registry

    recipe = _config(ClassifierRecipe, config, overrides, data)
    prepared, _ = prepare_for_model(recipe, Registry(recipe.registry))
    save_prepared(prepared, out)
    _print_data_report(prepared.report)
    console.print(f"wrote {out}")


@app.command()
def train(
    config: ConfigOption = None,
    data: DataOption = None,
    overrides: Overrides = None,
    resume: ResumeOption = None,
    register: Annotated[bool, typer.Option(help="Register the result as a candidate version.")] = True,
    profile: Annotated[
        bool, typer.Option("--profile", help="Profile the first train.profile_steps steps (train.profile=true).")
    ] = False,
    audit: Annotated[
        bool, typer.Option("--audit", help="Rank likely label errors in the training data first (train.audit=true).")
    ] = False,
) -> None:
    """Fine-tune a classifier, evaluate it on the test split and register it."""
    from tuneloop.training import classification

    recipe = _config(ClassifierRecipe, config, overrides, data)
    if profile:
        recipe.train.profile = True
    if audit:
        recipe.train.audit = True
    outcome = classification.run(recipe, resume=resume, register=register)
    if outcome.report is None:  # another rank than 0 of a torchrun launch: rank 0 reports
        return
    data_report = outcome.report.data or {}
    if "label_audit" in data_report:
        _print_audit(data_report["label_audit"], show=5)
    if outcome.train.profile:
        _print_profile(outcome.train.profile, outcome.folder)
    _print_test_scores(outcome)
    if outcome.cross_validation:
        cv = outcome.cross_validation
        console.print(f"{cv.k}-fold validation macro-F1 {cv.mean_val_macro_f1:.4f} ± {cv.std_val_macro_f1:.4f}")
    _print_label_suspects(outcome.report.test)
    console.print(f"report: {outcome.report_html}")
    if outcome.version:
        console.print(
            f"registered [bold]{outcome.version.ref}[/bold] (candidate); promote with: "
            f"tuneloop models promote {outcome.version.ref}"
        )


@app.command()
def pretrain(
    config: ConfigOption = None,
    overrides: Overrides = None,
    resume: ResumeOption = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help="Unlabelled text file(s) (pretrain.paths).")] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="New tokenizer and small BERT.")] = False,
) -> None:
    """Masked-language-model pretraining on unlabelled text; the encoder is registered for `train` to start from."""
    from tuneloop.training import mlm

    recipe = _config(PretrainRecipe, config, overrides)
    if data:
        recipe.pretrain.paths = list(data)
    if from_scratch:
        recipe.pretrain.from_scratch = True
    outcome = mlm.run(recipe, resume=resume)
    if outcome.version is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return
    last = outcome.history[-1]
    assert outcome.corpus is not None  # the rank that registers has saved the encoder and its corpus summary
    console.print(
        f"[green]held-out perplexity {last['heldout_perplexity']:.2f}[/green] (loss {last['heldout_loss']:.3f}, "
        f"over the corpus's {outcome.corpus['corpus_vocabulary']} tokens) after {outcome.train_seconds:.0f}s; "
        f"{outcome.corpus['texts']} texts in {outcome.corpus['train_blocks']} blocks"
    )
    console.print(
        f"registered [bold]{outcome.version.ref}[/bold]; fine-tune from it with: tuneloop train "
        f"model.name={outcome.version.ref} --data labelled.csv",
        soft_wrap=True,
    )


@app.command()
def sft(
    config: ConfigOption = None,
    overrides: Overrides = None,
    data: Annotated[
        list[Path] | None, typer.Option("--data", help="Conversations: jsonl or table (sft.paths).")
    ] = None,
) -> None:
    """Fine-tune the small causal LM on (prompt, reply) pairs or chats; loss on the replies only."""
    from tuneloop.training import sft as sft_recipe

    recipe = _config(SftRecipe, config, overrides)
    if data:
        recipe.sft.paths = list(data)
    outcome = sft_recipe.run(recipe)
    if outcome.version is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return
    last = outcome.history[-1]
    if outcome.heldout_loss_before is not None:
        console.print(
            f"[green]held-out loss {outcome.heldout_loss_before:.3f} → {last['heldout_loss']:.3f}[/green] "
            f"(perplexity {last['heldout_perplexity']:.2f}) on {outcome.examples['heldout']} conversations, "
            f"{outcome.train_seconds:.0f}s of training"
        )
    console.print(
        f"registered [bold]{outcome.version.ref}[/bold]; try: tuneloop generate --model "
        f'{outcome.version.ref} "your question"',
        soft_wrap=True,
    )


@app.command()
def generate(
    model: Annotated[str, typer.Option("--model", "-m", help="SmolLM2-135M-Instruct, NAME@VERSION or a folder.")],
    prompt: Annotated[list[str], typer.Argument(help="The message (and optional registry.* overrides).")],
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable).")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come.")] = False,
    config: ConfigOption = None,
) -> None:
    """Generate a reply with a causal LM (streamed with --stream)."""
    from tuneloop.models.lm import GenerationSettings, ReplyModel, resolve_lm

    overrides = [t for t in prompt if is_override(t, RegistrySettings)]
    text = " ".join(t for t in prompt if not is_override(t, RegistrySettings)).strip()
    if not text:
        raise TuneloopError('nothing to answer: give a message, e.g. tuneloop generate -m NAME@1 "where is my order?"')
    replier = ReplyModel(resolve_lm(model, _registry(config, overrides)))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=list(stop or [])
    )
    if stream:
        for piece in replier.stream(messages, settings):
            print(piece, end="", flush=True)
        print()
    else:
        print(replier.generate(messages, settings))


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="NAME, NAME@VERSION or NAME@production.")],
    config: ConfigOption = None,
    data: DataOption = None,
    overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder (default: the version's).")] = None,
) -> None:
    """Evaluate a registered version on its frozen test split, or on every row of --data."""
    from tuneloop.evaluate.report import evaluate_version
    from tuneloop.registry import Registry

    recipe = _config(ClassifierRecipe, config, overrides)
    report, page = evaluate_version(Registry(recipe.registry), model, recipe, data=data, out=out)
    metrics = report.test
    console.print(
        f"accuracy {metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f}, weighted-F1 "
        f"{metrics.weighted_f1:.4f}, ECE {metrics.calibration.ece:.3f} on {metrics.n} rows"
    )
    skipped = metrics.skipped_unknown_labels
    if skipped:
        console.print(
            f"[yellow]skipped {skipped.rows} rows with labels the model does not know:[/yellow] "
            f"{', '.join(skipped.labels)}"
        )
    _print_label_suspects(metrics)
    console.print(f"report: {page}")


@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Option(help="Only this model name.")] = None,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Registered versions with stage and headline metrics."""
    versions = _registry(config, overrides).versions(name)
    if not versions:
        console.print("no registered models yet: tuneloop train --data your.csv")
        return
    table = Table(title="Registered models")
    for column in ("name", "version", "stage", "base model", "accuracy", "macro-F1", "created"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            v.name,
            str(v.version),
            v.stage,
            v.base_model,
            f"{v.metrics.get('accuracy', 0):.4f}",
            f"{v.metrics.get('macro_f1', 0):.4f}",
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@models_app.command("show")
def models_show(ref: str, config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Everything recorded about one version, as JSON."""
    from tuneloop.registry.store import to_json

    print(to_json(_registry(config, overrides).get(ref)))


@models_app.command("promote")
def models_promote(ref: str, config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Make a version production (the previous production version is archived), after checking that it loads."""
    from tuneloop.models.predictor import verify_loads

    registry = _registry(config, overrides)
    verify_loads(registry.get(ref), registry)
    version = registry.promote(ref)
    console.print(f"{version.ref} is now production")


@models_app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(help="Model name.")], config: ConfigOption = None, overrides: Overrides = None
) -> None:
    """Put back the version that was production before the current one, after checking that it loads."""
    from tuneloop.models.predictor import verify_loads

    registry = _registry(config, overrides)
    current = registry.get(f"{name}@production")
    verify_loads(registry.previous_production(name), registry)
    restored = registry.rollback(name)
    console.print(f"{restored.ref} is production again ({current.ref} archived)")


@models_app.command("export")
def models_export(
    ref: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")],
    merge: Annotated[bool, typer.Option(help="Merge LoRA adapters into full weights (standalone).")] = False,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Copy a version's classifier folder out of the registry, LoRA adapters merged on request."""
    from tuneloop.models.classifier import export_classifier

    registry = _registry(config, overrides)
    version = registry.get(ref)
    export_classifier(registry.folder(version).model, out, merge)
    console.print(f"exported {version.ref} to {out}{' (adapters merged)' if merge else ''}")


@models_app.command("archive")
def models_archive(ref: str, config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Retire a version."""
    version = _registry(config, overrides).archive(ref)
    console.print(f"{version.ref} archived")


def _texts_and_overrides(
    arguments: list[str] | None, root: type[BaseModel] = RegistrySettings
) -> tuple[list[str], list[str]]:
    """A command's positional arguments split into texts and overrides of `root` (which may follow them)."""
    items = list(arguments or [])
    return [t for t in items if not is_override(t, root)], [t for t in items if is_override(t, root)]


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="NAME, NAME@VERSION or NAME@production.")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to classify (and optional registry.* and privacy.* overrides).")
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option("--input", "-i", help="File with one text per line; with --output any csv/tsv/jsonl/parquet."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Predict the whole --input file into this parquet/csv/jsonl file (streamed, resumable).",
        ),
    ] = None,
    text_column: Annotated[str, typer.Option(help="The --input file's text column.")] = "text",
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows read, predicted and written at a time.")] = 10_000,
    runtime: Annotated[
        str | None, typer.Option(help="torch, onnx or onnx-int8 (default: what the version was evaluated with).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 3,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per text.")] = False,
) -> None:
    """Classify texts with a registered model: label, probability and top-k; or a whole file with --output, whose
    text column is masked as privacy.mask says (by default as the version's training data was)."""
    from tuneloop.models.predictor import load_model
    from tuneloop.registry import Registry

    items, overrides = _texts_and_overrides(texts, PredictSettings)
    settings = _config(PredictSettings, config, overrides)
    if output is not None:
        if input_file is None or items:
            raise TuneloopError("--output predicts a whole file: give it --input FILE and no texts")
        predictor = load_model(model, Registry(settings.registry), runtime)
        _predict_file(predictor, input_file, output, text_column, chunk_rows, settings.privacy)
        return
    if input_file is not None:
        if not input_file.is_file():
            raise TuneloopError(f"input file not found: {input_file}")
        try:
            items += [line.strip() for line in input_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise TuneloopError(f"{input_file} is not valid UTF-8; re-save it as UTF-8") from None
    if not items:
        raise TuneloopError("nothing to classify: give texts as arguments or --input file.txt")
    predictor = load_model(model, Registry(settings.registry), runtime)
    results = predictor.rank(items, top_k=top_k)
    if as_json:
        for r in results:
            print(
                json.dumps(
                    {
                        "text": r.text,
                        "label": r.label,
                        "probability": r.probability,
                        "top_k": [{"label": lab, "probability": p} for lab, p in r.top_k],
                        "model": predictor.ref,
                    },
                    ensure_ascii=False,
                )
            )
        return
    table = Table(title=f"Predictions by {predictor.ref}")
    for column in ("text", "label", "probability", f"top {top_k}"):
        table.add_column(column)
    for r in results:
        table.add_row(r.text, r.label, f"{r.probability:.3f}", ", ".join(f"{lab} {p:.2f}" for lab, p in r.top_k))
    console.print(table)


def _predict_file(
    predictor: Predictor,
    input_file: Path,
    output: Path,
    text_column: str,
    chunk_rows: int,
    privacy: PrivacyConfig | None,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tuneloop.models.batch import count_rows, predict_file

    total = count_rows(input_file) if input_file.is_file() else None  # a missing file: predict_file says so
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"{predictor.ref} ({predictor.runtime})", total=total)
        outcome = predict_file(
            predictor, input_file, output, text_column, chunk_rows, lambda rows: progress.advance(task, rows), privacy
        )
    resumed = f", {outcome.chunks_resumed} of {outcome.chunks} chunks from an interrupted run"
    said = f"wrote {outcome.rows} predictions to {output}{resumed if outcome.chunks_resumed else ''}"
    console.print(said, markup=False, soft_wrap=True)


@app.command()
def explain(
    model: Annotated[str, typer.Option("--model", "-m", help="NAME, NAME@VERSION or NAME@production.")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to explain (and optional registry.* overrides).")
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", "-l", help="Explain this label instead of the predicted one.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=4, max=1000, help="Integration steps (more: closer).")] = 50,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per text.")] = False,
) -> None:
    """Which words made the model choose its label: Integrated Gradients per word (green: for, red: against)."""
    from tuneloop.data.clean import clean_text
    from tuneloop.evaluate.explain import explain as explain_texts
    from tuneloop.models.predictor import load_model

    items, overrides = _texts_and_overrides(texts)
    items = [clean_text(t) for t in items]
    if not items:
        raise TuneloopError('nothing to explain: give texts as arguments, e.g. tuneloop explain -m NAME "my text"')
    if not all(items):
        raise TuneloopError("cannot explain an empty text (nothing is left after cleaning): give the words to explain")
    predictor = load_model(model, _registry(config, overrides), runtime="torch")  # gradients need PyTorch
    explained = explain_texts(*predictor.transformer, items, [label] * len(items), steps)
    for explanation in explained:
        if as_json:
            print(json.dumps({**explanation.as_dict(), "model": predictor.ref}, ensure_ascii=False))
            continue
        console.print(
            f"[bold]{escape(explanation.label)}[/bold] {explanation.probability:.3f} "
            f"(all-padding baseline {explanation.baseline_probability:.3f})"
        )
        console.print(shaded(explanation), soft_wrap=True)


def shaded(explanation: Explanation) -> Text:
    """The text with each word's background shaded by its attribution: green adds to the label, red takes
    away; the strongest word in either direction is the most saturated."""
    from tuneloop.evaluate.explain import shaded_pieces

    text = Text()
    words = [(w.start, w.end, w.score) for w in explanation.words]
    for piece, score, strength in shaded_pieces(explanation.text, words):
        if score is None:
            text.append(piece)
            continue
        mix = int(255 * (1 - 0.75 * strength))
        background = f"rgb({mix},255,{mix})" if score >= 0 else f"rgb(255,{mix},{mix})"
        text.append(piece, style=f"black on {background}")
    return text


class RichDemoReport:
    """The demo's stages as the terminal shows them."""

    def stage(self, number: int, title: str) -> None:
        console.rule(f"tuneloop demo {number}/3: {title}")

    def intents_trained(self, outcome: ClassifierOutcome, version: ModelVersion, examples: list[Prediction]) -> None:
        assert outcome.report is not None
        _print_data_report(outcome.report.data or {})
        test = outcome.report.test
        console.print(
            f"[green]test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}[/green] "
            f"in {outcome.train.train_seconds:.0f}s of training"
        )
        console.print(f"report: {outcome.report_html}")
        console.print(f"registered and promoted: [bold]{version.ref}[/bold] (stage {version.stage})")
        table = Table(title="Example predictions")
        for column in ("text", "intent", "probability"):
            table.add_column(column)
        for r in examples:
            table.add_row(r.text, r.label, f"{r.probability:.3f}")
        console.print(table)

    def sentiment_trained(self, outcome: ClassifierOutcome, version: ModelVersion) -> None:
        assert outcome.report is not None
        test = outcome.report.test
        console.print(
            f"[green]test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}[/green]; "
            f"registered and promoted: [bold]{version.ref}[/bold]; report: {outcome.report_html}"
        )


@app.command()
def demo(
    config: ConfigOption = None,
    overrides: Overrides = None,
    serve_after: Annotated[bool, typer.Option("--serve", help="Then serve the assistant on serve.port.")] = False,
) -> None:
    """Train the bundled bilingual intent and sentiment models and build the support assistant on them."""
    from tuneloop import demo as bundled

    outcome = bundled.run(config, overrides, RichDemoReport())
    table = Table(title="A few turns (sessions a-e)")
    for column in ("session", "message", "intent", "sentiment", "escalate", "reply"):
        table.add_column(column)
    for turn in outcome.turns:
        result = turn.outcome
        table.add_row(
            turn.session,
            turn.message,
            result.intent or "[red]out of scope[/red]",
            result.sentiment,
            result.reason or "",
            result.reply,
        )
    console.print(table)
    _print_scope(outcome.intents_version.ref, outcome.scope)
    server_overrides, _ = split_overrides(overrides or [], ("registry", *bundled.SERVER_SECTIONS))
    server = load_config(None, [*server_overrides, f"serve.assistant={outcome.assistant}"], ServerSettings)
    home = outcome.recipe.registry.home
    # soft_wrap: a command broken over two lines by the terminal width cannot be copied and pasted.
    console.print(
        f'try: tuneloop predict --model {outcome.intents_version.name} "where is my parcel?" registry.home={home}',
        soft_wrap=True,
    )
    console.print(
        f"chat with it: tuneloop serve serve.assistant={outcome.assistant} registry.home={home}", soft_wrap=True
    )
    console.print(
        f"  then open http://{server.serve.host}:{server.serve.port}/ (chat) and /admin (versions, feedback "
        f"review, retrain → gate → promote; the first start prints its admin key); API docs at /docs"
    )
    if serve_after:
        _serve(server)


def _print_scope(ref: str, threshold: ScopeThreshold) -> None:
    """What an intent version's out-of-scope threshold is expected to do, and what falls short."""
    console.print(f"scope of {ref}: {escape(threshold.summary())}", soft_wrap=True)
    for note in threshold.notes:
        console.print(f"  [yellow]note:[/yellow] {escape(note)}", soft_wrap=True)


@app.command()
def serve(
    config: ConfigOption = None,
    overrides: Overrides = None,
    host: Annotated[str | None, typer.Option(help="Bind address (serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (serve.port).")] = None,
) -> None:
    """Serve the production version of your models over HTTP (predict, feedback, hot swap, metrics), and the
    assistant when serve.assistant names a definition. Settings also come from TUNELOOP_* variables."""
    settings = _config(ServerSettings, config, overrides)
    if host is not None:
        settings.serve.host = host
    if port is not None:
        settings.serve.port = port
    _serve(settings)


def _serve(settings: ServerSettings) -> None:
    import uvicorn

    from tuneloop.serve.app import create_app
    from tuneloop.serve.http import uvicorn_config
    from tuneloop.serve.security import HOME_ADMIN_KEYS, KeyRing, make_first_admin_key
    from tuneloop.training.common import use_threads

    use_threads(settings.serve.threads)
    application = create_app(settings)  # a config that cannot serve fails before a key is made
    admin_key = make_first_admin_key(settings)
    if admin_key is not None:
        application.state.tuneloop.keys = KeyRing(settings)  # now with the home's new key
        console.print(
            f"no admin key was configured, so one was made; it is shown this once (only its hash is kept, in "
            f"{settings.registry.home / HOME_ADMIN_KEYS}): [bold]{admin_key}[/bold]",
            soft_wrap=True,
        )
    chat = application.state.tuneloop.chat
    for ref, threshold in (chat.runtime.thresholds if chat is not None else {}).items():
        _print_scope(ref, threshold)
    served = ", ".join(slot.current.ref for slot in application.state.tuneloop.served.slots.values())
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    pages = f"; chat: {url}/, admin: {url}/admin" if settings.serve.assistant else f"; admin: {url}/admin"
    console.print(f"serving [bold]{served}[/bold] on {url} (API docs: {url}/docs{pages}); Ctrl+C stops")
    server = uvicorn.Server(uvicorn_config(application, settings.serve))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn has shut down cleanly, then passes on the signal it caught
        console.print("stopped: queued requests were answered and the prediction log flushed")
        return
    if not server.started:  # the port is taken, say (uvicorn has logged why)
        raise typer.Exit(3)


# The curve's rows `tuneloop assistant scope` prints: these shares of in-scope messages turned away.
SCOPE_ROWS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)


@assistant_app.command("scope")
def assistant_scope(
    name: Annotated[str, typer.Argument(help="The assistant's name (one that has run on this home) or its YAML.")],
    move: Annotated[
        float | None, typer.Option("--move", help="Move the point to this threshold (the nearest on the curve).")
    ] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Move the point back to the policy's.")] = False,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Where the assistant says no for its production intent version: the curve of in-scope messages turned away
    against out-of-scope ones caught, the point it answers at, and what that point is expected to do."""
    import getpass

    from tuneloop.assistant.runtime import AssistantRuntime, find_definition
    from tuneloop.models.predictor import load_model

    registry = _registry(config, overrides)
    runtime = AssistantRuntime(find_definition(name, registry), registry)
    intent = load_model(f"{runtime.definition.intent_model}@production", registry)
    threshold = runtime.calibrate(intent)
    if move is not None or reset:
        threshold = runtime.move(intent, None if reset else move, f"cli:{getpass.getuser()}")
    table = Table(title=f"{runtime.definition.name}: where {intent.ref} says no")
    for column in ("threshold", "in-scope turned away", "out-of-scope caught", ""):
        table.add_column(column, justify="right")
    shown = {min(threshold.curve, key=lambda p: abs(p.in_scope_rejected - share)) for share in SCOPE_ROWS}
    now = min(threshold.curve, key=lambda p: abs(p.threshold - threshold.threshold))
    for point in sorted(shown | {now}, key=lambda p: p.threshold):
        table.add_row(
            f"{point.threshold:.4f}",
            f"{point.in_scope_rejected:.1%}",
            f"{point.out_of_scope_caught:.1%}",
            "[bold]◀ now[/bold]" if point == now else "",
        )
    console.print(table)
    console.print(escape(threshold.summary()), soft_wrap=True)
    for note in threshold.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    for step in runtime.moves(intent.ref):
        where = "the policy's point" if step["threshold"] is None else f"threshold {step['threshold']:.4f}"
        console.print(f"moved to {where} by {escape(step['by'])} at {step['at']}")


@feedback_app.command("export")
def feedback_export(
    name: Annotated[str, typer.Argument(help="Model name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="csv or jsonl file to write.")],
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Write the labelled examples in NAME's feedback: deduplicated, latest correction wins."""
    from tuneloop.feedback.export import load_feedback

    recipe = _config(ClassifierRecipe, config, overrides)
    exported = load_feedback(recipe.registry, name, recipe.feedback)
    exported.save(out)
    console.print(", ".join(f"{key.replace('_', ' ')} {value}" for key, value in exported.counts.items()))
    for conflict in exported.conflicts[:10]:
        console.print(
            f"[yellow]conflicting corrections[/yellow] {conflict['labels']} for {conflict['text'][:80]!r}; "
            f"kept the latest: {conflict['kept_label']}"
        )
    console.print(f"wrote {len(exported.examples)} examples to {out}")


def _prediction_log(config: Path | None, overrides: list[str] | None) -> PredictionLog:
    from tuneloop.feedback.log import PredictionLog

    registry = _config(RegistrySettings, config, overrides).registry
    return PredictionLog(registry.resolved_database_url(), registry.home)


@feedback_app.command("review")
def feedback_review(
    name: Annotated[str, typer.Argument(help="Model name.")],
    config: ConfigOption = None,
    overrides: Overrides = None,
    limit: Annotated[int, typer.Option(help="Most groups to show.")] = 50,
) -> None:
    """Show NAME's feedback that waits for a decision before it may train, grouped by text and proposed label,
    with its senders and flags; decide with tuneloop feedback approve/reject NAME --group ID."""
    from tuneloop.feedback.review import review_queue

    prediction_log = _prediction_log(config, overrides)
    try:
        groups = review_queue(name, prediction_log.feedback_for(name))
    finally:
        prediction_log.close()
    if not groups:
        console.print(f"no feedback on {name} waits for review")
        return
    for group in groups[:limit]:
        senders = ", ".join(f"{sender} ×{count}" for sender, count in list(group.senders.items())[:5])
        console.print(
            f"[bold]{group.group}[/bold]  {group.pending} pending: {escape(repr(group.text[:80]))} → "
            f"[bold]{escape(group.label)}[/bold] (model said {escape(group.predicted)})",
            soft_wrap=True,
        )
        console.print(f"  from {escape(senders)}" + (" …" if len(group.senders) > 5 else ""), soft_wrap=True)
        for flag in group.flags:
            console.print(f"  [yellow]flag:[/yellow] {escape(flag)}", soft_wrap=True)
    console.print(f"{sum(g.pending for g in groups)} feedback rows in {len(groups)} groups wait for review")


@feedback_app.command("suggest")
def feedback_suggest(
    name: Annotated[str, typer.Argument(help="Model name.")],
    budget: Annotated[int, typer.Option("--budget", "-n", min=1, help="How many predictions to suggest.")] = 20,
    window: Annotated[int, typer.Option(min=1, help="Latest predictions looked at.")] = 5_000,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write them to this CSV, with a label column to fill in.")
    ] = None,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Which of NAME's production predictions a person should label next: unsure ones, not near-copies of each
    other, from classes with little training data. Fill in --out's label column, then tuneloop feedback label."""
    from tuneloop.atomic import write_text_atomically
    from tuneloop.data.spreadsheet import spreadsheet_safe
    from tuneloop.feedback.suggest import suggestions_for, suggestions_frame

    registry = _registry(config, overrides)
    prediction_log = _prediction_log(config, overrides)
    try:
        chosen = suggestions_for(name, registry, prediction_log, budget, window)
    finally:
        prediction_log.close()
    if not chosen:
        console.print(f"nothing of {name}'s latest {window} predictions is left to label")
        return
    table = Table(title=f"Worth a label, most useful first ({len(chosen)})")
    for column in ("prediction", "text", "model said", "why"):
        table.add_column(column)
    for suggestion in chosen:
        table.add_row(
            suggestion.prediction_id[:8],
            escape(suggestion.text[:100]),
            escape(f"{suggestion.predicted} {suggestion.confidence:.2f}"),
            escape(suggestion.why + (f"; {len(suggestion.similar)} similar" if suggestion.similar else "")),
        )
    console.print(table)
    if out is not None:
        frame = suggestions_frame(chosen)
        write_text_atomically(out, frame.map(spreadsheet_safe).to_csv(index=False))
        console.print(
            f"wrote {out}: fill in the label column, then tuneloop feedback label {name} {out}; rows with a "
            "same_as take that row's label with --similar (delete those that do not share it first)",
            markup=False,
        )


@feedback_app.command("label")
def feedback_label(
    name: Annotated[str, typer.Argument(help="Model name.")],
    file: Annotated[Path, typer.Argument(help="A CSV from tuneloop feedback suggest --out, label column filled.")],
    config: ConfigOption = None,
    overrides: Overrides = None,
    similar: Annotated[
        bool,
        typer.Option(
            "--similar", help="Rows with a same_as and no label of their own take that row's label (propagation)."
        ),
    ] = False,
) -> None:
    """Record the labels filled in a suggestions CSV as trusted feedback (all or none); they train at the next
    retrain, through the gate like any feedback."""
    import getpass

    import pandas as pd

    from tuneloop.feedback.export import next_retrain, production_policy
    from tuneloop.feedback.suggest import labels_from_frame, record_labels, registered_labels

    try:
        frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise TuneloopError(f"cannot read {file}: {first_line(exc)}") from None
    labels = labels_from_frame(frame, similar, str(file))
    if not labels:
        console.print(f"no label is filled in {file}: nothing recorded")
        return
    registry = _registry(config, overrides)
    prediction_log = _prediction_log(config, overrides)
    try:
        recorded = record_labels(prediction_log, name, labels, f"cli:{getpass.getuser()}", registered_labels(registry))
        coming = next_retrain(prediction_log, name, production_policy(registry, name))
    finally:
        prediction_log.close()
    console.print(f"recorded {recorded} labels on {name} (trusted feedback; retrain with tuneloop retrain {name})")
    console.print(
        f"the next retrain learns {coming['examples']} labelled examples of {len(coming['labels'])} labels"
        + (f"; {coming['awaiting_review']} feedback rows await review" if coming["awaiting_review"] else ""),
        markup=False,
    )


def _decide(
    decision: Decision,
    name: str,
    groups: list[str] | None,
    ids: list[int] | None,
    sender: str | None,
    config: Path | None,
    overrides: list[str] | None,
) -> None:
    import getpass

    from tuneloop.feedback.review import decide

    prediction_log = _prediction_log(config, overrides)
    try:
        decided = decide(prediction_log, name, decision, f"cli:{getpass.getuser()}", groups, ids, sender)
    finally:
        prediction_log.close()
    console.print(f"{decision}d {decided} feedback rows on {name}")


GroupOption = Annotated[list[str] | None, typer.Option("--group", help="A group id from tuneloop feedback review.")]
IdOption = Annotated[list[int] | None, typer.Option("--id", help="A feedback id.")]
SenderOption = Annotated[
    str | None, typer.Option("--sender", help="Every feedback from this sender (key:… or anonymous).")
]


@feedback_app.command("approve")
def feedback_approve(
    name: Annotated[str, typer.Argument(help="Model name.")],
    group: GroupOption = None,
    feedback_id: IdOption = None,
    sender: SenderOption = None,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Let feedback on NAME train (by group, id or sender; all or nothing)."""
    _decide("approve", name, group, feedback_id, sender, config, overrides)


@feedback_app.command("reject")
def feedback_reject(
    name: Annotated[str, typer.Argument(help="Model name.")],
    group: GroupOption = None,
    feedback_id: IdOption = None,
    sender: SenderOption = None,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Keep feedback on NAME out of training for good, whoever sent it (by group, id or sender)."""
    _decide("reject", name, group, feedback_id, sender, config, overrides)


@app.command()
def retrain(
    name: Annotated[str, typer.Argument(help="Model name; its production version is the parent.")],
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Train a candidate from the production version's data plus the feedback examples."""
    from tuneloop.feedback.retrain import retrain as retrain_candidate

    outcome = retrain_candidate(name, config, overrides)
    used = outcome.feedback
    console.print(
        f"feedback: {used['examples']} examples ({used['corrected']} corrected, {used['confirmed']} "
        f"confirmed, {used['conflicts']} conflicts): {used['train']} to train, {used['holdout']} held out "
        f"for the gate"
    )
    assert outcome.run.report is not None and outcome.run.version is not None  # retrain registers its candidate
    test = outcome.run.report.test
    console.print(f"[green]test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f}[/green]")
    console.print(
        f"registered [bold]{outcome.run.version.ref}[/bold] (candidate, parent {outcome.parent}); "
        f"next: tuneloop gate {outcome.run.version.ref}"
    )


@app.command()
def gate(
    ref: Annotated[str, typer.Argument(help="Candidate NAME@VERSION.")],
    config: ConfigOption = None,
    overrides: Overrides = None,
    promote: Annotated[bool, typer.Option(help="Promote the candidate if it passes.")] = True,
) -> None:
    """Compare a candidate with production and promote it only if it is not worse."""
    from tuneloop.feedback.gate import run_gate

    decision = run_gate(ref, _config(GateSettings, config, overrides), promote=promote)
    for check in decision.checks:
        mark = "[green]pass[/green]" if check.passed else "[red]FAIL[/red]"
        console.print(f"{mark} {check.name}: {check.detail}")
    for note in decision.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"report: {decision.report_dir}/report.html")
    if decision.promoted:
        console.print(f"[green]{decision.candidate} promoted[/green] (was {decision.production})")
    elif decision.passed:
        console.print(f"{decision.candidate} passed; not promoted (--no-promote)")
    else:
        console.print(f"[red]{decision.candidate} rejected[/red]; {decision.production} stays in production")
        raise typer.Exit(3)


@app.command()
def monitor(
    name: Annotated[str, typer.Argument(help="Model name.")],
    last: Annotated[int, typer.Option("--last", min=1, help="Latest predictions to look at.")] = 5_000,
    since: Annotated[
        str | None, typer.Option(help="Only predictions made at or after this time (ISO 8601, e.g. 2026-12-01).")
    ] = None,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Has NAME's production drifted from its training data? Predicted labels, confidences, unfamiliar
    messages and the texts themselves compared; an HTML report, the server's drift gauges, and what to do."""
    from datetime import UTC, datetime

    from tuneloop.feedback.monitor import monitor_folder, watch, write_drift_report

    try:
        start = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise TuneloopError(f"--since '{since}' is not a time: write it as 2026-12-01 or 2026-12-01T08:00") from None
    if start is not None and start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    registry = _registry(config, overrides)
    prediction_log = _prediction_log(config, overrides)
    try:
        report = watch(name, registry, prediction_log, last, since=start)
    finally:
        prediction_log.close()
    written = write_drift_report(report, monitor_folder(registry.home, name))
    auc = "–" if report.domain_auc is None else f"{report.domain_auc:.2f}"
    console.print(
        f"{report.model}: {report.window_size} predictions from {report.window_start:%Y-%m-%d %H:%M} to "
        f"{report.window_end:%Y-%m-%d %H:%M} UTC\n"
        f"  predicted labels PSI {report.label_psi:.3f}, confidence PSI {report.confidence_psi:.3f} "
        f"(mean {report.reference_confidence:.2f} → {report.window_confidence:.2f}), unfamiliar "
        f"{report.unfamiliar_share:.1%}, texts told apart from training: AUC {auc}",
        markup=False,
    )
    for flag in report.flags:
        console.print(f"  [yellow]flag:[/yellow] {escape(flag)}", soft_wrap=True)
    colour = {"retrain": "red", "collect labels": "yellow"}.get(report.recommendation, "green")
    console.print(f"[{colour}]{escape(report.recommendation)}[/{colour}]: {escape(report.reason)}", soft_wrap=True)
    console.print(f"report: {written}", markup=False)


@keys_app.command("new")
def keys_new(
    scope: Annotated[str, typer.Option(help="client or admin.")] = "client",
    trusted: Annotated[
        bool, typer.Option(help="Its feedback trains without review (your own staff's tools; admin keys always).")
    ] = False,
) -> None:
    """Make an API key; prints the key (shown once), its id (as feedback records its sender) and the hash to put
    in the config."""
    from tuneloop.serve.security import hash_key, key_id, new_key

    if scope not in ("client", "admin"):
        raise TuneloopError(f"--scope must be client or admin, not '{scope}'")
    key = new_key()
    digest = hash_key(key)
    console.print(f"key (give it to the {scope}; it is not stored anywhere): [bold]{key}[/bold]")
    console.print(f"id: {key_id(digest)}", highlight=False)
    console.print(f'config: serve.{scope}_key_hashes=["{digest}"]', highlight=False)
    if trusted and scope == "client":
        console.print(f'config: serve.trusted_key_hashes=["{digest}"]', highlight=False)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Bring the database to the schema this tuneloop needs (a shared PostgreSQL database is only upgraded by
    this command; stop its servers first). A SQLite home upgrades itself when opened."""
    from sqlalchemy import create_engine

    from tuneloop.db.engine import redacted
    from tuneloop.db.migrate import upgrade

    url = _config(RegistrySettings, config, overrides).registry.resolved_database_url()
    engine = create_engine(url)
    try:
        before, after = upgrade(engine)
    finally:
        engine.dispose()
    change = "already" if before == after else f"upgraded from {before or 'an empty or pre-migration database'};"
    console.print(f"{redacted(url)}: {change} at schema revision {after}", soft_wrap=True)


@log_app.command("import")
def log_import(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Write the rescue files in the home (predictions the database could not take) into the database; a server
    does this when it starts."""
    prediction_log = _prediction_log(config, overrides)
    try:
        rows, files = prediction_log.import_rescued()
    finally:
        prediction_log.close()
    console.print(f"imported {rows} predictions from {files} rescue files in {prediction_log.home}")


def _erased_line(erased: Erased) -> str:
    return (
        f"removed {erased.predictions} predictions, {erased.feedback} feedback rows, {erased.chat_turns} chat turns "
        f"and {erased.rescued_rows} rows of rescue files"
    )


@privacy_app.command("purge")
def privacy_purge(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Remove users' texts older than privacy.retention_days (a running server also does it daily)."""
    from tuneloop.feedback.retention import purge

    settings = _config(ServerSettings, config, overrides)
    console.print(_erased_line(purge(settings.registry, settings.privacy)))


@privacy_app.command("forget")
def privacy_forget(
    text: Annotated[str | None, typer.Option("--text", help="A text, exactly as the user wrote it.")] = None,
    session: Annotated[str | None, typer.Option("--session", help="A chat session id.")] = None,
    prediction: Annotated[
        str | None, typer.Option("--prediction", help="A prediction id (from /v1/predict or a chat turn).")
    ] = None,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Erase one user's text, a chat session or a prediction from the prediction log, feedback, chat turns and
    rescue files, and name the registered versions and run folders whose frozen training data still hold it."""
    from tuneloop.feedback.retention import forget

    settings = _config(ServerSettings, config, overrides)
    erased = forget(settings.registry, settings.privacy, text=text, session_id=session, prediction_id=prediction)
    console.print(_erased_line(erased))
    held = [*erased.versions_holding_it, *erased.runs_holding_it]
    if held:
        console.print(
            f"[yellow]still in the frozen data of[/yellow] {', '.join(held)}: those versions and runs were trained "
            "or judged on it (or on a text masked the same way); delete them, or retrain without it, to remove it",
            soft_wrap=True,
        )
    if erased.kept_unsure:
        console.print(
            f"[yellow]kept {erased.kept_unsure} rows[/yellow] stored before texts kept an erasure digest: they hold "
            "this text with its personal data masked, which may be another user's words; erase them by --prediction "
            "or --session if they are this user's",
            soft_wrap=True,
        )


# Every command gets the same error handling, instead of a decorator on each.
for _typer in (app, data_app, models_app, feedback_app, keys_app, db_app, log_app, privacy_app, assistant_app):
    for _command in _typer.registered_commands:
        assert _command.callback is not None  # each command is a function
        _command.callback = friendly(_command.callback)


def main() -> None:
    app()
