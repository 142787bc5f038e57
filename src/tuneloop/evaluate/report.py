"""Score a classifier on a split and write report.json plus a self-contained report.html."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from tuneloop.config import ClassifierRecipe, EvalConfig
from tuneloop.data.prepare import labelled_rows, leaked_positions, load_prepared
from tuneloop.evaluate import plots
from tuneloop.evaluate.explain import explain, shaded_pieces
from tuneloop.evaluate.metrics import calibration, classification_metrics
from tuneloop.evaluate.schema import (
    BaselineReport,
    Calibration,
    ClassifierReport,
    Leakage,
    LongTextsReport,
    Overfitting,
    SkippedLabels,
    SplitScores,
    Standing,
    TemperatureFit,
    TrainingRegime,
)
from tuneloop.evaluate.serving import describe
from tuneloop.models.classifier import TextClassifier, softmax
from tuneloop.models.predictor import Predictor, load_model, load_unchecked, read_serving
from tuneloop.registry import Registry

# Train accuracy this much above test accuracy is reported as a sign of overfitting.
OVERFIT_GAP = 0.08


def score_split(
    predictor: Predictor,
    split: pd.DataFrame,
    config: EvalConfig,
    leaked: list[int] | None = None,
    logits: np.ndarray | None = None,
) -> SplitScores:
    """Metrics of `predictor` (as it serves: runtime, fallback, temperature) on `split`; `leaked` (positions of
    rows with a near-duplicate in training) adds the accuracy on those rows and on the rest, so a user sees how
    much the paraphrases seen in training lift the score. `logits` are the predictor's own for every row of
    `split` when they were computed elsewhere (by several processes)."""
    labels = predictor.labels
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(split["label"]) - set(index))
    is_known = split["label"].isin(index).to_numpy()
    known = split[is_known]
    texts = known["text"].tolist()
    truth = known["label"].map(index).to_numpy()
    if logits is not None:
        logits = logits[is_known]
    elif texts:
        logits = predictor.own_logits(predictor.logits(texts))
    else:
        logits = np.zeros((0, len(labels)))
    probs = softmax(logits)
    metrics = classification_metrics(
        truth,
        probs,
        labels,
        texts,
        config.calibration_bins,
        config.top_confusions,
        config.examples_per_confusion,
        config.suspect_confidence,
        config.suspects_listed,
    )
    temperature = predictor.temperature
    if temperature != 1.0 and len(texts):
        # The logits are the trained ones divided by the temperature: what the model said before calibration.
        raw = softmax(logits * temperature)
        metrics.calibration_before = calibration(raw.max(1), raw.argmax(1) == truth, config.calibration_bins)
        metrics.temperature = temperature
    if leaked is not None:
        metrics.leakage = leakage_scores(truth, probs, known.index, leaked)
    if unknown:
        metrics.skipped_unknown_labels = SkippedLabels(labels=unknown, rows=int(len(split) - len(known)))
    return metrics


def leakage_scores(truth: np.ndarray, probs: np.ndarray, positions: pd.Index, leaked: list[int]) -> Leakage:
    """Accuracy on the scored rows whose split position is in `leaked`, and on the others."""
    is_leaked = positions.isin(leaked)
    correct = probs.argmax(axis=1) == truth

    def accuracy(rows: np.ndarray) -> float | None:
        return float(correct[rows].mean()) if rows.any() else None

    return Leakage(
        rows=int(is_leaked.sum()), accuracy_leaked=accuracy(is_leaked), accuracy_not_leaked=accuracy(~is_leaked)
    )


def evaluate_classifier(
    predictor: Predictor,
    test: pd.DataFrame,
    config: EvalConfig,
    train: pd.DataFrame | None = None,
    history: list[dict[str, Any]] | None = None,
    title: str = "tuneloop evaluation",
    leaked: list[int] | None = None,
    test_logits: np.ndarray | None = None,
) -> ClassifierReport:
    """Test metrics (scored apart on the `leaked` test rows when given), and the train-vs-test gap when
    training rows are given. `test_logits`: the test rows' logits, when computed elsewhere (by several
    processes)."""
    report = ClassifierReport(
        title=title,
        labels=predictor.labels,
        base_model=predictor.spec.base_model,
        test=score_split(predictor, test, config, leaked, test_logits),
    )
    if train is not None and len(train):
        sample = train.sample(n=min(config.train_sample, len(train)), random_state=0)
        train_metrics = score_split(predictor, sample, config)
        gap = train_metrics.accuracy - report.test.accuracy
        report.overfitting = Overfitting(
            train_accuracy=train_metrics.accuracy,
            test_accuracy=report.test.accuracy,
            train_macro_f1=train_metrics.macro_f1,
            test_macro_f1=report.test.macro_f1,
            accuracy_gap=gap,
            train_rows_scored=len(sample),
            likely_overfitting=gap > OVERFIT_GAP,
        )
    if history:
        report.training_history = history
    return report


def html_image(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_table(rows: Sequence[Mapping[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: ClassifierReport) -> str:
    """The page: the model's own task, then any other task trained on the same encoder (multi-task)."""
    sections = report_sections(report)
    for task_report in report.other_tasks().values():
        sections += report_sections(task_report)
    return html_page(report.title, sections)


