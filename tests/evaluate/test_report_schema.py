"""The typed report: what training writes reads back as the same report, and reports written by other tuneloop
versions (older ones without newer fields, newer ones with fields this one does not know) still load."""

from __future__ import annotations

import json

import pytest

from tuneloop.errors import TuneloopError
from tuneloop.evaluate.report import render_html
from tuneloop.evaluate.schema import ClassifierReport, read_report


def test_a_written_report_reads_back_as_the_same_report(production_home):
    written = next((production_home / "home").rglob("report.json"))
    report = read_report(written)
    assert isinstance(report, ClassifierReport) and report.test.n > 0
    assert json.loads(report.to_json()) == json.loads(written.read_text())


def test_reports_of_other_versions_load_and_render(production_home, tmp_path):
    stored = json.loads(next((production_home / "home").rglob("report.json")).read_text())
    for dropped in ("device", "calibration", "outlier_exposure"):  # fields an older tuneloop did not write
        stored.pop(dropped, None)
    stored["test"].pop("label_suspects")
    stored["test"]["per_class"][0]["a_newer_figure"] = 1.5  # and one a newer tuneloop might add
    (tmp_path / "report.json").write_text(json.dumps(stored))
    report = read_report(tmp_path / "report.json")
    assert report.device is None and report.test.label_suspects is None
    assert report.test.per_class[0].model_extra == {"a_newer_figure": 1.5}
    assert "Possible label errors" not in render_html(report) and report.title in render_html(report)


@pytest.mark.parametrize("content", ["not json", json.dumps({"title": "x"}), json.dumps([1, 2])])
def test_a_file_that_is_not_a_report_is_one_clear_error(tmp_path, content):
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(TuneloopError, match="is not a tuneloop report"):
        read_report(tmp_path / "report.json")
