"""The promotion gate: the pure comparison, and real tiny models where a worse candidate is rejected and a
better one promoted."""

from __future__ import annotations

import json

from helpers import tiny_config
from tuneloop.config import GateConfig, GateSettings, load_config
from tuneloop.db.lease import HeldLease
from tuneloop.feedback.gate import compare, run_gate
from tuneloop.registry import Registry
from tuneloop.training import classification

# A model that has learned nothing: random cosine head, learning rates too small to move it.
CRIPPLED = ("model.head_init=random", "train.lr=1e-9", "train.head_lr=1e-9", "train.epochs=1")


def labels(pattern: str) -> list[str]:
    return list(pattern)


def passed(checks) -> dict[str, bool]:
    return {c.name: c.passed for c in checks}


def test_identical_predictions_pass_every_check():
    true = labels("aaaabbbbcccc" * 5)
    checks, metrics, per_class, mcnemar = compare(true, true, true, ["test"] * len(true), GateConfig())
    assert all(passed(checks).values())
    assert mcnemar["test"]["p_value_candidate_worse"] == 1.0
    assert metrics["candidate"]["all"]["macro_f1"] == 1.0


def test_a_much_worse_candidate_fails_every_check():
    true = labels("aaaabbbbcccc" * 5)
    candidate = labels("aaaaaaaaaaaa" * 5)
    checks, _, per_class, mcnemar = compare(true, true, candidate, ["test"] * len(true), GateConfig())
    assert not any(passed(checks).values())
    assert mcnemar["test"]["candidate_only_wrong"] == 40 and mcnemar["test"]["p_value_candidate_worse"] < 1e-6
    assert {row["label"] for row in per_class if row["blocks"]} == {"a", "b", "c"}  # a: precision fell too


def test_one_collapsing_class_blocks_even_when_macro_f1_rises():
    true = labels("a" * 30 + "b" * 30 + "c" * 12)
    production = labels("a" * 20 + "b" * 10 + "b" * 20 + "a" * 10 + "c" * 12)
    candidate = labels("a" * 30 + "b" * 30 + "c" * 9 + "a" * 3)
    checks, metrics, per_class, _ = compare(true, production, candidate, ["test"] * len(true), GateConfig())
    assert metrics["candidate"]["all"]["macro_f1"] > metrics["production"]["all"]["macro_f1"]
    assert passed(checks) == {"test: macro-F1": True, "test: paired test (McNemar)": True, "test: per-class F1": False}
    assert [row["label"] for row in per_class if row["blocks"]] == ["c"]
    # The same drop on a class with fewer examples than min_class_support is reported, not blocking.
    lenient = GateConfig(min_class_support=20)
    assert passed(compare(true, production, candidate, ["test"] * len(true), lenient)[0])["test: per-class F1"]


def test_wins_on_feedback_do_not_hide_a_regression_on_the_test_split():
    """Regression: pooled, 12 test losses against 16 feedback wins passed McNemar (p≈0.83)."""
    test_true = labels("a" * 30 + "b" * 30)
    test_production = test_true
    test_candidate = labels("b" * 6 + "a" * 24 + "a" * 6 + "b" * 24)  # 12 new mistakes on the test split
    feedback_true = labels("ab" * 10)
    feedback_production = labels("ba" * 10)  # feedback: production's mistakes, by construction
    feedback_candidate = labels("ab" * 8 + "ba" * 2)
    checks, _, _, mcnemar = compare(
        test_true + feedback_true,
        test_production + feedback_production,
        test_candidate + feedback_candidate,
        ["test"] * 60 + ["feedback"] * 20,
        GateConfig(),
    )
    verdict = passed(checks)
    assert not verdict["test: paired test (McNemar)"] and not verdict["test: macro-F1"]
    assert verdict["feedback: macro-F1"] and verdict["feedback: paired test (McNemar)"]
    assert mcnemar["feedback"]["candidate_only_right"] == 16


def test_metrics_are_reported_per_part():
    true = labels("abab")
    _, metrics, _, _ = compare(true, labels("abba"), true, ["test", "test", "feedback", "feedback"], GateConfig())
    assert metrics["production"]["test"]["accuracy"] == 1.0 and metrics["production"]["feedback"]["accuracy"] == 0.0
    assert metrics["candidate"]["feedback"]["n"] == 2


