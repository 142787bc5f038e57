"""Admin jobs (retrain, gate) started from the admin page: each a `tuneloop` subprocess.

A subprocess, not a thread: training holds the CPU and a lot of memory for minutes, and a crash there
must not take the server down. One job at a time, because two trainings on a small machine would only
slow each other and the server. Output goes to a log file in the home that the page can show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from tuneloop.errors import Conflict, TuneloopError

JobStatus = Literal["running", "succeeded", "rejected", "failed"]
# `tuneloop gate` exits with 3 when the candidate is rejected: a result, not a failure.
OUTCOMES: dict[int, JobStatus] = {0: "succeeded", 3: "rejected"}


@dataclass
class Job:
    id: str
    kind: str
    target: str
    log_path: Path
    started_at: datetime
    status: JobStatus = "running"
    exit_code: int | None = None
    finished_at: datetime | None = None

    def log_tail(self, tail: int = 4000) -> str:
        """The last `tail` characters of the job's output."""
        if not tail or not self.log_path.is_file():
            return ""
        with self.log_path.open("rb") as log_file:
            log_file.seek(max(0, log_file.seek(0, 2) - 4 * tail))  # utf-8: at most 4 bytes a character
            return log_file.read().decode("utf-8", errors="replace")[-tail:]


class JobRunner:
    def __init__(self, folder: Path, settings: dict[str, list[str]], environment: dict[str, str] | None = None) -> None:
        """`settings` are the dotted overrides each kind of job gets (where the registry is, the gate's
        thresholds); `environment` is added to every job's environment (secrets stay off the command line)."""
        self.folder = folder
        self.settings = settings
        self.environment = environment or {}
        self.jobs: dict[str, Job] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, target: str) -> Job:
        if kind not in self.settings:
            raise TuneloopError(f"unknown job '{kind}': retrain or gate")
        with self._lock:
            running = [j for j in self.jobs.values() if j.status == "running"]
            if running:
                raise Conflict(f"job {running[0].id} ({running[0].kind} {running[0].target}) is still running")
            job_id = uuid.uuid4().hex[:12]
            self.folder.mkdir(parents=True, exist_ok=True)
            job = Job(job_id, kind, target, self.folder / f"{job_id}.log", datetime.now(UTC))
            with job.log_path.open("w", encoding="utf-8") as out:
                process = subprocess.Popen(
                    # After "--" everything is an argument: a target can never be read as an option.
                    [sys.executable, "-m", "tuneloop", kind, "--", target, *self.settings[kind]],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.environment, "COLUMNS": "100", "NO_COLOR": "1"},
                )
            self.jobs[job_id] = job
            self._processes[job_id] = process
        threading.Thread(target=self._wait, args=(job, process), daemon=True, name=f"job-{job_id}").start()
        return job

    def _wait(self, job: Job, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        job.exit_code = code
        job.finished_at = datetime.now(UTC)
        job.status = OUTCOMES.get(code, "failed")

    def stop_all(self) -> None:
        for job_id, job in self.jobs.items():
            if job.status == "running":
                self._processes[job_id].terminate()
