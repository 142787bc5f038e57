"""Plain helpers the tests share (fixtures live in conftest.py): toy data, fast recipes and server settings
on the tiny models, where the benchmark datasets are."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

# The benchmark datasets (never copied into the repository): TUNELOOP_DATASETS, or ../shared/datasets beside it.
DATASETS = Path(os.environ.get("TUNELOOP_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))

TOPICS = {
    "refund": ["refund", "money", "back", "return", "charge", "reimburse"],
    "delivery": ["parcel", "delivery", "arrive", "courier", "shipping", "late"],
    "password": ["password", "login", "reset", "account", "locked", "sign"],
}
FILLER = ["please", "my", "the", "i", "need", "help", "with", "when", "is", "can", "you", "why", "order"]
MOODS = {
    "negative": ["angry", "terrible", "worst", "awful", "hate", "useless"],
    "neutral": ["question", "how", "info", "check", "about", "status"],
    "positive": ["thanks", "great", "love", "awesome", "happy", "perfect"],
}


def toy_rows(per_label: int = 16, seed: int = 0, topics: dict[str, list[str]] = TOPICS) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, words in topics.items():
        seen = set()
        while len(seen) < per_label:
            text = " ".join(rng.sample(words, 2) + rng.sample(FILLER, 3))
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


TOY_PAIRS = [
    ("how long does a refund take", "refunds take five days"),
    ("where is my parcel", "your parcel is with the courier"),
    ("how do i reset my password", "use the reset link on the login page"),
    ("can i cancel my order", "yes before it ships"),
]


def tiny_config(tiny_encoder: Path, data: Path, home: Path, *extra: str):
    """A classifier recipe that trains in seconds on the tiny encoder."""
    from tuneloop.config import load_config

    return load_config(
        None,
        [
            f"model.name={tiny_encoder}",
            f"data.path={data}",
            f"registry.home={home}",
            "name=toy",
            "train.epochs=6",
            "train.few_shot.mode=off",  # the loop, as the tests of what trains on it expect
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.head_lr=1e-2",
            "model.max_length=32",
            "train.threads=1",
            "train.patience=10",
            "serving.runtime=torch",  # ONNX export and the int8 check have tests of their own
            *extra,
        ],
    )


def server_settings(home: Path, *extra: str):
    """Server settings over `home` that batch, swap and log quickly (tests wait on all three)."""
    from tuneloop.config import ServerSettings, load_config

    return load_config(
        None,
        [
            f"registry.home={home}",
            "serve.max_wait_ms=2",
            "serve.reload_poll_seconds=0.2",
            "serve.log_flush_ms=20",
            # TestClient's requests name the host "testserver"; live servers are reached at 127.0.0.1.
            'serve.allowed_hosts=["testserver", "127.0.0.1", "localhost"]',
            *extra,
        ],
        ServerSettings,
    )


POSTGRES_URL = os.environ.get("TUNELOOP_TEST_DATABASE_URL")
NO_POSTGRES = (
    "set TUNELOOP_TEST_DATABASE_URL to a PostgreSQL database (.ci/run starts one; make postgres does it locally)"
)


def copy_rows(source_url: str, target_url: str) -> None:
    """Every row of a tuneloop database into another (built by the migrations on open), ids included."""
    from sqlalchemy import Integer, create_engine, func, select, text

    from tuneloop.db import Base, open_database

    source, target = create_engine(source_url), open_database(target_url)
    with source.connect() as reading, target.begin() as writing:
        for table in Base.metadata.sorted_tables:
            rows = [dict(row._mapping) for row in reading.execute(select(table))]
            if rows:
                writing.execute(table.insert(), rows)
            if target.dialect.name == "postgresql" and "id" in table.c and isinstance(table.c.id.type, Integer):
                top = writing.execute(select(func.max(table.c.id))).scalar()
                if top:  # explicit ids do not move PostgreSQL's sequence: the next insert would collide
                    writing.execute(text(f"select setval(pg_get_serial_sequence('{table.name}', 'id'), {top})"))
    source.dispose()


class Crash(Exception):
    """Raised from a step callback to stand for a process killed in the middle of training."""


def crashed_then_resumed(config, data, encoder, folder: Path, at_step: int):
    """Train into `folder` until step `at_step` "crashes" it, then resume from its checkpoint: the resumed
    run's result."""
    import pytest

    from tuneloop.registry import VersionFolder
    from tuneloop.training.classification import fine_tune

    def crash(state, model, tokenizer):
        if state.global_step == at_step:
            raise Crash

    with pytest.raises(Crash):
        fine_tune(
            config, data, encoder, VersionFolder(folder), show_progress=False, step_callback=crash, callback_every=1
        )
    return fine_tune(config, data, encoder, VersionFolder(folder), resume=True, show_progress=False)


TORCHRUN = Path(sys.executable).with_name("torchrun")


def launch(processes: int, arguments: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`tuneloop ARGUMENTS` in one plain process, or under torchrun with `processes` gloo processes."""
    command = (
        [str(TORCHRUN), "--standalone", "--nproc-per-node", str(processes), "-m", "tuneloop"]
        if processes > 1
        else [sys.executable, "-m", "tuneloop"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELOOP_HOME": str(tmp_path / "unused-home")}
    return subprocess.run([*command, *arguments], capture_output=True, text=True, env=env, timeout=600)


def drop_test_database(admin, name: str) -> None:
    """Drop a test's PostgreSQL database, its connections with it. A fresh database draws an autovacuum worker,
    which runs as the server's superuser and which our user may not terminate: FORCE then fails until the
    worker is done (a second or so), so try again for up to 30 s."""
    from sqlalchemy import text
    from sqlalchemy.exc import ProgrammingError

    deadline = time.monotonic() + 30
    while True:
        try:
            with admin.connect() as connection:
                connection.execute(text(f"drop database {name} with (force)"))
            return
        except ProgrammingError as exc:
            if "pg_signal_backend" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
