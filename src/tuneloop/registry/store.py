"""Registry of model versions: SQLAlchemy rows index self-describing artifact folders.

A version is registered in two atomic steps: the artifact folder is copied under a temporary name and
renamed into place, then the database row is committed. A crash between the two leaves a folder with no
row, which the next registration of that version number removes; it never leaves a row without files.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tuneloop.config import RegistryConfig
from tuneloop.db import open_database
from tuneloop.db.schema import ModelVersion, StageChange, utc_now
from tuneloop.errors import Conflict, NotFound, TuneloopError
from tuneloop.registry.folder import VersionFolder

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(@(?P<which>v?\d+|production|latest))?$")


class Registry:
    """Register, find, promote and archive model versions.

    Cheap to make: the database is opened on first use, so a command that only needs the home (to find a
    packaged model) never creates one.
    """

    def __init__(self, config: RegistryConfig) -> None:
        self.home = Path(config.home)
        self.database_url = config.resolved_database_url()

    @functools.cached_property
    def engine(self) -> Engine:
        self.home.mkdir(parents=True, exist_ok=True)
        return open_database(self.database_url)

    @functools.cached_property
    def _sessions(self) -> sessionmaker[Session]:
        return sessionmaker(self.engine, expire_on_commit=False)

    def folder(self, version: ModelVersion) -> VersionFolder:
        """The version's files: model, frozen data, resolved config, reports."""
        return VersionFolder(self.home / version.artifact_dir)

    def register(
        self,
        name: str,
        run: VersionFolder,
        *,
        base_model: str,
        data_fingerprint: str,
        config: dict[str, Any],
        metrics: dict[str, Any],
        parent: str | None = None,
    ) -> ModelVersion:
        """Copy the run's folder into the store (without its checkpoints) and add a candidate version; atomic
        as described above."""
        with self._sessions() as session:
            latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name)) or 0
        number = latest + 1
        relative = Path("models") / name / f"v{number}"
        target = self.home / relative
        if target.exists():
            shutil.rmtree(target)  # left by a crash after the rename and before the commit: has no row
        staging = target.with_name(f".v{number}.{uuid.uuid4().hex}.tmp")
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(run.root, staging, ignore=shutil.ignore_patterns(*VersionFolder.NOT_REGISTERED))
            staging.rename(target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise TuneloopError(f"cannot store artifacts of {name} v{number} in {target}: {exc}") from exc
        row = ModelVersion(
            name=name,
            version=number,
            stage="candidate",
            base_model=base_model,
            data_fingerprint=data_fingerprint,
            config=config,
            metrics=metrics,
            parent=parent,
            artifact_dir=relative.as_posix(),
            created_at=utc_now(),
        )
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except (IntegrityError, SQLAlchemyError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise TuneloopError(f"registering {name} v{number} failed, nothing was stored: {exc}") from exc
        return row

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Registered versions, by name then number; only `name`'s when given."""
        with self._sessions() as session:
            query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
            if name:
                query = query.where(ModelVersion.name == name)
            return list(session.scalars(query))

    def get(self, ref: str) -> ModelVersion:
        """Resolve NAME, NAME@3, NAME@v3, NAME@production or NAME@latest.

        A bare NAME means its production version, or the latest version if none is in production.
        """
        match = _REF.match(ref.strip())
        if not match:
            raise TuneloopError(f"'{ref}' is not a model reference; use NAME, NAME@VERSION or NAME@production")
        name, which = match["name"], match["which"]
        with self._sessions() as session:
            versions = list(
                session.scalars(select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.version))
            )
        if not versions:
            known = sorted({v.name for v in self.versions()})
            hint = f"; registered models: {', '.join(known)}" if known else "; none are registered yet (tuneloop train)"
            raise NotFound(f"no model named '{name}'{hint}")
        production = [v for v in versions if v.stage == "production"]
        if which in (None, "production"):
            if production:
                return production[0]
            if which == "production":
                raise NotFound(f"'{name}' has no production version; promote one: tuneloop models promote {name}@N")
            return versions[-1]
        if which == "latest":
            return versions[-1]
        number = int(which.lstrip("v"))
        for version in versions:
            if version.version == number:
                return version
        raise NotFound(f"'{name}' has no version {number}; versions: {', '.join(str(v.version) for v in versions)}")

    def promote(self, ref: str, reason: str = "manual") -> ModelVersion:
        """Make this version production; the previous production version is archived."""
        target = self.get(ref)
        with self._sessions.begin() as session:
            row = session.get_one(ModelVersion, target.id)
            previous = session.scalar(
                select(ModelVersion).where(ModelVersion.name == row.name, ModelVersion.stage == "production")
            )
            if previous is None or previous.id != row.id:
                if previous is not None:
                    previous.stage = "archived"
                row.stage = "production"
                row.promoted_at = utc_now()
                session.add(
                    StageChange(
                        name=row.name,
                        version=row.version,
                        kind="promote",
                        reason=reason,
                        at=utc_now(),
                        previous_version=previous.version if previous is not None else None,
                    )
                )
        return self.get(target.ref)

    def archive(self, ref: str) -> ModelVersion:
        target = self.get(ref)
        with self._sessions.begin() as session:
            session.get_one(ModelVersion, target.id).stage = "archived"
        return self.get(target.ref)

    def rollback(self, name: str, reason: str = "manual rollback") -> ModelVersion:
        """Put back the version that was production before the current one; repeatable, step by step."""
        current = self.get(f"{name}@production")
        with self._sessions.begin() as session:
            change = session.scalar(
                select(StageChange)
                .where(
                    StageChange.name == name,
                    StageChange.version == current.version,
                    StageChange.kind == "promote",
                    StageChange.undone.is_(False),
                )
                .order_by(StageChange.id.desc())
            )
            if change is None or change.previous_version is None:
                raise Conflict(f"{current.ref} has no earlier production version to roll back to")
            restored = session.scalars(
                select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == change.previous_version)
            ).one()
            session.get_one(ModelVersion, current.id).stage = "archived"
            restored.stage = "production"
            restored.promoted_at = utc_now()
            change.undone = True
            session.add(
                StageChange(
                    name=name,
                    version=restored.version,
                    previous_version=current.version,
                    kind="rollback",
                    reason=reason,
                    at=utc_now(),
                )
            )
        return self.get(f"{name}@{change.previous_version}")

    def history(self, name: str) -> list[StageChange]:
        """Production changes of a model, oldest first."""
        with self._sessions() as session:
            return list(session.scalars(select(StageChange).where(StageChange.name == name).order_by(StageChange.id)))


def describe(version: ModelVersion) -> dict[str, Any]:
    """A JSON-friendly view of a version for `models show`."""
    return {
        "name": version.name,
        "version": version.version,
        "stage": version.stage,
        "base_model": version.base_model,
        "data_fingerprint": version.data_fingerprint,
        "parent": version.parent,
        "created_at": version.created_at.isoformat(),
        "promoted_at": version.promoted_at.isoformat() if version.promoted_at else None,
        "artifact_dir": version.artifact_dir,
        "metrics": version.metrics,
        "config": version.config,
    }


def to_json(version: ModelVersion) -> str:
    return json.dumps(describe(version), indent=2, ensure_ascii=False)