def test_a_worse_candidate_is_rejected_and_a_better_one_promoted(served_on_each_database, tiny_encoder):
    config, home = served_on_each_database
    data = home.parent / "toy.csv"
    registry = Registry(config.registry)
    worse = classification.run(tiny_config(tiny_encoder, data, home, *CRIPPLED), show_progress=False).version
    gating = load_config(None, [f"registry.home={home}"], GateSettings)
    decision = run_gate(worse.ref, gating)
    assert not decision.passed and not decision.promoted
    assert registry.get("toy@production").version == 1
    report = json.loads((registry.folder(worse).gate / "report.json").read_text())
    assert report["passed"] is False and report["production"] == "toy@1"
    assert "REJECTED" in (registry.folder(worse).gate / "report.html").read_text()

    registry.promote(worse.ref)  # a bad version reached production (say, by hand)
    better = classification.run(tiny_config(tiny_encoder, data, home), show_progress=False).version
    decision = run_gate(better.ref, gating)
    assert decision.passed and decision.promoted
    assert decision.metrics["candidate"]["test"]["accuracy"] > decision.metrics["production"]["test"]["accuracy"]
    assert registry.get("toy@production").version == better.version
    assert registry.history("toy")[-1].reason.startswith(f"gate passed against {worse.ref}")


def test_a_promotion_made_while_the_gate_ran_is_never_overwritten(served_on_each_database, tiny_encoder, monkeypatch):
    """The gate judged the candidate against toy@1; someone promoted toy@2 meanwhile: the candidate passed
    against a version that is no longer production, so it is not promoted over toy@2."""
    from tuneloop.feedback import gate

    config, home = served_on_each_database
    registry = Registry(config.registry)
    recipe = tiny_config(tiny_encoder, home.parent / "toy.csv", home)
    meanwhile, candidate = (classification.run(recipe, show_progress=False).version for _ in range(2))
    judged = gate.evaluate_gate

    def slow_gate(*args, **kwargs):
        decision = judged(*args, **kwargs)
        registry.promote(meanwhile.ref, reason="by hand, while the gate ran")
        return decision

    monkeypatch.setattr(gate, "evaluate_gate", slow_gate)
    decision = run_gate(candidate.ref, load_config(None, [f"registry.home={home}"], GateSettings))
    assert decision.passed and not decision.promoted
    assert any("production of toy changed" in note for note in decision.notes)
    assert registry.get("toy@production").version == meanwhile.version


def test_a_gate_that_lost_its_lease_while_it_ran_does_not_promote(served_on_each_database, tiny_encoder, monkeypatch):
    """Review finding: a gate whose lease expired (the database away longer than it lives) went on to promote,
    while another job might hold the model."""
    from tuneloop.feedback import gate

    config, home = served_on_each_database
    registry = Registry(config.registry)
    candidate = classification.run(tiny_config(tiny_encoder, home.parent / "toy.csv", home), show_progress=False)

    class LostMeanwhile(HeldLease):
        def __enter__(self):
            super().__enter__()
            self.lost = True  # what the renewer sets when it finds the lease taken by another holder
            return self

    monkeypatch.setattr(gate, "model_job_lease", lambda engine, model, purpose: LostMeanwhile(engine, model, purpose))
    decision = run_gate(candidate.version.ref, load_config(None, [f"registry.home={home}"], GateSettings))
    assert decision.passed and not decision.promoted
    assert any("lost its hold on toy" in note for note in decision.notes)
    assert registry.get("toy@production").version == 1


def test_a_candidate_that_catches_fewer_out_of_scope_messages_is_not_promoted(served, tiny_encoder):
    """Regression: the gate judged the intents alone, so a candidate as accurate as production that let through
    more off-topic messages (here: trained without outlier exposure) was promoted."""
    config, home = served
    registry = Registry(config.registry)
    recipe = tiny_config(tiny_encoder, home.parent / "toy.csv", home, "train.outlier_exposure=0")
    careless = classification.run(recipe, show_progress=False).version
    decision = run_gate(careless.ref, load_config(None, [f"registry.home={home}"], GateSettings))
    assert not decision.promoted and registry.get("toy@production").version == 1
    verdict = passed(decision.checks)
    assert verdict["test: macro-F1"] and verdict["test: per-class F1"]  # as good on the intents
    assert not verdict["out of scope: caught"]
    assert "shipped off-topic messages, each turning away 5% of in-scope test messages" in decision.checks[-1].detail
