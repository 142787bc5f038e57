"""The promotion gate: a candidate replaces production only if it is not worse.

Both versions are scored on the same examples: production's frozen test split plus the feedback the
candidate held out of its training. The candidate passes only if:
  1. its macro-F1 is not lower than production's by more than a tolerance,
  2. an exact one-sided McNemar test on the paired right/wrong outcomes does not find it worse,
  3. no class (with enough examples to judge) loses more than a set number of F1 points;
1-3 on the frozen test split, which no feedback touched, and 1-2 on the held-out feedback. The two sets
are judged separately, never pooled: the feedback is mostly production's mistakes (corrections), and
pooled, the candidate's wins there could hide a regression on the test split.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import precision_recall_fscore_support

from tuneloop.atomic import write_dir_atomically
from tuneloop.config import GateConfig, GateSettings
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.off_topic import languages_of, off_topic_messages
from tuneloop.data.prepare import load_prepared
from tuneloop.db.lease import HeldLease, model_job_lease
from tuneloop.errors import Conflict, TuneloopError
from tuneloop.evaluate import plots
from tuneloop.evaluate.metrics import REJECTED_SCORE, threshold_rejecting
from tuneloop.evaluate.report import html_image, html_page, html_table
from tuneloop.models.predictor import load_model
from tuneloop.registry import ModelVersion, Registry, VersionFolder


@dataclass
class GateCheck:
    name: str
    passed: bool
    detail: str


@dataclass
class GateDecision:
    candidate: str
    production: str
    passed: bool
    checks: list[GateCheck]
    metrics: dict[str, dict[str, dict[str, Any]]]
    per_class: list[dict[str, Any]]
    mcnemar: dict[str, dict[str, float]]
    rows: dict[str, int]
    promoted: bool = False
    report_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scores(true: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict[str, Any]:
    if len(true) == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None}
    _, _, f1, _ = precision_recall_fscore_support(true, predicted, labels=labels, average="macro", zero_division=0)
    return {"n": int(len(true)), "accuracy": float((true == predicted).mean()), "macro_f1": float(f1)}


def _mcnemar(true: np.ndarray, prod: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    prod_right, cand_right = prod == true, cand == true
    worse = int((prod_right & ~cand_right).sum())  # production right, candidate wrong
    better = int((~prod_right & cand_right).sum())
    p_worse = float(binomtest(worse, worse + better, 0.5, alternative="greater").pvalue) if worse + better else 1.0
    return {"candidate_only_wrong": worse, "candidate_only_right": better, "p_value_candidate_worse": p_worse}


def _per_class(true: np.ndarray, prod: np.ndarray, cand: np.ndarray, config: GateConfig) -> list[dict[str, Any]]:
    labels = sorted(set(true))
    prod_prf = precision_recall_fscore_support(true, prod, labels=labels, zero_division=0)
    cand_prf = precision_recall_fscore_support(true, cand, labels=labels, zero_division=0)
    rows = []
    for i, label in enumerate(labels):
        support = int(prod_prf[3][i])
        delta = float(cand_prf[2][i] - prod_prf[2][i])
        rows.append(
            {
                "label": label,
                "support": support,
                "production_f1": float(prod_prf[2][i]),
                "candidate_f1": float(cand_prf[2][i]),
                "delta_f1": delta,
                "production_recall": float(prod_prf[1][i]),
                "candidate_recall": float(cand_prf[1][i]),
                "blocks": support >= config.min_class_support and delta < -config.max_class_drop,
            }
        )
    return rows


def compare(
    true: list[str], production: list[str], candidate: list[str], part: list[str], config: GateConfig
) -> tuple[list[GateCheck], dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The checks on paired predictions; `part` names each row's origin ("test" or "feedback").

    Each part is judged on its own, never pooled: pooled, the candidate's wins on feedback (mostly
    production's mistakes) could hide a real regression on the test split. The test split gets all three
    checks; held-out feedback gets macro-F1 and McNemar (its per-class counts are too small to judge).
    """
    true_, prod, cand, part_ = (np.asarray(x, dtype=object) for x in (true, production, candidate, part))
    metrics = {}
    for who, predicted in (("production", prod), ("candidate", cand)):
        metrics[who] = {"all": _scores(true_, predicted, sorted(set(true_)))}
        for name in sorted(set(part_)):
            inside = part_ == name
            metrics[who][name] = _scores(true_[inside], predicted[inside], sorted(set(true_[inside])))

    checks, mcnemar, per_class = [], {}, []
    for name in [p for p in ("test", "feedback") if p in set(part_)]:
        inside = part_ == name
        prod_macro, cand_macro = metrics["production"][name]["macro_f1"], metrics["candidate"][name]["macro_f1"]
        paired = mcnemar[name] = _mcnemar(true_[inside], prod[inside], cand[inside])
        checks += [
            GateCheck(
                f"{name}: macro-F1",
                cand_macro >= prod_macro - config.macro_f1_tolerance,
                f"candidate {cand_macro:.4f} vs production {prod_macro:.4f} "
                f"(change {cand_macro - prod_macro:+.4f}, tolerance {config.macro_f1_tolerance})",
            ),
            GateCheck(
                f"{name}: paired test (McNemar)",
                paired["p_value_candidate_worse"] >= config.alpha,
                f"candidate alone wrong on {paired['candidate_only_wrong']}, alone right on "
                f"{paired['candidate_only_right']}; one-sided p(candidate worse) = "
                f"{paired['p_value_candidate_worse']:.4g} (alpha {config.alpha})",
            ),
        ]
        if name == "test":
            per_class = _per_class(true_[inside], prod[inside], cand[inside], config)
            blocking = [row["label"] for row in per_class if row["blocks"]]
            checks.append(
                GateCheck(
                    "test: per-class F1",
                    not blocking,
                    f"classes losing more than {config.max_class_drop:.2f} F1: {', '.join(blocking)}"
                    if blocking
                    else f"no class with ≥{config.min_class_support} examples loses more than "
                    f"{config.max_class_drop:.2f} F1",
                )
            )
    return checks, metrics, per_class, mcnemar


