"""The front door: the README's results come from bench/results/, it stays short, and its links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_results_table_is_what_the_results_files_say():
    report = bench_report()
    text = README.read_text(encoding="utf-8")
    assert report.START in text and report.END in text
    assert text == report.rendered_readme(text), "run: python bench/report.py --readme"


def test_a_hand_edited_figure_is_caught(tmp_path):
    report = bench_report()
    text = README.read_text(encoding="utf-8")
    tampered = text.replace(report.END, "| edited by hand | 99.99% |\n" + report.END)
    assert tampered != report.rendered_readme(tampered)


def test_the_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 12 * 1024
    assert len(bench_report().HEADLINES) <= 5  # a headline table, not the benchmarks page
    assert text.splitlines()[3:5] == [
        "make demo    # fresh machine with Python 3.11: creates .venv, installs CPU torch + tuneloop, runs the demo",
        "make test    # the same set-up, then every test tier; the browser and PostgreSQL tiers need root (see below)",
    ]
    for word in ("this session", "this change", "the issue", "target"):
        assert word not in text.lower(), word


def test_every_local_link_and_image_in_the_readme_and_the_docs_exists():
    pages = [README, *(ROOT / "docs").rglob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}"


def test_every_figure_a_guide_cites_comes_from_a_results_file():
    report = bench_report()
    cited = [
        match.groups()
        for page in (ROOT / "docs").rglob("*.md")
        for match in re.finditer(r"\{\{ result ([\w.+-]+) ([\w.]+) (\w+) \}\}", page.read_text(encoding="utf-8"))
    ]
    assert cited
    for name, path, how in cited:
        assert report.figure(name, path, how).startswith("[")  # raises for a missing file or figure
    with pytest.raises(KeyError, match="no figure at"):
        report.figure(cited[0][0], "no.such.figure", "plain")
