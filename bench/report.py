"""The benchmarks page and the README's headline table, rendered from bench/results/*.json.

    python bench/report.py --readme     rewrite the README's results table from the files
    python bench/report.py --check      exit 1 if the README's table is not what the files say

Every figure in the documentation comes from a results file that a benchmark script wrote (with the command,
the date, the commit and the machine), never from a hand-copied number. The docs build (docs/hooks.py)
renders `benchmarks_markdown()` into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

Format = Callable[[Any], str]


def percent(value: Any) -> str:
    return f"{100 * value:.2f}%"


def seconds(value: Any) -> str:
    return f"{value:,.0f} s"


def times(value: Any) -> str:
    return f"{value:.2f}×"


def points(value: Any) -> str:
    return f"{value:+.2f} points"


def plain(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def _share(speed: dict) -> str:
    return percent(speed["planted_found"] / speed["planted_at_threshold"])


def _dropped(run: dict) -> str:
    return f"{run['dropped_outside_kill_window']} / {run['dropped_in_kill_window']}"


def _teachers(teachers: list[dict]) -> str:
    return ", ".join(f"{t['seed']}: {percent(t['accuracy'])} ({t['layers']} layers)" for t in teachers)


def _accuracy_and_time(run: dict) -> str:
    return f"{percent(run['accuracy'])}, {seconds(run['train_seconds'])}"


def _when_on(value: Any) -> str:
    if not value:
        raise ValueError("off: no row")
    return plain(value)


def _served(serving: dict) -> str:
    if "int8_accuracy" not in serving:
        return serving["runtime"]
    int8, fp32 = percent(serving["int8_accuracy"]), percent(serving["fp32_accuracy"])
    return f"{serving['runtime']}; int8 {int8} against fp32 {fp32}, labels agreeing on {percent(serving['agreement'])}"


def _against_baseline(run: dict) -> str:
    fitted = run["baseline"]
    baseline = f"a TF-IDF baseline ({percent(fitted['accuracy'])} alone, fitted in {seconds(fitted['fit_seconds'])})"
    return f"served as its blend with {baseline}" if run["served_as"] == "hybrid" else f"beside {baseline}"


def _spread(times: dict) -> str:
    return f"{times['p50_ms']} / {times['p99_ms']} / {times['max_ms']}"


def _only(kinds: dict) -> str:
    """'phone 12, url 3' (pieces per kind one side found exactly and the other did not), or 'none'."""
    return ", ".join(f"{kind} {found['pieces']}" for kind, found in sorted(kinds.items())) or "none"


def _fewer_layers(ratio: str) -> Format:
    """A student's speed-up, shown only for a student with fewer layers than its teacher: at the same depth the
    two times differ by run-to-run variation alone."""

    def shown(result: dict) -> str:
        if result["tuneloop"]["layers"] >= result["teachers"][0]["layers"]:
            raise ValueError("a student as deep as its teacher: no speed-up to show")
        return times(result["ratios"][ratio])

    return shown


def _acknowledged(acknowledged: str, found: str) -> Callable[[dict], str]:
    return lambda run: f"{run[acknowledged]} / {run[found]} / {run[acknowledged] - run[found]}"


def _interval(share: dict) -> str:
    return f"{percent(share['value'])} [{percent(share['low'])}–{percent(share['high'])}]"


def _expected(setting: dict | str) -> str:
    """The start-up estimate of one assistant_eval setting, or why it was refused."""
    if isinstance(setting, str):
        return "refused: " + setting.split(": ", 1)[-1].split(":", 1)[0]
    estimate = setting["estimate"]
    return f"{_interval(estimate['in_scope_rejected'])} / {_interval(estimate['out_of_scope_caught'])}"


def _tested(setting: dict | str) -> str:
    if isinstance(setting, str):
        return "not served"
    test = setting["test"]
    return (
        f"{percent(test['in_scope_rejected'])} / {percent(test['out_of_scope_caught'])} / "
        f"{percent(test['accepted_in_scope_accuracy'])} / {percent(test['shipped_heldout_caught'])}"
    )


def _stand_ins(caught: dict) -> str:
    return " / ".join(f"{percent(value)} ({name})" for name, value in caught.items())


def _before_after(result: dict, key: str) -> str:
    return f"{percent(result['before'][key])} → {percent(result['after'][key])}"


def _caught_precision(scored: dict) -> str:
    return f"{percent(scored['out_of_scope_recall'])} / {percent(scored['in_scope_precision'])}"


def _gate_verdict(gate: dict) -> str:
    failed = [name for name, check in gate["checks"].items() if not check["passed"]]
    return "promoted" if gate["promoted"] else "not promoted: " + ", ".join(failed or ["dry run"])


# Per benchmark (its results name, or the name's first part), the figures worth a table row:
# (label, dotted path into the result, format).
FIGURES: dict[str, list[tuple[str, str, Format]]] = {
    "train_classifier": [
        ("dataset", "dataset", plain),
        ("encoder", "tuneloop.encoder", plain),
        ("training rows", "train_rows", plain),
        ("test rows", "test_rows", plain),
        ("test accuracy", "tuneloop.accuracy", percent),
        ("test macro-F1", "tuneloop.macro_f1", percent),
        ("training time", "tuneloop.train_seconds", seconds),
        ("what serves (train.baseline=auto)", "tuneloop.served_as", plain),
        (
            "TF-IDF baseline on the same split: test accuracy, macro-F1, fit time",
            "tuneloop.baseline",
            lambda b: f"{percent(b['accuracy'])}, {percent(b['macro_f1'])}, {b['fit_seconds']:.1f} s",
        ),
        ("the transformer alone: test accuracy", "tuneloop.transformer_alone.accuracy", percent),
        (
            "the blend: transformer's weight, validation macro-F1 gain (cross-fitted), test accuracy",
            "tuneloop.hybrid",
            lambda h: (
                f"{h['transformer_weight']:.1f}, {100 * h['validation_gain']:+.2f} points, {percent(h['accuracy'])}"
            ),
        ),
        ("what serves against the baseline, test accuracy", "tuneloop.accuracy_delta_points_vs_baseline", points),
        (
            "serving cost, ms per test text: as served / the transformer alone / the baseline alone",
            "tuneloop.serving_ms_per_text",
            lambda m: f"{m['served']:.2f} / {m['transformer']:.2f} / {m['baseline']:.2f} ms",
        ),
        (
            "texts longer than max_length: how read, share of the training split, encoder passes per test text",
            "tuneloop.long_texts_read",
            lambda r: f"{r['truncation']}, {percent(r['longer_share'])}, {r['passes_per_test_text']:.2f}",
        ),
        ("time to 90% test accuracy", "tuneloop.seconds_to_90", seconds),
        ("HF Trainer accuracy", "hf_trainer.accuracy", percent),
        ("HF Trainer time to 90%", "hf_trainer.seconds_to_90", seconds),
        ("time to 90%, tuneloop / HF Trainer", "ratios.seconds_to_90", times),
        (
            "test rows with a near-duplicate in training: accuracy on them / on the rest",
            "tuneloop.leakage",
            lambda v: f"{v['rows']}: {percent(v['accuracy_leaked'])} / {percent(v['accuracy_not_leaked'])}",
        ),
        (
            "test ECE before / after temperature scaling (T)",
            "tuneloop.calibration",
            lambda c: f"{c['ece_before']:.3f} / {c['ece']:.3f} (T = {c['temperature']:.2f})",
        ),
        (
            "encoder layers (frozen) / max_length",
            "tuneloop",
            lambda t: f"{t['layers']} ({t.get('frozen_layers', 0)}) / {t['max_length']}",
        ),
        ("R-Drop weight (train.rdrop)", "tuneloop.rdrop", _when_on),
        ("served by (int8 and fp32 ONNX test accuracy; labels agreeing on validation)", "tuneloop.serving", _served),
        (
            "test texts longer than 60 characters: count, accuracy, ms per text",
            "tuneloop.long_texts",
            lambda v: f"{v['count']}, {percent(v['accuracy'])}, {v['ms_per_text']:.1f} ms",
        ),
        ("default recipe (no --set): test accuracy", "default_recipe.accuracy", percent),
        ("default recipe: training time", "default_recipe.train_seconds", seconds),
        (
            "default recipe: texts longer than 60 characters, accuracy, ms per text",
            "default_recipe.long_texts",
            lambda v: f"{percent(v['accuracy'])}, {v['ms_per_text']:.1f} ms",
        ),
        ("training speed-up over the default recipe", "ratios.speed_up", times),
        ("accuracy change over the default recipe", "ratios.accuracy_delta_points", points),
        ("long texts: accuracy change over the default recipe", "ratios.long_texts_accuracy_delta_points", points),
        ("distilled from (teachers' seeds: test accuracy)", "teachers", _teachers),
        ("teachers' ensemble (averaged answers): test accuracy", "teacher_ensemble.accuracy", percent),
        (
            "student: accuracy change over the first teacher (the default recipe)",
            "ratios.accuracy_delta_points_vs_default_recipe",
            points,
        ),
        ("student: accuracy change over the teachers' ensemble", "ratios.accuracy_delta_points_vs_ensemble", points),
        ("student: training speed-up over the default recipe", "", _fewer_layers("speed_up_vs_default_recipe")),
        ("student and teachers: training time together", "ratios.train_seconds_with_teachers", seconds),
        ("trained on (device, precision)", "tuneloop.device", plain),
        ("the same command at an older commit", "against.commit", plain),
        ("older commit: test accuracy, training time", "against.tuneloop", _accuracy_and_time),
        ("accuracy change over the older commit", "against_ratios.accuracy_delta_points", points),
        ("training time / the older commit's", "against_ratios.train_seconds", times),
        ("student: prediction speed-up on long texts", "", _fewer_layers("long_texts_prediction_speed_up")),
    ],
    "oos_scores": [
        (
            "dataset, in-scope / unseen-intent test messages",
            "",
            lambda r: f"{r['dataset']}, {r['known_test']} / {r['unknown_test']}",
        ),
        ("recipe overrides", "overrides", lambda o: ", ".join(o) or "none (outlier exposure on)"),
        ("in-scope accuracy", "in_scope_accuracy", percent),
        *(
            (
                f"{score}: AUROC / unseen caught / in-scope turned away, at the 5%-of-validation threshold",
                f"scores.{score}",
                lambda v: f"{v['auroc']:.3f} / {percent(v['out_of_scope_caught'])} / {percent(v['in_scope_rejected'])}",
            )
            for score in (
                "probability",
                "cosine",
                "energy",
                "knn-1",
                "knn-10",
                "knn-intent",
                "mahalanobis",
                "relative mahalanobis",
                "probability + relative mahalanobis",
                "probability + knn-intent",
                "mixup",
            )
        ),
        (
            "unseen caught by probability: on the test / estimated from …",
            "caught_estimated_from.probability",
            _stand_ins,
        ),
    ],
    "explain_faithfulness": [
        *(
            row
            for name in ("banking77", "waimai_10k")
            for row in (
                (
                    f"{name}: AOPC (mean probability drop, k = 1..5 words deleted) — Integrated Gradients / "
                    "attention / random",
                    f"datasets.{name}.aopc",
                    lambda a: f"{a['integrated_gradients']:.3f} / {a['attention']:.3f} / {a['random']:.3f}",
                ),
                (
                    f"{name}: probability drop after deleting the top word, IG / attention / random",
                    f"datasets.{name}.probability_drop_at_k",
                    lambda d: " / ".join(f"{d[m][0]:.3f}" for m in ("integrated_gradients", "attention", "random")),
                ),
                (
                    f"{name}: texts, mean absolute completeness error, seconds per explanation",
                    f"datasets.{name}",
                    lambda d: (
                        f"{d['texts']}, {d['mean_completeness_error']:.4f}, {d['explain_seconds_per_text']:.2f} s"
                    ),
                ),
            )
        ),
    ],
    "label_audit": [
        ("training rows audited", "rows_audited", plain),
        ("flagged as likely mislabelled", "", lambda r: f"{r['flagged']} ({percent(r['flagged_share'])})"),
        (
            "hand-checked sample: plainly wrong / mixed / right",
            "verdicts",
            lambda v: f"{v['wrong']} / {v['mixed']} / {v['right']}",
        ),
        ("test accuracy, all training rows", "trained.all_rows.test_accuracy", percent),
        (
            "test accuracy, without the rows confirmed wrong",
            "trained.without_confirmed",
            lambda t: f"{percent(t['test_accuracy'])} ({t['excluded']} rows left out)",
        ),
        (
            "test accuracy, without every flagged row",
            "trained.without_all_flagged",
            lambda t: f"{percent(t['test_accuracy'])} ({t['excluded']} rows left out)",
        ),
        ("audit time", "audit_seconds", seconds),
    ],
    "leakage": [
        ("near-duplicate: Jaccard similarity of words and word pairs at least", "threshold", plain),
        *(
            (
                f"{name}: test rows with a near-duplicate in training",
                f"datasets.{name}",
                lambda d: f"{d['test_rows_leaked']} of {d['test_rows']} ({percent(d['test_share_leaked'])})",
            )
            for name in ("banking77", "sst2", "waimai_10k")
        ),
        *(
            (
                f"{name}: TF-IDF accuracy on those rows / on the rest",
                f"datasets.{name}",
                lambda d: f"{percent(d['tfidf_accuracy_leaked'])} / {percent(d['tfidf_accuracy_not_leaked'])}",
            )
            for name in ("banking77", "sst2", "waimai_10k")
        ),
        (
            "whole data stage (read, clean, deduplicate, near-duplicates, split) of banking77 / sst2 / waimai_10k",
            "datasets",
            lambda d: " / ".join(f"{d[n]['data_stage_seconds']:.1f} s" for n in ("banking77", "sst2", "waimai_10k")),
        ),
        ("speed: texts, seconds", "speed", lambda v: f"{v['texts']:,} texts in {v['seconds']:.1f} s"),
        (
            "speed: planted reworded copies found",
            "speed",
            lambda v: f"{v['planted_found']:,} of {v['planted_at_threshold']:,} ({_share(v)})",
        ),
    ],
    "serve_load": [
        ("model", "model", plain),
        ("clients", "clients", plain),
        ("tuneloop req/s", "tuneloop.req_per_s", plain),
        ("p50 / p95 / p99 ms", "tuneloop", lambda r: f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f}"),
        ("runtime that served", "runtime", plain),
        ("mean batch size", "tuneloop.mean_batch_size", plain),
        ("share of the fp32 compute ceiling", "share_of_fp32_ceiling", percent),
        ("naive FastAPI + pipeline req/s", "naive.req_per_s", plain),
        ("req/s, tuneloop / naive", "ratio_req_per_s", times),
        ("same predictions", "same_predictions", percent),
        (
            "test accuracy, tuneloop / naive",
            "",
            lambda r: f"{percent(r['tuneloop']['accuracy'])} / {percent(r['naive']['accuracy'])}",
        ),
    ],
    "feedback_loop": [
        ("drifted intents macro-F1 before", "before.drifted_macro_f1", percent),
        ("drifted intents macro-F1 after", "after.drifted_macro_f1", percent),
        ("overall macro-F1 before", "before.macro_f1", percent),
        ("overall macro-F1 after", "after.macro_f1", percent),
        ("change on the drifted intents", "delta_points.drifted_macro_f1", points),
        ("corrections sent / stored / lost", "feedback", lambda f: f"{f['sent']} / {f['stored']} / {f['lost']}"),
        ("gate", "gate", lambda g: "passed, promoted" if g["promoted"] else ("passed" if g["passed"] else "rejected")),
    ],
    "drift": [
        ("cut intents macro-F1 before any label", "before.drifted_macro_f1", percent),
        *(
            (
                f"{name}: share of the drift gap recovered (cut intents macro-F1, against all corrections)",
                f"labelling.{kind}.drift_gap_recovered",
                percent,
            )
            for kind, name in (
                ("suggested", "suggested labels and their confirmed similar messages"),
                ("suggested_alone", "suggested labels alone"),
                ("random", "random labels"),
            )
        ),
        (
            "suggested labels: similar messages listed / confirmed / unticked",
            "labelling.suggested",
            lambda r: f"{r['similar_listed']} / {r['similar_confirmed']} / {r['similar_unticked']}",
        ),
        (
            "all corrections (every wrong answer of the stream): labels, cut intents macro-F1 after",
            "labelling.all_corrections",
            lambda r: f"{r['labels']}, {percent(r['after']['drifted_macro_f1'])}",
        ),
        *(
            (
                f"{name}: labels (of cut intents / answered wrongly)",
                f"labelling.{kind}",
                lambda r: f"{r['labels']} ({r['of_cut_intents']} / {r['answered_wrongly']})",
            )
            for kind, name in (("suggested", "suggested labels"), ("random", "random labels"))
        ),
        (
            "suggested labels: cut intents macro-F1 after one retrain",
            "labelling.suggested.after.drifted_macro_f1",
            percent,
        ),
        ("random labels: cut intents macro-F1 after one retrain", "labelling.random.after.drifted_macro_f1", percent),
        ("suggested labels: overall macro-F1 after", "labelling.suggested.after.macro_f1", percent),
        ("random labels: overall macro-F1 after", "labelling.random.after.macro_f1", percent),
        *(
            (
                f"monitor, {name}: label PSI, confidence PSI, unfamiliar share, domain AUC",
                f"monitor.{window}",
                lambda m: (
                    f"{m['label_psi']:.3f}, {m['confidence_psi']:.3f}, {percent(m['unfamiliar_share'])}, "
                    f"{m['domain_auc']:.3f}"
                ),
            )
            for window, name in (("quiet_window", "test-split window"), ("drift_window", "drifted stream"))
        ),
        *(
            (f"monitor, {name}: recommendation", f"monitor.{window}.recommendation", plain)
            for window, name in (("quiet_window", "test-split window"), ("drift_window", "drifted stream"))
        ),
        ("monitor time (window of the stream)", "seconds.monitor", seconds),
    ],
    "few_shot": [
        ("dataset, test rows", "", lambda r: f"{r['dataset']}, {r['test_rows']:,}"),
        *(
            (
                f"{per_label} per label: test accuracy (mean of seeds), tuneloop / standard loop / frozen encoder + "
                "LR / TF-IDF",
                f"settings.{per_label}.mean",
                lambda m: " / ".join(
                    percent(m[k]["accuracy"])
                    for k in ("tuneloop", "default_recipe", "frozen_encoder", "tfidf")
                    if k in m
                ),
            )
            for per_label in (5, 10, 20, 50)
        ),
        *(
            (
                f"{per_label} per label: training time (mean of seeds), tuneloop / standard loop",
                f"settings.{per_label}.mean",
                lambda m: " / ".join(seconds(m[k]["train_seconds"]) for k in ("tuneloop", "default_recipe") if k in m),
            )
            for per_label in (5, 10, 20, 50)
        ),
    ],
    "batch_predict": [
        ("model, runtime", "", lambda r: f"{r['model']}, {r['runtime']}"),
        *(
            (
                f"{name} texts: rows/s, peak memory of the process",
                f"runs.{size}",
                lambda r: f"{r['rows']:,} rows: {r['rows_per_second']:,.0f} rows/s, {r['peak_memory_mib']:,.0f} MiB",
            )
            for size, name in (("small", "fewer"), ("large", "more"))
        ),
        ("peak memory, larger file / smaller file", "peak_memory_ratio_large_to_small", times),
    ],
    "ddp": [
        ("dataset, encoder", "", lambda r: f"{r['dataset']}, {r['encoder']}"),
        ("the same launches at an older commit", "against.commit", plain),
        (
            "older commit: one process, data parallel, sharded (test accuracy, training time)",
            "against",
            lambda r: " · ".join(_accuracy_and_time(r[run]) for run in ("one_process", "data_parallel", "sharded")),
        ),
        (
            "accuracy change and training time over the older commit: one process, data parallel, sharded",
            "against_ratios",
            lambda r: " · ".join(
                f"{points(r[run]['accuracy_delta_points'])}, {times(r[run]['train_seconds'])}"
                for run in ("one_process", "data_parallel", "sharded")
            ),
        ),
        (
            "one process: test accuracy, training time",
            "one_process",
            lambda r: f"{percent(r['accuracy'])}, {seconds(r['train_seconds'])} ({r['threads']} threads)",
        ),
        (
            "torchrun, data parallel: test accuracy, training time",
            "data_parallel",
            lambda r: (
                f"{percent(r['accuracy'])}, {seconds(r['train_seconds'])} ({r['processes']} processes × 1 thread)"
            ),
        ),
        (
            "torchrun, sharded (train.strategy=fsdp): test accuracy, training time",
            "sharded",
            lambda r: (
                f"{percent(r['accuracy'])}, {seconds(r['train_seconds'])} ({r['processes']} processes × 1 thread)"
            ),
        ),
        ("accuracy difference, data parallel − one process", "accuracy_difference_points", points),
        ("accuracy difference, sharded − one process", "sharded_accuracy_difference_points", points),
        ("training time, data parallel / one process", "time_ratio", times),
        ("training time, sharded / one process", "sharded_time_ratio", times),
        (
            "peak memory of the largest process: one process, data parallel, sharded",
            "",
            lambda r: " · ".join(
                f"{r[run]['peak_memory_mib']:.0f} MiB" for run in ("one_process", "data_parallel", "sharded")
            ),
        ),
    ],
    "poisoning": [
        (
            "feedback policy",
            "feedback.policy",
            lambda p: p["use"] + (f", agreement {p['agreement']}" if p["agreement"] else ""),
        ),
        (
            "attacker's corrections accepted / refused (429) / waiting in the review queue (groups flagged)",
            "attack",
            lambda a: (
                f"{a['corrections_sent']} / {a.get('corrections_refused_429', 0)} / "
                f"{a['review_queue']['attacker_rows_pending']} "
                f"({a['review_queue'].get('attacker_groups_flagged', '?')} of {a['review_queue']['attacker_groups']})"
            ),
        ),
        (
            "test texts the trigger turns into the target intent, before → after",
            "attack.trigger_flips_share",
            lambda t: f"{percent(t['before'])} → {percent(t['after'])}",
        ),
        (
            "drifted intents macro-F1 before → after",
            "",
            lambda r: f"{percent(r['before']['drifted_macro_f1'])} → {percent(r['after']['drifted_macro_f1'])}",
        ),
        (
            "overall macro-F1 before → after",
            "",
            lambda r: f"{percent(r['before']['macro_f1'])} → {percent(r['after']['macro_f1'])}",
        ),
        ("gate", "gate", lambda g: "passed, promoted" if g["promoted"] else ("passed" if g["passed"] else "rejected")),
    ],
    "dp": [
        ("training rows (δ = 1/n)", "full.epsilon_8.train_rows", plain),
        ("full fine-tuning: test accuracy, non-private / private", "full", lambda m: _private_runs(m, "accuracy")),
        ("full fine-tuning: training time", "full", lambda m: _private_runs(m, "train_seconds")),
        ("LoRA: test accuracy, non-private / private", "lora", lambda m: _private_runs(m, "accuracy")),
        ("LoRA: training time", "lora", lambda m: _private_runs(m, "train_seconds")),
        ("noise multiplier, full / LoRA", "", lambda r: _noise(r)),
    ],
    "pii": [
        *(
            row
            for name, title in (
                ("written_alongside", "written with the masker"),
                ("public_tuned_on", "public, rules tuned on it"),
                ("held_out", "held out (masker frozen first)"),
            )
            for row in (
                (
                    f"{title}: messages (Chinese / English), pieces",
                    name,
                    lambda r: (
                        f"{r['messages']} ({r['languages']['zh']} / {r['languages']['en']}), {r['pieces_labelled']}"
                    ),
                ),
                (
                    f"{title}: masked away / exact recall / precision",
                    name,
                    lambda r: f"{percent(r['masked_away'])} / {percent(r['recall'])} / {percent(r['precision'])}",
                ),
                (
                    f"{title}: masked away per kind",
                    f"{name}.per_kind",
                    lambda k: ", ".join(f"{kind} {percent(v['masked_away'])}" for kind, v in k.items()),
                ),
                (
                    f"{title}: messages without personal data altered",
                    name,
                    lambda r: f"{r['of_them_altered']} of {r['messages_without_personal_data']}",
                ),
                (f"{title}: µs per message", f"{name}.microseconds_per_message", lambda m: f"{m:.0f}"),
                (
                    f"{title}: Presidio's pattern recognisers, masked away / exact recall / precision",
                    f"{name}.presidio",
                    lambda r: f"{percent(r['masked_away'])} / {percent(r['recall'])} / {percent(r['precision'])}",
                ),
                (
                    f"{title}: Presidio, messages without personal data altered; µs per message",
                    f"{name}.presidio",
                    lambda r: (
                        f"{r['of_them_altered']} of {r['messages_without_personal_data']}; "
                        f"{r['microseconds_per_message']:.0f}"
                    ),
                ),
                (f"{title}: pieces only tuneloop finds", f"{name}.presidio.only_tuneloop", _only),
                (f"{title}: pieces only Presidio finds", f"{name}.presidio.only_presidio", _only),
            )
        ),
        ("Banking77 test messages changed", "banking77_test", lambda r: f"{r['changed']} of {r['messages']}"),
    ],
    "assistant_eval": [
        (
            "dataset, in-scope / out-of-scope test messages",
            "",
            lambda r: f"{r['dataset']}, {r['known_test']} / {r['unknown_test']}",
        ),
        ("plain classifier accuracy (answers every in-scope message)", "plain_classifier_accuracy", percent),
        ("AUROC, in-scope against unseen intents", "auroc", lambda v: f"{v:.3f}"),
        *(
            row
            for setting in (
                "no examples of its own",
                "100 examples of its own",
                "old default (95% precision), 100 examples of its own",
                "old default (95% precision), no examples of its own",
            )
            for row in (
                (f"{setting}: expected at start, turned away / caught", f"settings.{setting}", _expected),
                (
                    f"{setting}: test, turned away / unseen caught / accuracy accepted / shipped held-out caught",
                    f"settings.{setting}",
                    _tested,
                ),
            )
        ),
        (
            "100 examples: start-up estimate of caught minus the test, five draws (points)",
            "estimates_of_draws",
            lambda d: ", ".join(f"{x:+.1f}" for x in d),
        ),
        ("p50 / p95 ms per turn", "latency_ms", lambda t: f"{t['p50']:.0f} / {t['p95']:.0f}"),
    ],
    "scope_loop": [
        (
            "dataset, off-topic messages sent / answered and marked out of scope",
            "",
            lambda r: f"{r['dataset']}, {r['messages_sent']} / {r['marked_out_of_scope']}",
        ),
        ("unseen intents' test messages caught, before → after", "", lambda r: _before_after(r, "out_of_scope_caught")),
        ("in-scope test messages turned away, before → after", "", lambda r: _before_after(r, "in_scope_rejected")),
        (
            "accuracy of accepted in-scope messages, before → after",
            "",
            lambda r: _before_after(r, "accepted_in_scope_accuracy"),
        ),
        ("plain classifier accuracy, before → after", "", lambda r: _before_after(r, "plain_classifier_accuracy")),
        ("what it expected at start, before", "before.estimate", plain),
        ("what it expected at start, after", "after.estimate", plain),
        ("gate", "gate", _gate_verdict),
        ("retraining time", "retrain_seconds", seconds),
    ],
    "multitask": [
        ("two models: intent / sentiment accuracy", "separate", lambda s: _pair(s, "accuracy")),
        ("one multi-task model: intent / sentiment accuracy", "multitask", lambda s: _pair(s, "accuracy")),
        (
            "model time per turn (p50), two models / one",
            "turn_ms_p50",
            lambda t: f"{t['two_models']:.1f} / {t['multitask']:.1f} ms",
        ),
    ],
    "soak": [
        ("model, database", "model", plain),
        ("clients, seconds", "main", lambda m: f"{m['clients']}, {m['requests']} requests"),
        ("req/s at 200 clients / at 16", "ratio_req_per_s", times),
        ("successful req/s", "main.req_per_s", plain),
        ("p50 / p99 ms", "main", lambda m: f"{m['p50_ms']:.0f} / {m['p99_ms']:.0f}"),
        ("server errors (500/502/504)", "main.server_errors", plain),
        ("overload 503s", "main.overload_503", plain),
        ("dropped connections outside / inside the kill", "main", _dropped),
        ("feedback acknowledged / found / lost", "main", _acknowledged("feedback_acknowledged", "feedback_found")),
        (
            "predictions acknowledged / stored / lost",
            "main",
            _acknowledged("predictions_acknowledged", "predictions_stored"),
        ),
        (
            "killed after, restart until answering",
            "main.kill",
            lambda k: f"{k['after_s']:.0f} s, {k['restart_to_ready_s']:.1f} s",
        ),
        (
            "lost predictions answered at most … before the kill",
            "main.kill.lost_predictions_oldest_ms_before_kill",
            lambda v: f"{v:.0f} ms",
        ),
    ],
    "burst": [
        (
            "chat users (local generator) / predict → feedback users, seconds",
            "",
            lambda r: f"{r['chat_clients']} / {r['predict_feedback_clients']}, {r['seconds']:.0f} s",
        ),
        (
            "chat turns answered, p50 / p99 ms",
            "chat",
            lambda c: f"{c['answered']}, {c['p50_ms']:.0f} / {c['p99_ms']:.0f}",
        ),
        ("predict and feedback requests", "predict_feedback.requests", plain),
        ("refused with 503 (a bound reached)", "refused_503", plain),
        ("server errors (500/502/504) / dropped connections", "", lambda r: f"{r['server_errors']} / {r['dropped']}"),
        ("/readyz p50 / p99 / max ms, idle", "readyz_idle", _spread),
        ("/readyz p50 / p99 / max ms, during the burst", "readyz_during_burst", _spread),
    ],
    "sft_reply": [
        ("held-out loss before", "heldout_loss_before", plain),
        ("held-out loss after", "heldout_loss_after", plain),
        ("held-out perplexity before", "heldout_perplexity_before", plain),
        ("held-out perplexity after", "heldout_perplexity_after", plain),
        ("training time", "train_seconds", seconds),
    ],
}

# Results written before the default scope policy (at most 5% of in-scope messages turned away), when the
# threshold met 95% in-scope precision: their own rows, so the guides' figures on outlier exposure stay legible.
_BEFORE_SCOPE_POLICY: list[tuple[str, str, Format]] = [
    ("in-scope / out-of-scope test messages", "", lambda r: f"{r['known_test']} / {r['unknown_test']}"),
    ("in-scope accuracy of accepted messages (95%-precision threshold)", "probability.in_scope_accuracy", percent),
    ("unseen intents caught / in-scope precision", "probability", _caught_precision),
    ("plain classifier accuracy (answers everything)", "probability.plain_classifier_accuracy", percent),
    (
        "shipped off-topic set's held-out part caught",
        "probability.shipped_off_topic_heldout",
        lambda h: f"{percent(h['recall'])} of {h['messages']}",
    ),
    (
        "no examples of its own: unseen intents caught / in-scope precision",
        "probability, no examples of its own",
        _caught_precision,
    ),
    (
        "no examples of its own: shipped held-out caught / accuracy accepted",
        "probability, no examples of its own",
        lambda r: f"{percent(r['shipped_off_topic_heldout']['recall'])} / {percent(r['in_scope_accuracy'])}",
    ),
    ("training time", "training_seconds", seconds),
]
FIGURES |= {
    name: _BEFORE_SCOPE_POLICY
    for name in (
        "assistant_eval-threshold",
        "assistant_eval-threshold-no-outlier-exposure",
        "assistant_eval-trained-oos",
    )
}
FIGURES["oos_scores-no-outlier-exposure"] = [
    ("in-scope / unseen-intent test messages", "", lambda r: f"{r['known_test']} / {r['unknown_test']}"),
    ("recipe overrides", "overrides", lambda o: ", ".join(o)),
    ("in-scope accuracy", "in_scope_accuracy", percent),
    *(
        (
            f"{score}: AUROC / unseen caught at 95% precision / in-scope rejected",
            f"scores.{score}",
            lambda v: f"{v['auroc']:.3f} / {percent(v['out_of_scope_recall'])} / {percent(v['in_scope_rejected'])}",
        )
        for score in ("probability", "relative mahalanobis", "probability + relative mahalanobis")
    ),
]


def _private_runs(method: dict, key: str) -> str:
    """'93.9% / 88.1% at ε = 8 / 85.0% at ε = 3' (or the times) for one method of bench/dp.py."""
    fmt = percent if key == "accuracy" else seconds
    runs = [fmt(method["non_private"][key])]
    runs += [
        f"{fmt(run[key])} at ε = {run['epsilon']:.2f}" for name, run in method.items() if name.startswith("epsilon_")
    ]
    return " / ".join(runs)


def _noise(result: dict) -> str:
    return " / ".join(
        ", ".join(f"{run['noise_multiplier']:.2f}" for name, run in result[m].items() if name.startswith("epsilon_"))
        for m in ("full", "lora")
        if m in result
    )


def _pair(section: dict, key: str) -> str:
    return " / ".join(percent(section[task][key]) for task in ("intent", "sentiment") if task in section)


def _lookup(result: dict, path: str) -> Any:
    """The value at a dotted path; the path "" is the whole result."""
    value: Any = result
    for part in path.split(".") if path else []:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def decimal(value: Any) -> str:
    return f"{value:.3f}"


FORMATS: dict[str, Format] = {
    "percent": percent,
    "seconds": seconds,
    "times": times,
    "points": points,
    "plain": plain,
    "decimal": decimal,
}


def figure(name: str, path: str, how: str, folder: Path = RESULTS, page: str = "benchmarks.md") -> str:
    """One figure of one results file, for a sentence in the guides (`{{ result NAME PATH FORMAT }}`): it fails
    the docs build when the file or the figure is not there, so a guide can never cite a number nobody measured.
    """
    file = folder / f"{name}.json"
    if not file.is_file():
        raise KeyError(f"no results file {file.name}: run the benchmark that writes it")
    value = _lookup(json.loads(file.read_text(encoding="utf-8"))["result"], path)
    if value is None:
        raise KeyError(f"{file.name} has no figure at {path}")
    return f"[{FORMATS[how](value)}]({page}#{name})"


SCOPE_SETTINGS = (
    ("no examples of its own", "default policy, no examples of its own"),
    ("100 examples of its own", "default policy, 100 examples of its own"),
    ("old default (95% precision), no examples of its own", "old default (95% precision), none of its own"),
    ("old default (95% precision), 100 examples of its own", "old default (95% precision), 100 of its own"),
)


def scope_table(folder: Path = RESULTS, page: str = "benchmarks.md") -> str:
    """The assistant guide's table: for each dataset bench/assistant_eval.py ran on, what each setting expected
    at start beside what the test measured."""
    rows = [
        "| dataset (AUROC; plain classifier accuracy) | setting | expected at start: turned away / caught | "
        "test: turned away / unseen caught / accuracy of accepted / shipped held-out caught |",
        "|---|---|---|---|",
    ]
    for path in sorted(folder.glob("assistant_eval-*.json")):
        entry = json.loads(path.read_text(encoding="utf-8"))
        result = entry["result"]
        if "settings" not in result:  # written before the default scope policy
            continue
        dataset = f"[{result['dataset']}]({page}#{entry['name']}) ({decimal(result['auroc'])}; "
        dataset += f"{percent(result['plain_classifier_accuracy'])})"
        for key, label in SCOPE_SETTINGS:
            setting = result["settings"][key]
            rows.append(f"| {dataset} | {label} | {_expected(setting)} | {_tested(setting)} |")
    return "\n".join(rows)


def load_results(folder: Path = RESULTS) -> list[dict]:
    """Every results file, by name."""
    return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.json"))]


def _figures_of(entry: dict) -> list[tuple[str, str, Format]]:
    return FIGURES.get(entry["name"]) or FIGURES.get(entry["benchmark"], [])


def _rows(entry: dict) -> list[tuple[str, str]]:
    rows = []
    for label, path, fmt in _figures_of(entry):
        value = _lookup(entry["result"], path)
        if value is not None:
            try:
                rows.append((label, fmt(value)))
            except (KeyError, TypeError, ValueError):
                continue
    if not rows:  # no spec: the top-level numbers
        rows = [(key, plain(value)) for key, value in entry["result"].items() if isinstance(value, int | float)]
    return rows


def machine_line(machine: dict) -> str:
    flags = ", ".join(flag for flag, present in machine.get("flags", {}).items() if present)
    return (
        f"{machine.get('cores', '?')} cores, {machine.get('cpu', 'unknown CPU')}"
        + (f" ({flags})" if flags else "")
        + f", {machine.get('memory_gib', '?')} GiB"
    )


def benchmarks_markdown(folder: Path = RESULTS) -> str:
    """One section per results file: what ran, where, when, on which commit, and its figures."""
    entries = load_results(folder)
    if not entries:
        return "*No results yet: run a script in bench/ and it writes bench/results/NAME.json.*"
    out: list[str] = []
    for entry in entries:
        out += [
            f"### {entry['name']}",
            "",
            f"`{entry['command']}`  ",
            f"{entry['date'][:10]}, commit `{entry['commit']}`, {machine_line(entry.get('machine', {}))}",
            "",
            "| | |",
            "|---|---|",
            *(f"| {label} | {value} |" for label, value in _rows(entry)),
            "",
            '??? note "the whole result"',
            "",
            "    ```json",
            *("    " + line for line in json.dumps(entry["result"], indent=2, ensure_ascii=False).splitlines()),
            "    ```",
            "",
        ]
    return "\n".join(out)


# The README's headline rows, five at most (the rest is on the benchmarks page): (results name, what, how the
# figure reads).
HEADLINES: list[tuple[str, str, Callable[[dict], str]]] = [
    (
        "train_classifier-banking77-hf-trainer",
        "Banking77, 77 intents, all-MiniLM-L6-v2 (22M)",
        lambda r: (
            f"{percent(r['tuneloop']['accuracy'])} test accuracy in {seconds(r['tuneloop']['train_seconds'])}; "
            f"90% reached in {times(r['ratios']['seconds_to_90'])} the time of a plain HF Trainer"
        ),
    ),
    (
        "train_classifier-waimai_10k",
        "waimai_10k, Chinese reviews, multilingual-e5-small",
        lambda r: (
            f"{percent(r['tuneloop']['accuracy'])} test accuracy in {seconds(r['tuneloop']['train_seconds'])}, "
            + _against_baseline(r["tuneloop"])
        ),
    ),
    (
        "serve_load-onnx-int8",
        "Serving Banking77 over HTTP, 16 clients, the default runtime (int8 that passed its check against fp32)",
        lambda r: (
            f"{r['tuneloop']['req_per_s']:.0f} req/s, {times(r['ratio_req_per_s'])} a naive FastAPI + "
            f"pipeline server, p99 {r['tuneloop']['p99_ms']:.0f} ms; its label on {percent(r['same_predictions'])} "
            f"of 3,080 test texts"
        ),
    ),
    (
        "poisoning",
        "The loop under attack: staff correct a drifted model, one untrusted key sends 1,000 backdoor corrections",
        lambda r: (
            f"drifted intents macro-F1 {percent(r['before']['drifted_macro_f1'])} → "
            f"{percent(r['after']['drifted_macro_f1'])}, gate "
            + ("promoted" if r["gate"]["promoted"] else "did not promote")
            + f"; the trigger turns {percent(r['attack']['trigger_flips_share']['after'])} of test texts into the "
            f"attacker's intent ({r['attack']['review_queue']['attacker_rows_pending']:,} poisoned corrections "
            "held for review)"
        ),
    ),
    (
        "soak-postgresql-kill",
        "200 clients for 60 s on PostgreSQL, server SIGKILLed mid-run",
        lambda r: (
            f"{r['main']['feedback_lost']} acknowledged feedback lost, {r['main']['server_errors']} server errors; "
            f"answering again {r['main']['kill']['restart_to_ready_s']:.1f} s after the restart"
        ),
    ),
]


def readme_table(folder: Path = RESULTS) -> str:
    """The README's results table: the headline rows whose results exist."""
    entries = {entry["name"]: entry for entry in load_results(folder)}
    rows = ["| | measured on 2 CPU cores, no GPU |", "|---|---|"]
    for name, what, reads in HEADLINES:
        if name in entries:
            rows.append(f"| {what} | {reads(entries[name]['result'])} |")
    return "\n".join(rows)


def rendered_readme(readme: str, folder: Path = RESULTS) -> str:
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{readme_table(folder)}\n{END}{after}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="Rewrite the README's results table.")
    parser.add_argument("--check", action="store_true", help="Exit 1 if the README's table is out of date.")
    args = parser.parse_args()
    current = README.read_text(encoding="utf-8")
    wanted = rendered_readme(current)
    if args.check:
        sys.exit(0 if current == wanted else 1)
    if args.readme:
        README.write_text(wanted, encoding="utf-8")
    else:
        print(benchmarks_markdown())


if __name__ == "__main__":
    main()
