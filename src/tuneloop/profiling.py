"""Where the time goes: a torch.profiler window over training steps or served batches, for users.

`tuneloop train --profile` and `serve.profile=true` record the first steps (or batches) with
torch.profiler, write the trace where TensorBoard's profiler plugin and Perfetto (ui.perfetto.dev) open it,
and summarise it: the time of each stage (the `stage` blocks the loops mark) and the operators that took
the most time of their own. Outside a profiled window a `stage` block costs a few microseconds.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from torch.profiler import ProfilerActivity, profile, record_function

from tuneloop.atomic import atomic_file, write_text_atomically

log = logging.getLogger(__name__)

# The stages the training loop and the server mark, in the order they happen.
STAGES = ("tokenise", "data", "forward", "backward", "optimizer", "dp step")
PROFILE_FOLDER = "profile"  # in a run folder
TRACE_FILE = "trace.json"
SUMMARY_FILE = "summary.json"


def stage(name: str) -> AbstractContextManager[object]:
    """Mark a block as one of STAGES in a profile."""
    return record_function(name)


class OperatorTime(TypedDict):
    name: str
    self_cpu_ms: float
    calls: int


class SummaryJson(TypedDict):
    """A ProfileSummary as summary.json (and a training result) holds it."""

    steps: int
    wall_ms: float
    stages_ms: dict[str, float]
    top_operators: list[OperatorTime]


@dataclass(frozen=True)
class ProfileSummary:
    """Milliseconds per stage (and its share of the profiled wall time) and the top operators by self time."""

    steps: int
    wall_ms: float
    stages: dict[str, float]
    top_operators: list[tuple[str, float, int]]  # name, self CPU ms, calls

    def as_dict(self) -> SummaryJson:
        return {
            "steps": self.steps,
            "wall_ms": round(self.wall_ms, 1),
            "stages_ms": {k: round(v, 1) for k, v in self.stages.items()},
            "top_operators": [{"name": n, "self_cpu_ms": round(ms, 2), "calls": c} for n, ms, c in self.top_operators],
        }

    @classmethod
    def from_dict(cls, data: SummaryJson) -> ProfileSummary:
        return cls(
            steps=data["steps"],
            wall_ms=data["wall_ms"],
            stages=data["stages_ms"],
            top_operators=[(o["name"], o["self_cpu_ms"], o["calls"]) for o in data["top_operators"]],
        )

    def lines(self) -> list[str]:
        out = [f"profiled {self.steps} steps, {self.wall_ms:.0f} ms:"]
        for name, ms in self.stages.items():
            out.append(f"  {name:<10} {ms:9.1f} ms  {ms / max(self.wall_ms, 1e-9):6.1%}")
        out.append("top operators by their own time:")
        for name, ms, calls in self.top_operators:
            out.append(f"  {name[:48]:<48} {ms:9.1f} ms  {calls:6d} calls")
        return out


class Profiler:
    """Records from `start()` for `steps` calls of `step()`, then writes `folder`/trace.json and
    summary.json and logs the summary; `finish()` does the same early (a run shorter than the window)."""

    def __init__(self, folder: Path, steps: int, top: int = 10) -> None:
        self.folder, self.steps, self.top = folder, steps, top
        self.done = 0
        self.summary: ProfileSummary | None = None
        self._profile: profile | None = None
        self._started = 0.0

    @property
    def active(self) -> bool:
        return self._profile is not None

    def start(self) -> None:
        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.start()
        self._started = time.perf_counter()

    def step(self) -> None:
        if self._profile is None:
            return
        self.done += 1
        if self.done >= self.steps:
            self.finish()

    def finish(self) -> ProfileSummary | None:
        if self._profile is None:
            return self.summary
        wall_ms = (time.perf_counter() - self._started) * 1000
        self._profile.stop()
        events = self._profile.key_averages()
        stages = {e.key: e.cpu_time_total / 1000 for e in events if e.key in STAGES}
        operators = sorted(
            (e for e in events if e.key not in STAGES and not e.key.startswith("ProfilerStep")),
            key=lambda e: e.self_cpu_time_total,
            reverse=True,
        )
        self.summary = ProfileSummary(
            steps=self.done,
            wall_ms=wall_ms,
            stages={name: stages[name] for name in STAGES if name in stages},
            top_operators=[(e.key, e.self_cpu_time_total / 1000, e.count) for e in operators[: self.top]],
        )
        with atomic_file(self.folder / TRACE_FILE) as staging:  # a kill mid-write leaves no half trace
            self._profile.export_chrome_trace(str(staging))
        write_text_atomically(self.folder / SUMMARY_FILE, json.dumps(self.summary.as_dict(), indent=2))
        self._profile = None
        log.info("profile written to %s\n%s", self.folder, "\n".join(self.summary.lines()))
        return self.summary