def report_sections(report: ClassifierReport) -> list[str]:
    test = report.test
    headline = [
        {"metric": k, "value": getattr(test, k)}
        for k in ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
    ]
    headline.append({"metric": "ECE", "value": test.calibration.ece})
    sections = [
        f"<h1>{html.escape(report.title)}</h1>",
        f"<p>Base model: {html.escape(report.base_model)}; {test.n} test examples"
        + (f"; trained on {html.escape(report.device)}" if report.device else "")
        + ".</p>",
        "<h2>Summary</h2>",
        html_table(headline, ["metric", "value"]),
    ]
    if report.long_texts:
        sections.append(f"<p>{html.escape(long_texts_line(report.long_texts))}.</p>")
    sections += caveat_sections(report)
    if report.baseline:
        sections += baseline_section(report.baseline)
    per_class = [row.model_dump() for row in test.per_class]
    sections += [
        "<h2>Per class</h2>",
        html_table(per_class, ["label", "precision", "recall", "f1", "support"]),
        html_image(plots.per_class_f1_png(per_class), "per-class F1"),
        "<h2>Confusion matrix</h2>",
        html_image(plots.confusion_matrix_png(test.confusion_matrix, report.labels), "confusion matrix"),
        "<h2>Calibration</h2>",
        *calibration_section(test, report.calibration),
        "<h2>Most frequent confusions</h2>",
    ]
    confusion_rows = [
        {"true": c.true, "predicted": c.predicted, "count": c.count, "examples": " | ".join(c.examples)}
        for c in test.top_confusions
    ]
    sections.append(
        html_table(confusion_rows, ["true", "predicted", "count", "examples"])
        if confusion_rows
        else "<p>No errors on the test split.</p>"
    )
    suspects = test.label_suspects  # absent from reports written before it existed
    if suspects and suspects.count:
        sections += [
            "<h2>Possible label errors</h2>",
            f"<p>{suspects.count} test rows ({suspects.share:.1%}) where the model contradicts the given "
            f"label with probability ≥ {suspects.confidence:.2f}. Such rows are often mislabelled: "
            f"check them before reading every one as a model error (most confident first).</p>",
            html_table([row.model_dump() for row in suspects.rows], ["text", "label", "predicted", "probability"]),
        ]
    if report.explanations:
        sections += [
            "<h2>Why: word attributions</h2>",
            "<p>For the most frequent confusions and the possible label errors: how much each word moved the model "
            "towards the label it chose (green) or away from it (red), by Integrated Gradients from an all-padding "
            "baseline. Hover a word for its score.</p>",
            "<table><thead><tr><th>kind</th><th>given</th><th>predicted</th><th>text</th></tr></thead><tbody>",
            *(
                f"<tr><td>{html.escape(e['kind'])}</td><td>{html.escape(e['true'])}</td>"
                f"<td>{html.escape(e['label'])}</td><td>{shaded_html(e)}</td></tr>"
                for e in report.explanations
            ),
            "</tbody></table>",
        ]
    if report.training_history:
        sections += ["<h2>Training</h2>", html_image(plots.training_curve_png(report.training_history), "training")]
    return sections


