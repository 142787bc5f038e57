"""Write HWU64's train.csv and test.csv (columns text,label) for the benchmarks, from the public repository.

    git clone https://github.com/xliuhw/NLU-Evaluation-Data SOURCE    (or a bare copy of it)
    python bench/prepare_hwu64.py SOURCE DATASETS/hwu64
    TUNELOOP_DATASETS=DATASETS python bench/assistant_eval.py --dataset hwu64

HWU64 (Liu et al. 2019, "Benchmarking Natural Language Understanding Services for building Conversational
Agents", arXiv:1903.05566; CC BY 4.0): 64 intents of a home assistant over 21 scenarios. The split is the
repository's first cross-validation fold (CrossValidation/autoGeneFromRealAnno/*/KFold_1: trainset/*.csv and
testset/csv/*.csv, ';'-separated); the text is `answer_from_anno` (the annotated utterance without its entity
marks), the label `scenario_intent`. Files are read in name order, rows in file order, so the same source gives
byte-identical CSVs (bench/_common.py's trained_once reuses a model only for the same rows). SOURCE may be a
checkout or a bare git directory (read at HEAD). The output folder must lie outside this repository: the
benchmark datasets are never copied into it.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FOLD = "CrossValidation/autoGeneFromRealAnno/"
SPLITS = {"train": "/KFold_1/trainset/", "test": "/KFold_1/testset/csv/"}


class Source:
    """The repository's files, from a checkout or from a bare git directory at HEAD."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bare = not (path / "CrossValidation").is_dir()
        if self.bare and not (path / "HEAD").is_file():
            raise SystemExit(f"{path} is neither a checkout of NLU-Evaluation-Data nor a bare git directory of it")

    def names(self) -> list[str]:
        if self.bare:
            listing = self.git("ls-tree", "-r", "--name-only", "HEAD", "--", FOLD)
            return sorted(listing.decode().splitlines())
        return sorted(str(p.relative_to(self.path)) for p in (self.path / FOLD).rglob("*.csv"))

    def read(self, name: str) -> bytes:
        return self.git("show", f"HEAD:{name}") if self.bare else (self.path / name).read_bytes()

    def git(self, *args: str) -> bytes:
        return subprocess.run(["git", "--git-dir", str(self.path), *args], check=True, capture_output=True).stdout


def split_rows(source: Source, part: str) -> pd.DataFrame:
    """One split: every intent's file of the first fold, concatenated."""
    files = [name for name in source.names() if part in name and name.endswith(".csv")]
    if not files:
        raise SystemExit(f"no {part.strip('/')} files under {FOLD} in {source.path}")
    frames = [pd.read_csv(io.BytesIO(source.read(name)), sep=";", dtype=str) for name in files]
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.dropna(subset=["answer_from_anno", "scenario", "intent"])
    labels = rows["scenario"] + "_" + rows["intent"]
    return pd.DataFrame({"text": rows["answer_from_anno"].str.strip(), "label": labels})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="A checkout (or bare git directory) of xliuhw/NLU-Evaluation-Data.")
    parser.add_argument("out", type=Path, help="Folder to write train.csv and test.csv to (outside the repository).")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.is_relative_to(ROOT):
        raise SystemExit(f"{out} is inside the repository: write it elsewhere, TUNELOOP_DATASETS naming its parent")
    source = Source(args.source)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in SPLITS.items():
        rows = split_rows(source, part)
        rows.to_csv(out / f"{split}.csv", index=False)
        print(f"{out / f'{split}.csv'}: {len(rows)} rows, {rows['label'].nunique()} intents", file=sys.stderr)


if __name__ == "__main__":
    main()
