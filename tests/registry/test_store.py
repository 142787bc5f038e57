from __future__ import annotations

import pytest
from sqlalchemy.exc import SQLAlchemyError

from tuneloop.config import RegistryConfig
from tuneloop.errors import TuneloopError
from tuneloop.registry import Registry, VersionFolder


@pytest.fixture()
def registry(tmp_path):
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


def test_folder_left_by_a_crash_is_replaced(registry, artifacts):
    orphan = registry.home / "models" / "intent" / "v1"
    orphan.mkdir(parents=True)
    (orphan / "half-written").write_text("x")
    version = register(registry, artifacts)
    assert version.version == 1
    assert not (registry.folder(version).root / "half-written").exists()


def test_failed_copy_leaves_nothing(registry, tmp_path):
    with pytest.raises(TuneloopError, match="cannot store artifacts"):
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
