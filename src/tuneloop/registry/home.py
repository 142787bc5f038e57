"""The tuneloop home's layout: where runs, registered versions, packaged models converted once, assistants,
jobs, profiles and monitoring reports live in it. Every module asks here, so the layout has one owner and no
two kinds of thing share a folder (a model registered under a packaged encoder's name once landed inside the
converted encoder's folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def runs(self) -> Path:
        """Training runs, one folder each (what --resume continues; registered ones are pruned)."""
        return self.root / "runs"

    def versions(self, name: str) -> Path:
        """The registered versions of model `name`, one folder each (vN)."""
        return self.root / "models" / name

    def packaged(self, name: str) -> Path:
        """A packaged model (the e5 encoder, SmolLM2) converted once into a plain Hugging Face folder: apart from
        the registered versions, whatever they are named."""
        return self.root / "packaged" / name

    def assistant(self, name: str) -> Path:
        """An assistant's own files (its FAQ index, its tuned boundary)."""
        return self.root / "assistants" / name

    @property
    def jobs(self) -> Path:
        """The server's background jobs (retrain, gate) and their logs."""
        return self.root / "jobs"

    @property
    def profiles(self) -> Path:
        """Serving profiles (serve.profile)."""
        return self.root / "profiles"

    def monitoring(self, name: str) -> Path:
        """Drift reports of model `name` (tuneloop monitor)."""
        return self.root / "monitoring" / name