def caveat_sections(report: ClassifierReport) -> list[str]:
    """What a reader needs before trusting the figures: what they were scored with, privacy spent, overfitting,
    test rows seen in training."""
    sections = []
    if report.serving:
        sections.append(f"<p>Scored as it serves: {html.escape(describe(report.serving))}.</p>")
    if report.regime:
        sections.append(f"<p>{html.escape(regime_line(report.regime))}.</p>")
    privacy = report.privacy
    if privacy:
        sections += [
            "<h2>Differential privacy</h2>",
            f"<p>Trained with DP-SGD: (ε = {privacy.epsilon:.2f}, δ = {privacy.delta:.1e}) spent of a budget of "
            f"ε = {privacy.target_epsilon:g} ({privacy.accountant} accountant; {privacy.steps} steps, "
            f"noise multiplier {privacy.noise_multiplier:.3f}, each text's gradient clipped to "
            f"{privacy.max_grad_norm:g}, sample rate {privacy.sample_rate:.4f}). The guarantee covers the "
            f"weights; this page and the run folder show data itself.</p>",
        ]
    gap = report.overfitting
    if gap:
        verdict = "<b>likely overfitting</b>" if gap.likely_overfitting else "no strong sign of overfitting"
        sections += [
            "<h2>Train vs test</h2>",
            f"<p>Train accuracy {gap.train_accuracy:.3f} vs test {gap.test_accuracy:.3f} "
            f"(gap {gap.accuracy_gap:+.3f}, {gap.train_rows_scored} training rows re-scored): "
            f"{verdict}.</p>",
        ]
    leakage = report.test.leakage
    if leakage and leakage.rows:
        sections += [
            "<h2>Test rows seen in training</h2>",
            f"<p>{html.escape(leakage_line(leakage, report.test.n))}. The score on the other rows is the better guide "
            "to new text; the data report lists the pairs (data.leakage=drop leaves them out of the test split).</p>",
        ]
    return sections


def long_texts_line(long_texts: LongTextsReport) -> str:
    """One sentence on how texts longer than max_length were read, why, and at what cost."""
    limit, share = long_texts.max_length, long_texts.longer_share
    how = {
        "head": f"keep their first {limit} tokens",
        "head_tail": "keep their first and last tokens",
        "windows": f"are read whole, in windows of {limit} tokens whose logits are averaged",
    }.get(long_texts.truncation, long_texts.truncation)
    return (
        f"Texts longer than {limit} tokens ({share:.1%} of the training split) {how} ({long_texts.reason}): "
        f"{long_texts.passes_per_test_text:.2f} encoder passes per test text, "
        f"{long_texts.training_rows_per_text:.2f} training rows per training text"
    )


def baseline_section(baseline: BaselineReport) -> list[str]:
    """The transformer, the baseline and their blend side by side, and what serves."""
    rows = [
        {"model": name, **_standings(contender.validation, "validation"), **_standings(contender.test, "test")}
        for name, contender in (("transformer", baseline.transformer), ("baseline", baseline.baseline))
        if contender is not None
    ]
    hybrid = baseline.hybrid
    if hybrid:
        rows.append(
            {
                "model": f"blend, {hybrid.transformer_weight:.0%} transformer (validation: cross-fitted)",
                **_standings(hybrid.validation, "validation"),
                **_standings(hybrid.test, "test"),
            }
        )
    columns = ["model", "validation accuracy", "validation macro-F1", "test accuracy", "test macro-F1"]
    return [
        "<h2>Against a baseline</h2>",
        f"<p>{html.escape(baseline.method)}, fitted on the same training split in {baseline.fit_seconds:.1f} s "
        f"({baseline.features:,} n-grams; {baseline.ms_per_text:.2f} ms per text to predict).</p>",
        html_table(rows, columns),
        f"<p>{html.escape(' '.join(baseline_verdict(baseline)))}</p>",
    ]