def gate_set(production: VersionFolder, candidate: VersionFolder) -> tuple[pd.DataFrame, list[str]]:
    """Production's frozen test split plus the candidate's held-out feedback, minus anything the
    candidate trained on; returns the rows (text, label, part) and notes for the report."""
    prod_data, cand_data = load_prepared(production.data()), load_prepared(candidate.data())
    parts = [prod_data.test[["text", "label"]].assign(part="test")]
    notes = []
    if cand_data.holdout is not None and len(cand_data.holdout):
        parts.append(cand_data.holdout[["text", "label"]].assign(part="feedback"))
    else:
        notes.append("the candidate has no held-out feedback: the gate uses the frozen test split only")
    rows = pd.concat(parts, ignore_index=True)
    rows = rows[~rows["text"].map(dedup_key).duplicated(keep="first")]
    trained_on = set(cand_data.train["text"].map(dedup_key)) | set(cand_data.val["text"].map(dedup_key))
    leaked = rows["text"].map(dedup_key).isin(trained_on)
    if leaked.any():
        notes.append(f"{int(leaked.sum())} gate examples were left out because the candidate trained on them")
    return rows[~leaked].reset_index(drop=True), notes


def out_of_scope_examples(rows: pd.DataFrame, config: GateConfig) -> tuple[np.ndarray, list[str], str]:
    """The out-of-scope messages catch rates are compared on: the gate set's rows labelled out of scope (held-out
    'out of scope' corrections, test rows of a model trained with that label), or with none, the shipped off-topic
    messages' tuning part in the test split's languages. Returns (which rows, messages to add, what they are)."""
    labelled = (rows["label"] == config.out_of_scope_label).to_numpy()
    if labelled.any():
        return labelled, [], f"{int(labelled.sum())} messages labelled {config.out_of_scope_label}"
    languages = languages_of(rows.loc[rows["part"] == "test", "text"].tolist())
    shipped = [clean_text(t) for t in off_topic_messages("tune", languages)["text"]]
    return labelled, shipped, f"{len(shipped)} shipped off-topic messages"


