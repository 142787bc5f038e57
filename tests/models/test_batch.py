"""Batch prediction over files: every input format streamed in chunks, the output written whole or not at all,
an interrupted run resumed without predicting a chunk twice, and bad input turned away before anything is
written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers import toy_rows
from tuneloop.cli import app as cli
from tuneloop.errors import TuneloopError
from tuneloop.models.batch import count_rows, predict_file
from tuneloop.models.predictor import load_model
from tuneloop.registry import Registry


@pytest.fixture()
def predictor(served):
    settings, _ = served
    return load_model("toy", Registry(settings.registry), runtime="torch")


@pytest.fixture()
def rows() -> pd.DataFrame:
    frame = pd.DataFrame(toy_rows(per_label=12, seed=5))[["text"]]
    frame.insert(0, "ticket", [f"T{i:03d}" for i in range(len(frame))])
    frame.loc[4, "text"] = "   "  # blank: no prediction, the row kept
    return frame


def write_input(frame: pd.DataFrame, path) -> None:
    kind = path.suffix
    if kind == ".parquet":
        frame.to_parquet(path, index=False)
    elif kind == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif kind == ".txt":
        path.write_text("".join(t + "\n" for t in frame["text"]), encoding="utf-8")
    else:
        frame.to_csv(path, index=False, sep="\t" if kind == ".tsv" else ",")


def read_output(path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_csv(path, dtype={"ticket": str, "text": str, "label": str}, keep_default_na=False)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".txt"])
def test_every_input_format_is_predicted_in_order_chunk_by_chunk(predictor, rows, tmp_path, suffix):
    source = tmp_path / f"in{suffix}"
    write_input(rows, source)
    assert count_rows(source) == len(rows)
    out = tmp_path / "out.parquet"
    outcome = predict_file(predictor, source, out, chunk_rows=7)
    assert (outcome.rows, outcome.chunks, outcome.chunks_resumed) == (len(rows), 6, 0)
    got = pd.read_parquet(out)
    texts = rows["text"].tolist()
    expected = predictor.predict([t for t in texts if t.strip()])
    assert got["text"].tolist() == texts
    assert [None if pd.isna(label) else label for label in got["label"]] == expected[:4] + [None] + expected[4:]
    assert got["probability"].isna().tolist() == [i == 4 for i in range(len(rows))]
    if suffix != ".txt":
        assert got["ticket"].tolist() == rows["ticket"].tolist()
    assert not (tmp_path / "out.parquet.parts").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_csv_and_jsonl_outputs_hold_the_same_predictions(predictor, rows, tmp_path, suffix):
    source = tmp_path / "in.parquet"
    write_input(rows, source)
    predict_file(predictor, source, tmp_path / "reference.parquet", chunk_rows=10)
    predict_file(predictor, source, tmp_path / f"out{suffix}", chunk_rows=10)
    reference, got = pd.read_parquet(tmp_path / "reference.parquet"), read_output(tmp_path / f"out{suffix}")
    assert got["ticket"].tolist() == reference["ticket"].tolist()
    missing = [None if pd.isna(label) or label == "" else label for label in got["label"]]
    assert missing == [None if pd.isna(label) else label for label in reference["label"]]


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_where_it_stopped_and_predicts_no_chunk_twice(
    predictor, rows, tmp_path, monkeypatch
):
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    write_input(rows, source)
    predict_file(predictor, source, tmp_path / "whole.parquet", chunk_rows=5)

    seen = []

    def stop_after_three_chunks(count: int) -> None:
        seen.append(count)
        if len(seen) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        predict_file(predictor, source, out, chunk_rows=5, on_rows=stop_after_three_chunks)
    assert not out.exists()  # never half an output
    assert len(list((tmp_path / "out.parquet.parts").glob("part-*.parquet"))) == 3

    predicted = []
    real = predictor.predict_proba
    monkeypatch.setattr(
        type(predictor),
        "predict_proba",
        lambda self, texts, cleaned=False: predicted.append(len(texts)) or real(texts, cleaned),
    )
    outcome = predict_file(predictor, source, out, chunk_rows=5)
    assert outcome.chunks_resumed == 3 and len(predicted) == outcome.chunks - 3
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(tmp_path / "whole.parquet"))


def test_parts_of_another_job_are_not_mixed_in(predictor, rows, tmp_path):
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    write_input(rows, source)
    with pytest.raises(Interrupted):
        predict_file(predictor, source, out, chunk_rows=5, on_rows=lambda _: (_ for _ in ()).throw(Interrupted))
    changed = rows.assign(text=rows["text"].str.upper())
    write_input(changed, source)
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new modification time, whatever the clock
    outcome = predict_file(predictor, source, out, chunk_rows=5)
    assert outcome.chunks_resumed == 0
    assert pd.read_parquet(out)["text"].tolist() == changed["text"].tolist()


def test_a_broken_part_is_predicted_again(predictor, rows, tmp_path):
    source, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    write_input(rows, source)
    with pytest.raises(Interrupted):
        predict_file(predictor, source, out, chunk_rows=5, on_rows=lambda _: (_ for _ in ()).throw(Interrupted))
    (tmp_path / "out.parquet.parts" / "part-000000.parquet").write_bytes(b"")  # what a power cut can leave
    outcome = predict_file(predictor, source, out, chunk_rows=5)
    assert outcome.chunks_resumed == 0 and len(pd.read_parquet(out)) == len(rows)


def test_bad_input_is_one_clear_error_and_writes_nothing(predictor, rows, tmp_path):
    source = tmp_path / "in.csv"
    rows.rename(columns={"text": "message"}).to_csv(source, index=False)
    with pytest.raises(TuneloopError, match="has no 'text' column \\(it has ticket, message\\); name the text column"):
        predict_file(predictor, source, tmp_path / "out.parquet")
    with pytest.raises(TuneloopError, match="must end in one of .parquet, .csv, .jsonl"):
        predict_file(predictor, source, tmp_path / "out.xlsx")
    with pytest.raises(TuneloopError, match="input file not found"):
        predict_file(predictor, tmp_path / "missing.csv", tmp_path / "out.parquet")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(TuneloopError, match="not valid UTF-8"):
        predict_file(predictor, tmp_path / "latin1.txt", tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.xlsx").exists()
    predict_file(predictor, source, tmp_path / "out.parquet", text_column="message")
    assert len(pd.read_parquet(tmp_path / "out.parquet")) == len(rows)


def test_the_predict_command_writes_a_file_and_says_so(served, rows, tmp_path):
    _, home = served
    source, out = tmp_path / "in.jsonl", tmp_path / "out.csv"
    write_input(rows, source)
    runner = CliRunner()
    done = runner.invoke(
        cli,
        [
            "predict",
            "-m",
            "toy",
            "--input",
            str(source),
            "--output",
            str(out),
            "--runtime",
            "torch",
            f"registry.home={home}",
        ],
    )
    assert done.exit_code == 0 and f"wrote {len(rows)} predictions to {out}" in done.output, done.output
    refused = runner.invoke(cli, ["predict", "-m", "toy", "some text", "--output", str(out), f"registry.home={home}"])
    assert refused.exit_code == 1 and "give it --input FILE and no texts" in refused.output


@pytest.mark.faults
def test_a_run_killed_outright_resumes_to_the_same_output(served, tmp_path):
    """SIGKILL mid-file (no clean-up runs), then the same command again: the output is what one run gives."""
    _, home = served
    big = pd.DataFrame(toy_rows(per_label=20, seed=9))[["text"]].sample(30_000, replace=True, random_state=1)
    source = tmp_path / "big.parquet"
    big.to_parquet(source, index=False)
    command = [
        *(sys.executable, "-m", "tuneloop", "predict", "-m", "toy", "--input", str(source)),
        *("--chunk-rows", "500", "--runtime", "torch", f"registry.home={home}"),
    ]
    parts = tmp_path / "killed.parquet.parts"
    process = subprocess.Popen([*command, "--output", str(tmp_path / "killed.parquet")], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed: make the file larger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed.parquet").exists()
    finished = subprocess.run([*command, "--output", str(tmp_path / "killed.parquet")], capture_output=True, text=True)
    assert finished.returncode == 0 and "chunks from an interrupted run" in finished.stdout, finished.stdout
    subprocess.run([*command, "--output", str(tmp_path / "whole.parquet")], check=True, capture_output=True)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "killed.parquet"), pd.read_parquet(tmp_path / "whole.parquet")
    )


def test_a_csv_of_predictions_shows_formulas_as_text(predictor, tmp_path):
    """tuneloop predict -o out.csv is opened in a spreadsheet: a text starting with = must not run there (L1)."""
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["=1+2", "@SUM(A1)", "where is my parcel"]}).to_csv(source, index=False)
    predict_file(predictor, source, tmp_path / "out.csv")
    texts = pd.read_csv(tmp_path / "out.csv")["text"].tolist()
    assert texts == ["'=1+2", "'@SUM(A1)", "where is my parcel"]


def test_the_output_file_holds_the_texts_masked_as_privacy_mask_says(served, tmp_path):
    """Review finding L5: tuneloop predict -o copied users' texts, personal data and all, into a file people pass
    on, whatever privacy.mask said; now masked (after predicting) as the version's training data was."""
    _, home = served
    source = tmp_path / "in.csv"
    said = "refund to card 4111 1111 1111 1111, mail jane@example.com"
    pd.DataFrame({"ticket": ["T1"], "text": [said]}).to_csv(source, index=False)
    runner, base = (
        CliRunner(),
        ["predict", "-m", "toy", "-i", str(source), "--runtime", "torch", f"registry.home={home}"],
    )
    masked = runner.invoke(cli, [*base, "-o", str(tmp_path / "masked.csv")])
    kept = runner.invoke(cli, [*base, "-o", str(tmp_path / "kept.csv"), "privacy.mask=[]"])
    assert masked.exit_code == kept.exit_code == 0, masked.output + kept.output
    assert pd.read_csv(tmp_path / "masked.csv")["text"].tolist() == ["refund to card [CARD], mail [EMAIL]"]
    assert pd.read_csv(tmp_path / "kept.csv")["text"].tolist() == [said]
    assert (
        pd.read_csv(tmp_path / "masked.csv")["label"].tolist() == pd.read_csv(tmp_path / "kept.csv")["label"].tolist()
    )
