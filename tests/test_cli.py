"""The CLI end to end on the tiny model, and every bad input the spine promises to handle."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from tuneloop.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, message):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), result.output
    assert message in " ".join(lines), result.output


@pytest.fixture()
def trained(tiny_overrides, home):
    result = invoke("train", *tiny_overrides)
    assert result.exit_code == 0, result.output
    return home


def test_train_registers_and_writes_a_self_describing_version(trained):
    version = trained / "models" / "toy" / "v1"
    for name in (
        "config.yaml",
        "report.html",
        "report.json",
        "metrics.jsonl",
        "data/test.jsonl",
        "data/data_report.json",
        "model/classifier.json",
        "model/tokenizer.json",
    ):
        assert (version / name).exists(), name
    assert not (version / "checkpoint").exists()
    report = json.loads((version / "report.json").read_text())
    shown = json.loads(invoke("models", "show", "toy@1").output)
    assert shown["metrics"]["accuracy"] == report["test"]["accuracy"] > 1 / 3  # above chance on three intents
    assert "overfitting" in report
    assert "registry" not in shown["config"]  # where this machine keeps things is no part of the recipe


def test_models_list_show_promote_archive_and_predict(trained, home):
    assert "toy" in invoke("models", "list").output
    shown = json.loads(invoke("models", "show", "toy@1").output)
    assert shown["stage"] == "candidate" and shown["data_fingerprint"]
    assert "production" in invoke("models", "promote", "toy@1").output
    result = invoke("predict", "--model", "toy@production", "--json", "my parcel is late", "password reset please")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["model"] for r in rows] == ["toy@1", "toy@1"]
    assert all(r["label"] in {"refund", "delivery", "password"} and len(r["top_k"]) == 3 for r in rows)
    assert abs(sum(k["probability"] for k in rows[0]["top_k"]) - 1) < 1e-4
    assert "archived" in invoke("models", "archive", "toy@1").output


def test_predict_from_file(trained, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("refund my money\n\nlogin locked\n", encoding="utf-8")
    result = invoke("predict", "--model", "toy", "--input", texts, "--json", "-k", "1")
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 2


def test_eval_writes_a_report_on_the_frozen_test_split_or_a_file(trained, toy_csv, tmp_path):
    result = invoke("eval", "--model", "toy@1", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file()
    result = invoke("eval", "--model", "toy@1", "--data", toy_csv, "--out", tmp_path / "r2")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["test"]["n"] == 48


def test_eval_points_at_rows_whose_label_looks_wrong(trained, toy_csv, tmp_path, home):
    flipped = pd.read_csv(toy_csv)
    flipped["label"] = flipped["label"].map({"refund": "delivery", "delivery": "password", "password": "refund"})
    flipped.to_csv(tmp_path / "flipped.csv", index=False)
    result = invoke(
        "eval",
        "--model",
        "toy@1",
        "--data",
        tmp_path / "flipped.csv",
        "--out",
        tmp_path / "r",
        f"registry.home={home}",
        "eval.suspect_confidence=0.6",
    )
    assert result.exit_code == 0, result.output
    suspects = json.loads((tmp_path / "r" / "report.json").read_text())["test"]["label_suspects"]
    assert suspects["count"] > len(flipped) / 4
    assert f"{suspects['count']} test rows may be mislabelled" in " ".join(result.output.split())
    assert "Possible label errors" in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")


def test_data_inspect_and_prepare(tiny_overrides, tmp_path):
    result = invoke("data", "inspect", "--json", *tiny_overrides)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["text_length"]["unit"] == "tokens" and report["rows_kept"] == 48
    result = invoke("data", "prepare", "--out", tmp_path / "prepared", *tiny_overrides)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "prepared" / "train.jsonl").is_file()


def test_data_audit_writes_the_ranked_csv_and_explain_shades_words(tiny_overrides, tmp_path, home):
    result = invoke("data", "audit", "--out", tmp_path / "issues.csv", *tiny_overrides, "data.kfold=3")
    assert result.exit_code == 0, result.output
    assert "training rows" in result.output and "look mislabelled" in result.output
    assert "confirmed = yes" in " ".join(result.output.split())
    assert list(pd.read_csv(tmp_path / "issues.csv").columns)[-1] == "confirmed"
    refused = invoke("data", "audit", "--out", tmp_path / "x.csv", *tiny_overrides, "data.kfold=40")
    assert refused.exit_code == 1 and "audit's 40 folds" in refused.output

    assert invoke("train", *tiny_overrides).exit_code == 0
    shaded = invoke("explain", "-m", "toy", "refund my money please", f"registry.home={home}")
    assert shaded.exit_code == 0, shaded.output
    assert "refund my money please" in shaded.output and "baseline" in shaded.output
    as_json = json.loads(invoke("explain", "-m", "toy", "--json", "refund my money", f"registry.home={home}").output)
    assert [w["word"] for w in as_json["words"]] == ["refund", "my", "money"] and as_json["model"] == "toy@1"
    empty = invoke("explain", "-m", "toy", f"registry.home={home}")
    assert empty.exit_code == 1 and "nothing to explain" in empty.output


def test_resume_latest(tiny_overrides, home):
    first = invoke("train", "--no-register", *tiny_overrides)
    assert first.exit_code == 0, first.output
    again = invoke("train", "--resume", "latest", *tiny_overrides)
    assert again.exit_code == 0, again.output
    assert "registered toy@1" in again.output


def test_kfold(tiny_overrides):
    result = invoke("train", *tiny_overrides, "data.kfold=2", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert "2-fold validation macro-F1" in result.output


def bad_files(tmp_path):
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes("text,label\n退款,a\n".encode("gbk"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    return {
        "non-utf8": (gbk, "not valid UTF-8"),
        "empty": (empty, "is empty"),
        "missing": (tmp_path / "nope.csv", "data file not found"),
    }


@pytest.mark.parametrize(
    "case",
    ["non-utf8", "empty", "missing", "single-label", "rare-label", "missing-column", "unknown-model", "config-typo"],
)
def test_bad_input_is_one_clear_line_and_touches_no_registered_version(trained, tiny_overrides, tmp_path, case):
    before = json.loads(invoke("models", "show", "toy@1").output)
    overrides = list(tiny_overrides)
    files = bad_files(tmp_path)
    if case in files:
        path, message = files[case]
        overrides.append(f"data.path={path}")
    elif case in ("single-label", "rare-label", "missing-column"):
        rows = {
            "single-label": [("a b", "x"), ("c d", "x")],
            "rare-label": [("a b", "x"), ("c d", "x"), ("e", "y")],
            "missing-column": [("a", "x")],
        }[case]
        path = tmp_path / f"{case}.csv"
        columns = ["body", "label"] if case == "missing-column" else ["text", "label"]
        pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
        overrides.append(f"data.path={path}")
        message = {
            "single-label": "only one label",
            "rare-label": "fewer than 2 examples",
            "missing-column": "no text column 'text'",
        }[case]
    elif case == "unknown-model":
        overrides.append("model.name=bert-huge-9000")
        message = "unknown model 'bert-huge-9000'"
    else:
        overrides.append("train.learning_rate=1")
        message = "unknown key 'train.learning_rate'"
    assert_clean_failure(invoke("train", *overrides), message)
    after = json.loads(invoke("models", "show", "toy@1").output)
    assert after == before
    assert [v.name for v in (trained / "models" / "toy").iterdir()] == ["v1"]


def test_unknown_model_reference_for_predict(trained):
    assert_clean_failure(invoke("predict", "--model", "nobody", "hello"), "no model named 'nobody'")


def test_predict_needs_text(trained):
    assert_clean_failure(invoke("predict", "--model", "toy"), "nothing to classify")


def test_rollback_and_keys(trained, tiny_overrides):
    assert invoke("train", *tiny_overrides).exit_code == 0
    invoke("models", "promote", "toy@1")
    invoke("models", "promote", "toy@2")
    result = invoke("models", "rollback", "toy")
    assert result.exit_code == 0 and "toy@1 is production again (toy@2 archived)" in result.output
    assert_clean_failure(invoke("models", "rollback", "toy"), "no earlier production version")
    keys = invoke("keys", "new", "--scope", "admin")
    assert keys.exit_code == 0 and "serve.admin_key_hashes=[" in keys.output
    assert_clean_failure(invoke("keys", "new", "--scope", "root"), "--scope must be client or admin")


def test_serve_without_a_production_version_is_one_clear_line(trained):
    assert_clean_failure(invoke("serve", "--port", "0"), "nothing to serve")


def test_gate_rejection_exits_non_zero_and_keeps_production(trained, tiny_overrides):
    invoke("models", "promote", "toy@1")
    worse = invoke(
        "train", *tiny_overrides, "model.head_init=random", "train.lr=1e-9", "train.head_lr=1e-9", "train.epochs=1"
    )
    assert worse.exit_code == 0, worse.output
    result = invoke("gate", "toy@2")
    assert result.exit_code == 3, result.output
    assert "toy@2 rejected" in result.output and "FAIL" in result.output
    assert json.loads(invoke("models", "show", "toy@production").output)["version"] == 1
    assert_clean_failure(invoke("gate", "toy@1"), "already production")
    assert_clean_failure(invoke("retrain", "toy"), "no feedback with a label for 'toy'")


def test_log_import_writes_rescue_files_into_the_database(trained, home):
    from datetime import UTC, datetime

    from tuneloop.config import RegistryConfig
    from tuneloop.feedback.log import LoggedPrediction, PredictionLog

    url = RegistryConfig(home=home).resolved_database_url()
    log = PredictionLog(url, home)
    log._rescue(
        [
            LoggedPrediction(
                id="x" * 32,
                created_at=datetime.now(UTC),
                model_name="toy",
                model_version=1,
                text="t",
                label="refund",
                scores={"refund": 1.0},
            )
        ],
        "test",
    )
    log.close()
    result = invoke("log", "import")
    assert result.exit_code == 0 and "imported 1 predictions from 1 rescue files" in result.output, result.output
    assert PredictionLog(url, home).count("toy")["predictions"] == 1


def test_promote_and_rollback_refuse_a_version_that_does_not_load(trained, home, tmp_path):
    from tuneloop.config import RegistryConfig
    from tuneloop.registry import Registry, VersionFolder

    registry = Registry(RegistryConfig(home=home))
    (tmp_path / "broken" / "model").mkdir(parents=True)
    broken = registry.register(
        "toy", VersionFolder(tmp_path / "broken"), base_model="tiny", data_fingerprint="x", config={}, metrics={}
    )
    assert_clean_failure(invoke("models", "promote", broken.ref), f"{broken.ref} does not load")
    assert registry._production_number("toy") is None
    registry.promote(broken.ref)  # straight in the registry, as before the check existed
    assert invoke("models", "promote", "toy@1").exit_code == 0
    assert_clean_failure(invoke("models", "rollback", "toy"), f"{broken.ref} does not load")
    assert registry.get("toy@production").version == 1