def caught(probabilities: np.ndarray, labels: list[str], in_scope: np.ndarray, config: GateConfig) -> np.ndarray:
    """Which rows a version turns away at the threshold where it turns away config.in_scope_rejected of the
    `in_scope` rows: its top probability below it, or its answer the out-of-scope label."""
    scores = probabilities.max(1)
    if config.out_of_scope_label in labels:
        scores = np.where(probabilities.argmax(1) == labels.index(config.out_of_scope_label), REJECTED_SCORE, scores)
    return np.asarray(scores < threshold_rejecting(scores[in_scope], config.in_scope_rejected))


def catch_check(prod_caught: np.ndarray, cand_caught: np.ndarray, what: str, config: GateConfig) -> GateCheck:
    """The candidate may catch at most config.max_catch_drop fewer out-of-scope messages than production, and
    a paired test must not find it worse."""
    prod_rate, cand_rate = float(prod_caught.mean()), float(cand_caught.mean())
    paired = _mcnemar(np.ones(len(prod_caught), bool), prod_caught, cand_caught)
    return GateCheck(
        "out of scope: caught",
        cand_rate >= prod_rate - config.max_catch_drop and paired["p_value_candidate_worse"] >= config.alpha,
        f"candidate {cand_rate:.4f} vs production {prod_rate:.4f} of {what}, each turning away "
        f"{config.in_scope_rejected:.0%} of in-scope test messages (change {cand_rate - prod_rate:+.4f}, tolerance "
        f"{config.max_catch_drop}); one-sided p(candidate worse) = {paired['p_value_candidate_worse']:.4g}",
    )


def evaluate_gate(
    registry: Registry, candidate: ModelVersion, production: ModelVersion, config: GateConfig
) -> GateDecision:
    """Score both versions on the gate set and decide; promotes nothing."""
    rows, notes = gate_set(registry.folder(production), registry.folder(candidate))
    if rows.empty:
        raise TuneloopError(f"no examples to gate {candidate.ref} on: {production.ref} has an empty test split")
    texts = rows["text"].tolist()
    labelled_out, extra, what = out_of_scope_examples(rows, config)
    in_scope = np.r_[((rows["part"] == "test") & ~labelled_out).to_numpy(), np.zeros(len(extra), bool)]
    out = np.r_[labelled_out, np.ones(len(extra), bool)]
    scored = []  # (its labels for the rows, the out-of-scope messages it catches): production's, the candidate's
    for version in (production, candidate):
        model = load_model(version, registry)
        probabilities = model.predict_proba(texts + extra, cleaned=True)
        answers = [model.labels[i] for i in probabilities[: len(texts)].argmax(1)]
        scored.append((answers, caught(probabilities, model.labels, in_scope, config)[out]))
    (prod_pred, prod_caught), (cand_pred, cand_caught) = scored
    checks, metrics, per_class, mcnemar = compare(
        rows["label"].tolist(), prod_pred, cand_pred, rows["part"].tolist(), config
    )
    checks.append(catch_check(prod_caught, cand_caught, what, config))
    return GateDecision(
        candidate=candidate.ref,
        production=production.ref,
        passed=all(c.passed for c in checks),
        checks=checks,
        metrics=metrics,
        per_class=per_class,
        mcnemar=mcnemar,
        rows={name: int((rows["part"] == name).sum()) for name in ("test", "feedback")},
        notes=notes,
    )


