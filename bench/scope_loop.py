"""Benchmark: the assistant learns where to say no from production, with 10 intents of a dataset held out.

    python bench/scope_loop.py [--dataset banking77|hwu64] [--messages 200] [--home DIR] [--set train.epochs=2 ...]

1. The intent and sentiment models of bench/assistant_eval.py (--home: reused, and copied first, so the loop's
   promotion never reaches them); an assistant with no out-of-scope examples of its own and the default policy.
2. `tuneloop serve` runs it on 127.0.0.1; a trusted staff key sends --messages off-topic messages (the held-out
   intents' training texts) through /v1/chat, as a person trying the assistant out would.
3. The same key marks every one the assistant answered (intent not null) 'out of scope' through /v1/feedback
   (feedback on a chat turn comes only from the key whose session it is; a customer's marks would wait for review).
4. The server is stopped cleanly; `retrain` trains a candidate (the corrections teach it the out_of_scope label,
   a share held out for the gate), `gate` decides, and the assistant re-tunes for whichever version serves.
5. Before and after, with the scope each version tunes at start: the held-out intents' *test* messages caught
   (none of them was sent), in-scope test messages turned away, in-scope accuracy of the messages accepted and of
   the plain classifier.
Prints one JSON line; written to bench/results/scope_loop[-DATASET].json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from _common import (
    HeldOutSplit,
    add_result_options,
    free_port,
    held_out_options,
    publish,
    serve_process,
    stop,
    wait_ready,
)
from assistant_eval import models, write_faq

ASSISTANT = """name: loop
intent_model: intents
sentiment_model: sentiment
faq: faq.csv
languages: [en]
escalation: {negative_turns: 0, min_confidence: 0.0}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    held_out_options(parser)
    parser.add_argument("--messages", type=int, default=200, help="Off-topic messages sent through /v1/chat.")
    add_result_options(parser)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    split = HeldOutSplit.of(args)
    test, held_out, known_train = split.test, split.held_out, split.known_train
    sent = split.unseen_train.sample(n=args.messages, random_state=args.seed)["text"].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = args.home or work / "trained"
        models(source, known_train, args.overrides)
        shutil.copytree(source, work / "home")
        home = work / "home"
        write_faq(work, known_train)
        (work / "assistant.yaml").write_text(ASSISTANT)
        before = measure(home, work, test, held_out)
        chat = production_chat(home, work, sent)
        retrained = retrain_and_gate(home, args.overrides)
        after = measure(home, work, test, held_out)
    publish(
        args,
        "scope_loop" if args.dataset == "banking77" else f"scope_loop-{args.dataset}",
        {
            "dataset": args.dataset,
            "held_out_intents": held_out,
            "messages_sent": len(sent),
            **chat,
            **retrained,
            "before": before,
            "after": after,
            "caught_points_gained": round(100 * (after["out_of_scope_caught"] - before["out_of_scope_caught"]), 2),
        },
    )


def production_chat(home: Path, work: Path, sent: list[str]) -> dict:
    """The off-topic messages through /v1/chat from a trusted key, which marks those answered."""
    from tuneloop.config import load_config
    from tuneloop.feedback.log import PredictionLog
    from tuneloop.feedback.review import review_queue
    from tuneloop.serve.security import hash_key, new_key

    staff = new_key()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve_process(
        port,
        [
            f"registry.home={home}",
            f"serve.assistant={work / 'assistant.yaml'}",
            f'serve.trusted_key_hashes=["{hash_key(staff)}"]',
            "serve.feedback_rate_limit=null",
        ],
        env={**os.environ, "TUNELOOP_CLIENT_KEYS": staff},  # keys never on a command line
    )
    answered = marked = 0
    try:
        wait_ready(url, server)
        with httpx.Client(base_url=url, timeout=60) as http:
            for text in sent:
                turn = http.post("/v1/chat", json={"message": text}, headers={"X-API-Key": staff}).json()
                if turn["intent"] is not None:
                    answered += 1
                    response = http.post(
                        "/v1/feedback",
                        json={"turn_id": turn["turn_id"], "corrected_label": "out_of_scope"},
                        headers={"X-API-Key": staff},
                    )
                    marked += response.status_code == 201
    finally:
        stop(server)
    registry = load_config(None, [f"registry.home={home}"]).registry
    prediction_log = PredictionLog(registry.resolved_database_url(), home)
    waiting = sum(group.pending for group in review_queue("intents", prediction_log.feedback_for("intents")))
    prediction_log.close()
    return {"answered_before_marking": answered, "marked_out_of_scope": marked, "awaiting_review": waiting}


def retrain_and_gate(home: Path, overrides: list[str]) -> dict:
    from tuneloop.config import GateSettings, load_config
    from tuneloop.feedback.gate import run_gate
    from tuneloop.feedback.retrain import retrain

    started = time.perf_counter()
    outcome = retrain("intents", overrides=[f"registry.home={home}", *overrides], show_progress=False)
    seconds = time.perf_counter() - started
    decision = run_gate(outcome.run.version.ref, load_config(None, [f"registry.home={home}"], GateSettings))
    return {
        "retrain_seconds": round(seconds, 1),
        "retrain_feedback": outcome.feedback,
        "gate": {
            "candidate": decision.candidate,
            "promoted": decision.promoted,
            "checks": {check.name: {"passed": check.passed, "detail": check.detail} for check in decision.checks},
        },
    }


def measure(home: Path, work: Path, test: pd.DataFrame, held_out: list[str]) -> dict:
    """The production version with the scope it tunes at start, on the test messages."""
    from tuneloop.assistant.definition import load_definition
    from tuneloop.assistant.runtime import AssistantRuntime, tuning_scores
    from tuneloop.config import load_config
    from tuneloop.registry import Registry

    runtime = AssistantRuntime(
        load_definition(work / "assistant.yaml"), Registry(load_config(None, [f"registry.home={home}"]).registry)
    )
    intent, _ = runtime.load_models()
    threshold = runtime.calibrate(intent)
    logits = intent.own_logits(intent.logits(test["text"].tolist()))
    scores = tuning_scores(logits, intent.model.spec, runtime.definition.scope)
    known = ~test["label"].isin(held_out).to_numpy()
    accepted = scores >= threshold.threshold
    intents = [i for i, label in enumerate(intent.labels) if label != runtime.definition.scope.label]
    plain = np.array(intent.labels)[np.array(intents)[logits[:, intents].argmax(1)]]
    right = plain == test["label"].to_numpy()
    return {
        "version": intent.ref,
        "estimate": threshold.summary(),
        "out_of_scope_examples": threshold.out_of_scope_examples,
        "in_scope_rejected": round(float((~accepted[known]).mean()), 4),
        "out_of_scope_caught": round(float((~accepted[~known]).mean()), 4),
        "accepted_in_scope_accuracy": round(float(right[known & accepted].mean()), 4),
        "plain_classifier_accuracy": round(float(right[known].mean()), 4),
    }


if __name__ == "__main__":
    main()
