"""The on-disk layout of a training run, which registration copies whole as the version's folder.

Every module that reads or writes a run or a version goes through these names, so the layout has one owner
and a folder stays self-describing: the model, the exact data it was trained on, the resolved recipe, the
reports, the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VersionFolder:
    """A run folder (under the home's runs/) or a registered version's folder (under models/NAME/vN)."""

    root: Path

    # Parts of a run that registration leaves behind: resumable state, k-fold models, interrupted writes.
    NOT_REGISTERED = ("checkpoint", "fold-*", "*.tmp", "*.old", "registered-as.txt")

    @property
    def model(self) -> Path:
        """The trained model: a classifier, an encoder (pretrain) or a causal LM (sft)."""
        return self.root / "model"

    def data(self, task: str | None = None) -> Path:
        """The frozen splits: data/ for the model's own task, data-<task>/ for a multi-task model's others."""
        return self.root / ("data" if task is None else f"data-{task}")

    @property
    def config(self) -> Path:
        """The resolved recipe the run was started with."""
        return self.root / "config.yaml"

    @property
    def encoder(self) -> Path:
        """Which encoder the run started from and the prefix its inputs need (JSON)."""
        return self.root / "encoder.json"

    @property
    def serving(self) -> Path:
        """Which runtime the version serves with and why (JSON): built and checked at the end of training."""
        return self.root / "serving.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def metrics(self) -> Path:
        """One JSON line per scoring point of the training run."""
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoint"

    @property
    def registered_as(self) -> Path:
        """Written in a run folder once the run is registered: the NAME@VERSION it became."""
        return self.root / "registered-as.txt"

    @property
    def gate(self) -> Path:
        """The promotion gate's report on this candidate."""
        return self.root / "gate"

    @property
    def cross_validation(self) -> Path:
        return self.root / "cross_validation.json"

    @property
    def tokenizer(self) -> Path:
        """The tokenizer a from-scratch pretraining run trained on its corpus."""
        return self.root / "tokenizer"

    @property
    def corpus(self) -> Path:
        """What an MLM pretraining run read (text and block counts, vocabulary)."""
        return self.root / "corpus.json"

    def fold(self, index: int) -> VersionFolder:
        """The run folder of one k-fold cross-validation fold."""
        return VersionFolder(self.root / f"fold-{index}")

    def evaluation(self, data: Path | None = None) -> Path:
        """Where `tuneloop eval` writes a report: eval/ for the frozen test split, eval-<file>/ for a file."""
        return self.root / ("eval" if data is None else f"eval-{Path(data).stem}")