def render_gate_html(decision: GateDecision, limit: float) -> str:
    verdict = "PASSED" if decision.passed else "REJECTED"
    outcome = (
        "promoted to production"
        if decision.promoted
        else "not promoted"
        if not decision.passed
        else "passed but not promoted (dry run)"
    )
    checks = "".join(
        f"<li class='{'pass' if c.passed else 'fail'}'><b>{html.escape(c.name)}</b>: "
        f"{'pass' if c.passed else 'FAIL'} — {html.escape(c.detail)}</li>"
        for c in decision.checks
    )
    metric_rows = []
    for part in ("all", "test", "feedback"):
        prod, cand = decision.metrics["production"].get(part), decision.metrics["candidate"].get(part)
        if prod and cand and prod["n"]:
            metric_rows.append(
                {
                    "examples": part,
                    "n": prod["n"],
                    "production accuracy": prod["accuracy"],
                    "candidate accuracy": cand["accuracy"],
                    "production macro-F1": prod["macro_f1"],
                    "candidate macro-F1": cand["macro_f1"],
                }
            )
    sections = [
        f"<h1>Gate: {html.escape(decision.candidate)} vs {html.escape(decision.production)}</h1>",
        f"<p class='{'pass' if decision.passed else 'fail'}'><b>{verdict}</b>: {outcome}.</p>",
        f"<ul>{checks}</ul>",
        *(f"<p><i>{html.escape(note)}</i></p>" for note in decision.notes),
        "<h2>Metrics</h2>",
        html_table(
            metric_rows,
            ["examples", "n", "production accuracy", "candidate accuracy", "production macro-F1", "candidate macro-F1"],
        ),
        "<p>'feedback' rows are corrections users made, mostly of production's mistakes, so production "
        "scores low on them by construction; 'test' is the frozen test split.</p>",
        "<h2>Per-class change</h2>",
        html_image(plots.per_class_delta_png(decision.per_class, limit), "per-class F1 change"),
        html_table(
            sorted(decision.per_class, key=lambda r: r["delta_f1"]),
            [
                "label",
                "support",
                "production_f1",
                "candidate_f1",
                "delta_f1",
                "production_recall",
                "candidate_recall",
                "blocks",
            ],
        ),
    ]
    return html_page(f"Gate {decision.candidate}", sections)


def write_gate_report(decision: GateDecision, folder: VersionFolder, limit: float) -> Path:
    """gate/report.json + gate/report.html inside the candidate's folder, replaced atomically."""
    target = folder.gate
    decision.report_dir = str(target)

    def write(staging: Path) -> None:
        staging.mkdir(parents=True)
        (staging / "report.json").write_text(json.dumps(decision.to_dict(), indent=2, ensure_ascii=False))
        (staging / "report.html").write_text(render_gate_html(decision, limit), encoding="utf-8")

    write_dir_atomically(write, target)
    return target / "report.html"


def run_gate(ref: str, config: GateSettings, promote: bool = True) -> GateDecision:
    """Gate NAME@VERSION against NAME's production version; promote it if it passes (and `promote`)."""
    registry = Registry(config.registry)
    candidate = registry.get(ref)
    with model_job_lease(registry.engine, candidate.name, f"gate {candidate.ref}") as lease:
        return _gate(registry, candidate, config, promote, lease)


def _gate(
    registry: Registry, candidate: ModelVersion, config: GateSettings, promote: bool, lease: HeldLease
) -> GateDecision:
    production = registry.get(f"{candidate.name}@production")
    if production.id == candidate.id:
        raise TuneloopError(f"{candidate.ref} is already production; gate a newer candidate")
    decision = evaluate_gate(registry, candidate, production, config.gate)
    if decision.passed and promote and lease.lost:
        # The lease expired while the gate ran (the database was away): another job may be working on the model.
        decision.notes.append(f"not promoted: this gate lost its hold on {candidate.name} while it ran; gate it again")
    elif decision.passed and promote:
        summary = decision.checks[0].detail  # test: macro-F1
        try:
            # Only over the version it was judged against: one promoted while the gate ran was never compared.
            registry.promote(
                candidate.ref, reason=f"gate passed against {production.ref}: {summary}", replacing=production.version
            )
            decision.promoted = True
        except Conflict as exc:
            decision.notes.append(f"not promoted: {exc}; gate it again against the new production version")
    write_gate_report(decision, registry.folder(candidate), config.gate.max_class_drop)
    return decision