def baseline_line(baseline: BaselineReport) -> str:
    """The comparison in one line (tuneloop train's output)."""
    figures = [
        f"{name} {contender.test.accuracy:.4f}"
        for name, contender in (
            ("transformer", baseline.transformer),
            ("baseline", baseline.baseline),
            ("blend", baseline.hybrid),
        )
        if contender is not None and contender.test is not None
    ]
    return (
        f"against a baseline ({baseline.method}, fitted in {baseline.fit_seconds:.1f}s), test accuracy: "
        f"{', '.join(figures)}. {' '.join(baseline_verdict(baseline))}"
    )


def _standings(standing: Standing | None, split: str) -> dict[str, float | str]:
    if standing is None:
        return {f"{split} accuracy": "–", f"{split} macro-F1": "–"}
    return {f"{split} accuracy": standing.accuracy, f"{split} macro-F1": standing.macro_f1}


def baseline_verdict(baseline: BaselineReport) -> list[str]:
    """Plain sentences: whether the transformer beats the baseline, and what the version serves and why."""
    said = []
    transformer, alone = baseline.transformer, baseline.baseline.test
    if transformer is not None and transformer.test is not None and alone is not None:
        if transformer.test.accuracy <= alone.accuracy:
            said.append(
                f"The fine-tuned transformer does not beat the baseline: test accuracy {transformer.test.accuracy:.2%} "
                f"against the baseline's {alone.accuracy:.2%}."
            )
        else:
            said.append(
                f"The transformer beats the baseline by {100 * (transformer.test.accuracy - alone.accuracy):.2f} "
                "points of test accuracy."
            )
    served = {
        "hybrid": "This version serves the blend of the two",
        "transformer": "This version serves the transformer alone",
        "baseline": "This version serves the baseline alone (train.baseline=only)",
    }[baseline.served]
    said.append(f"{served}: {baseline.reason}.")
    if baseline.served == "hybrid":
        said.append("Word attributions explain the transformer's share of its answers, not the baseline's.")
    return said


def calibration_section(test: SplitScores, fitted: TemperatureFit | None) -> list[str]:
    """The reliability diagram as served and, when a temperature was fitted, the one before it."""
    after = html_image(plots.reliability_png(_bins(test.calibration), test.calibration.ece), "reliability")
    before = test.calibration_before
    if before is None:
        why = f" No temperature was fitted: {fitted.reason}." if fitted and not fitted.fitted else ""
        return [f"<p>Probabilities as the model gives them.{html.escape(why)}</p>", after]
    return [
        f"<p>{html.escape(calibration_line(test))}. Left: before; right: as served.</p>",
        '<div style="display:flex;gap:1em">',
        html_image(plots.reliability_png(_bins(before), before.ece), "reliability before calibration"),
        after,
        "</div>",
    ]


def _bins(calibrated: Calibration) -> list[dict[str, Any]]:
    return [row.model_dump() for row in calibrated.bins]


def calibration_line(test: SplitScores) -> str:
    """One sentence on temperature scaling's effect on the test split (the report of a calibrated model)."""
    assert test.calibration_before is not None and test.temperature is not None
    return (
        f"Temperature scaling (T = {test.temperature:.2f}, fitted on the validation split): test ECE "
        f"{test.calibration_before.ece:.3f} before, {test.calibration.ece:.3f} after"
    )


def regime_line(regime: TrainingRegime) -> str:
    """One sentence on the regime that trained the model and why (training/regime.py)."""
    line = f"Trained in the {regime.name} regime: {regime.why}"
    if regime.name != "few-shot":
        return line
    steps = regime.contrastive.steps if regime.contrastive else 0
    parts = [f"a contrastive stage of {steps} steps" if steps else "no contrastive stage"]
    if regime.label_names_added:
        parts.append(f"{regime.label_names_added} label names as training texts")
    if regime.min_steps:
        parts.append(f"the loop for at least {regime.min_steps} optimiser steps ({regime.epochs} epochs)")
        parts.append(f"the model kept by the mean of the last {regime.smoothing} validation scores")
    else:
        parts.append("the head fitted on the tuned embeddings, no loop after it")
    return f"{line}; " + ", ".join(parts)


