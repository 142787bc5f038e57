"""The reply model's worker process: the same words as in this process, a reader that leaves, a worker killed."""

from __future__ import annotations

import os
import signal

import pytest

from tuneloop.errors import TuneloopError
from tuneloop.models.lm import GenerationSettings, ReplyModel
from tuneloop.models.reply_worker import ReplyWorker

ASK = [{"role": "user", "content": "where is my parcel"}]
SETTINGS = GenerationSettings(max_new_tokens=6)


def test_the_worker_writes_what_the_model_writes_in_this_process_and_outlives_readers_and_kills(tiny_lm):
    here = "".join(ReplyModel(tiny_lm).stream(ASK, SETTINGS))
    worker = ReplyWorker(tiny_lm)
    try:
        assert worker.process.pid != os.getpid() and "".join(worker.stream(ASK, SETTINGS)) == here
        leaving = worker.stream(ASK, GenerationSettings(max_new_tokens=50))
        next(leaving)
        leaving.close()  # a client that hung up mid-reply: the worker drops it and goes on to the next reply
        assert "".join(worker.stream(ASK, SETTINGS)) == here
        killed = worker.process
        os.kill(killed.pid, signal.SIGKILL)
        killed.join()
        assert "".join(worker.stream(ASK, SETTINGS)) == here  # the next reply starts a new worker
        assert worker.process.pid != killed.pid
    finally:
        worker.close()
    assert worker.process.exitcode == 0  # stopped, not killed


def test_a_model_the_worker_cannot_load_fails_at_start_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TuneloopError, match="could not be loaded"):
        ReplyWorker(tmp_path)
