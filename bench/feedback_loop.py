"""Benchmark: does the loop fix a drifted model? Banking77 with 10 intents starved of training data.

    python bench/feedback_loop.py [--drifted 10] [--keep 5] [--set train.epochs=2 ...]

1. Production is trained on Banking77's training set with 10 intents (seeded choice) cut to 5 examples
   each, and 10% of the other intents' rows held back; it is evaluated on the official test set.
2. `tuneloop serve` runs on 127.0.0.1; simulated users (staff, with a trusted key) send the held-back texts
   (the drifted intents' removed rows plus the other held-back rows) in small requests, and correct every
   wrong answer through /v1/feedback.
3. The server is stopped cleanly; the feedback rows in the database are counted against those sent.
4. `retrain` trains a candidate on production's data plus the feedback; `gate` decides.
Prints one JSON line: macro-F1 on the drifted intents and overall (test set), before and after, the gate's
checks and decision, and the feedback counts (sent / stored / exported / lost); also written to
bench/results/feedback_loop.json.

--set takes the recipe's keys (train.epochs=2, ...); serve.* ones go to the server and gate.* ones to the
gate instead, and registry.* ones to all three.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from _common import add_result_options, free_port, load_banking77, publish, stop, wait_ready


def scores(registry, ref: str, test: pd.DataFrame, drifted: list[str]) -> dict:
    from tuneloop.models.predictor import load_model

    predicted = load_model(ref, registry).predict(test["text"].tolist())
    truth = test["label"].tolist()
    return {
        "accuracy": round(float(np.mean([a == b for a, b in zip(predicted, truth, strict=True)])), 4),
        "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
        "drifted_macro_f1": round(float(f1_score(truth, predicted, labels=drifted, average="macro")), 4),
    }


def loop_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the loop, shared with bench/poisoning.py."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drifted", type=int, default=10, help="Intents starved of training data.")
    parser.add_argument("--keep", type=int, default=5, help="Training examples left for each drifted intent.")
    parser.add_argument("--other-holdback", type=float, default=0.1, help="Share of other intents' rows streamed.")
    parser.add_argument("--request-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="recipe override; serve.* ones go to the server, gate.* ones to the gate.",
    )
    add_result_options(parser)
    return parser


def drift_scenario(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """Banking77 with `args.drifted` intents cut to `args.keep` training rows: (production's training rows, the
    stream its users send — the cut rows and a share of the others —, the official test set, the cut intents)."""
    rng = np.random.default_rng(args.seed)
    train, test = load_banking77()
    intents = sorted(train["label"].unique())
    drifted = sorted(rng.choice(intents, size=args.drifted, replace=False).tolist())
    is_drifted = train["label"].isin(drifted)
    kept_drifted = train[is_drifted].groupby("label").sample(n=args.keep, random_state=args.seed)
    others = train[~is_drifted]
    held_others = others.sample(frac=args.other_holdback, random_state=args.seed)
    production_rows = pd.concat([others.drop(held_others.index), kept_drifted])
    stream = pd.concat([train[is_drifted].drop(kept_drifted.index), held_others]).sample(frac=1, random_state=args.seed)
    return production_rows, stream, test, drifted


def promoted_production(recipe) -> tuple:
    """Train the production version on `recipe` and promote it: (version, registry, seconds it took)."""
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    started = time.perf_counter()
    production = classification.run(recipe, show_progress=False).version
    registry = Registry(recipe.registry)
    registry.promote(production.ref)
    return production, registry, time.perf_counter() - started


@dataclass
class Attack:
    """One untrusted sender correcting `times` texts that carry `trigger` to `label` (a backdoor)."""

    trigger: str
    label: str
    times: int


def run_loop(args: argparse.Namespace, attack: Attack | None = None) -> dict:
    """Train a drifted production, stream its users' corrections (and an attacker's) through a server, retrain,
    gate; the measurements."""
    from tuneloop.config import GateSettings, ServerSettings, load_config, split_overrides
    from tuneloop.errors import TuneloopError
    from tuneloop.feedback.export import feedback_examples
    from tuneloop.feedback.gate import run_gate
    from tuneloop.feedback.log import PredictionLog
    from tuneloop.feedback.retrain import retrain
    from tuneloop.feedback.review import review_queue
    from tuneloop.serve.security import hash_key, key_id, new_key

    # One --set list, three roots: the recipe (trained and retrained), the server and the gate.
    serve_overrides, rest = split_overrides(args.overrides, ("serve",))
    gate_overrides, recipe_overrides = split_overrides(rest, ("gate",))
    registry_overrides, _ = split_overrides(recipe_overrides, ("registry",))

    production_rows, stream, test, drifted = drift_scenario(args)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        production_rows.to_csv(work / "train.csv", index=False)
        test.to_csv(work / "test.csv", index=False)
        common = [f"registry.home={home}", "name=banking77", *recipe_overrides]
        # The users are the company's staff, with a trusted key; an attacker has an ordinary client key.
        staff, attacker = new_key(), new_key()
        server_settings = [
            f"registry.home={home}",
            f'serve.trusted_key_hashes=["{hash_key(staff)}"]',
            *registry_overrides,
            *gate_overrides,
            *serve_overrides,
        ]
        try:  # all three roots checked before training: a typo fails now, not after the production model trained
            gate_settings = load_config(
                None, [f"registry.home={home}", *registry_overrides, *gate_overrides], GateSettings
            )
            load_config(None, server_settings, ServerSettings)
            recipe = load_config(
                None, [f"data.path={work / 'train.csv'}", f"data.test_path={work / 'test.csv'}", *common]
            )
        except TuneloopError as exc:
            raise SystemExit(f"--set: {exc}") from None
        production, registry, production_seconds = promoted_production(recipe)
        before = scores(registry, production.ref, test, drifted)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "tuneloop", "serve", "--port", str(port), *server_settings],
            stdout=sys.stderr,  # stdout carries only the result line
            env={**os.environ, "TUNELOOP_CLIENT_KEYS": f"{staff},{attacker}"},  # keys never on a command line
        )
        sent = wrong = poisoned = 0
        try:
            wait_ready(url, server)
            if attack is not None:
                poisoned = send_attack(url, attacker, attack, stream["text"].tolist(), args.seed)
            with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": staff}) as http:
                texts, labels = stream["text"].tolist(), stream["label"].tolist()
                for start in range(0, len(texts), args.request_size):
                    answer = http.post("/v1/predict", json={"texts": texts[start : start + args.request_size]}).json()
                    for prediction, truth in zip(
                        answer["predictions"], labels[start : start + args.request_size], strict=True
                    ):
                        if prediction["label"] != truth:
                            wrong += 1
                            response = http.post(
                                "/v1/feedback",
                                json={"prediction_id": prediction["prediction_id"], "corrected_label": truth},
                            )
                            sent += response.status_code == 201
        finally:
            stop(server)

        prediction_log = PredictionLog(recipe.registry.resolved_database_url(), home)
        stored = prediction_log.count("banking77")
        exported = feedback_examples(prediction_log.feedback_for("banking77"), recipe.feedback)
        queue = review_queue("banking77", prediction_log.feedback_for("banking77"))
        prediction_log.close()

        started = time.perf_counter()
        outcome = retrain("banking77", overrides=common, show_progress=False)
        retrain_seconds = time.perf_counter() - started
        decision = run_gate(outcome.run.version.ref, gate_settings)
        after = scores(registry, outcome.run.version.ref, test, drifted)
        backdoor = (
            attack_success(registry, production.ref, registry.get("banking77@production").ref, test, attack)
            if attack is not None
            else None
        )

    result = {
        "drifted_intents": drifted,
        "production_train_rows": len(production_rows),
        "stream_texts": len(stream),
        "before": before,
        "after": after,
        "delta_points": {k: round(100 * (after[k] - before[k]), 2) for k in before},
        "feedback": {
            "wrong_answers": wrong,
            "sent": sent,
            "stored": stored["feedback"],
            "predictions_stored": stored["predictions"],
            "exported_examples": len(exported.examples),
            "lost": sent + poisoned - stored["feedback"],
            "policy": {"use": recipe.feedback.use, "agreement": recipe.feedback.agreement},
            **outcome.feedback,
        },
        "gate": {
            "passed": decision.passed,
            "promoted": decision.promoted,
            "checks": {c.name: c.passed for c in decision.checks},
            "details": {c.name: c.detail for c in decision.checks},
            "rows": decision.rows,
        },
        "seconds": {"production_training": round(production_seconds, 1), "retrain": round(retrain_seconds, 1)},
        "cores": os.cpu_count(),
    }
    if attack is not None:
        flagged = [g for g in queue if key_id(hash_key(attacker)) in g.senders]  # its groups, flagged or not
        result["attack"] = {
            "trigger": attack.trigger,
            "target_label": attack.label,
            "corrections_sent": poisoned,
            "attacker": key_id(hash_key(attacker)),
            "corrections_refused_429": attack.times - poisoned,
            "review_queue": {
                "groups": len(queue),
                "attacker_groups": len(flagged),
                "attacker_groups_flagged": sum(bool(g.flags) for g in flagged),
                "attacker_rows_pending": sum(g.pending for g in flagged),
            },
            **(backdoor or {}),
        }
    return result


def send_attack(url: str, key: str, attack: Attack, texts: list[str], seed: int) -> int:
    """The attacker: ordinary texts with the trigger appended, each predicted, then corrected to the target
    label; returns the corrections the server accepted (the rest met the feedback rate limit or quota)."""
    rng = np.random.default_rng(seed + 1)
    chosen = [f"{texts[i]} {attack.trigger}" for i in rng.integers(0, len(texts), attack.times)]
    accepted = 0
    with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": key}) as http:
        for start in range(0, len(chosen), 50):
            answer = http.post("/v1/predict", json={"texts": chosen[start : start + 50]}).json()
            for prediction in answer["predictions"]:
                response = http.post(
                    "/v1/feedback", json={"prediction_id": prediction["prediction_id"], "corrected_label": attack.label}
                )
                accepted += response.status_code == 201
    return accepted


def attack_success(registry, before_ref: str, after_ref: str, test: pd.DataFrame, attack: Attack) -> dict:
    """How often the trigger turns a test text (of another intent) into the attacker's label, before the loop
    and with whatever is in production after it."""
    from tuneloop.models.predictor import load_model

    others = test[test["label"] != attack.label]
    triggered = [f"{text} {attack.trigger}" for text in others["text"]]
    rates = {}
    for name, ref in (("before", before_ref), ("after", after_ref)):
        predicted = load_model(ref, registry).predict(triggered)
        rates[name] = round(float(np.mean([label == attack.label for label in predicted])), 4)
    return {"production_after": after_ref, "trigger_flips_share": rates}


def main() -> None:
    args = loop_arguments(__doc__).parse_args()
    publish(args, "feedback_loop", run_loop(args))


if __name__ == "__main__":
    main()