def leakage_line(leakage: Leakage, scored: int) -> str:
    """One sentence on the test rows with a near-duplicate in training and the accuracy on each part."""

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2%}"

    return (
        f"{leakage.rows} of {scored} test rows have a near-duplicate in the training split: accuracy "
        f"{shown(leakage.accuracy_leaked)} on them, {shown(leakage.accuracy_not_leaked)} on the other rows"
    )


def html_page(title: str, sections: list[str]) -> str:
    """A self-contained page: inline style, images embedded, nothing fetched."""
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}.pass{color:#2e7d32}"
        ".fail{color:#c62828}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"
    )


def write_report(report: ClassifierReport, folder: Path) -> Path:
    """report.json and report.html into `folder`; returns the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(report.to_json())
    page = folder / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    return page


def add_explanations(
    report: ClassifierReport, model: TextClassifier, tokenizer: PreTrainedTokenizerBase, limit: int
) -> None:
    """Word attributions of the predicted label for the first example of each frequent confusion and for the
    most confident possible label errors (half each, as far as there are), into report.explanations.
    `model` must run on PyTorch (gradients)."""
    test = report.test
    confusions = [("confusion", c.true, c.predicted, c.examples[0]) for c in test.top_confusions]
    shown = {text for *_, text in confusions}
    suspects = [
        ("possible label error", r.label, r.predicted, r.text)
        for r in (test.label_suspects.rows if test.label_suspects else [])
        if r.text not in shown  # a confusion's example can be a suspect too: explained once
    ]
    take = max(limit - min(len(suspects), limit // 2), limit // 2)
    chosen = [*confusions[:take], *suspects][:limit]
    if not chosen:
        return
    explained = explain(model, tokenizer, [text for *_, text in chosen], [predicted for _, _, predicted, _ in chosen])
    report.explanations = [
        {"kind": kind, "true": true, **explanation.as_dict()}
        for (kind, true, _, _), explanation in zip(chosen, explained, strict=True)
    ]


def explain_report(report: ClassifierReport, predictor: Predictor, limit: int) -> None:
    """Word attributions (add_explanations) by a PyTorch copy of the predictor's transformer: they need gradients,
    which ONNX Runtime has not. A blend's cover its transformer's share; a baseline serving alone has none."""
    if not limit or predictor.model is None or predictor.folder is None:
        return
    on_torch = load_unchecked(predictor.folder, "torch")
    add_explanations(report, *on_torch.transformer, limit)


def shaded_html(explanation: dict[str, Any]) -> str:
    """The text with each word's background shaded by its attribution: green adds to the label, red takes away."""
    words = [(w["start"], w["end"], w["score"]) for w in explanation["words"]]
    out = []
    for piece, score, strength in shaded_pieces(explanation["text"], words):
        if score is None:
            out.append(html.escape(piece))
            continue
        alpha = strength * 0.8
        colour = f"rgba(46,125,50,{alpha:.2f})" if score >= 0 else f"rgba(198,40,40,{alpha:.2f})"
        out.append(f'<span title="{score:+.3f}" style="background:{colour}">{html.escape(piece)}</span>')
    return "".join(out)


def evaluate_version(
    registry: Registry, ref: str, recipe: ClassifierRecipe, data: Path | None = None, out: Path | None = None
) -> tuple[ClassifierReport, Path]:
    """Score a registered version as it serves on its frozen test split, or on every row of `data` (read with
    the recipe's data columns); the report goes into the version's eval/ (or eval-<file>/) folder, or `out`.
    Returns the report and the page's path."""
    predictor = load_model(ref, registry)
    folder = predictor.folder
    assert folder is not None  # a registered version's
    if data is None:
        frozen = load_prepared(folder.data())
        test, train, leaked = frozen.test, frozen.train, leaked_positions(frozen.report)
    else:
        test, train, leaked = labelled_rows(recipe.data, data), None, None
    report = evaluate_classifier(
        predictor,
        test,
        recipe.eval,
        train=train,
        title=f"{predictor.ref}: evaluation on {data or 'its test split'}",
        leaked=leaked,
    )
    explain_report(report, predictor, recipe.eval.explanations)
    report.serving = read_serving(folder)
    return report, write_report(report, out or folder.evaluation(data))
