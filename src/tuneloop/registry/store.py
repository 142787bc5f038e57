"""Registry of model versions: SQLAlchemy rows index self-describing artifact folders.

A version is registered in two atomic steps: the artifact folder is copied under a temporary name and
renamed into place, then the database row is committed. A crash between the two leaves a folder with no
row, which the next registration of that version number removes; it never leaves a row without files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Engine, Update, exists, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, aliased, sessionmaker

from tuneloop.atomic import fsync_directory, fsync_tree
from tuneloop.config import RegistryConfig
from tuneloop.db import open_database
from tuneloop.db.schema import ModelVersion, StageChange, utc_now
from tuneloop.errors import Conflict, NotFound, TuneloopError, first_line
from tuneloop.registry.folder import VersionFolder
from tuneloop.registry.home import Home

# `promote(replacing=CURRENT)`: replace whatever is production when the call starts.
CURRENT = object()


def _no_production(name: str) -> ColumnElement[bool]:
    """No version of `name` is production (over an alias: inside an UPDATE of the same table, a bare subquery
    would correlate to the row being updated)."""
    other = aliased(ModelVersion)
    return ~exists().where(other.name == name, other.stage == "production")


def _rows_changed(session: Session, statement: Update) -> int:
    return cast(CursorResult[Any], session.execute(statement)).rowcount


class _ProductionMoved(Exception):
    """Inside a stage change: the production version is not the one the change was computed from."""


class _NothingToRestore(Exception):
    """Inside a rollback: the current production version replaced nothing."""


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
        """Copy the run's folder into the store (without its checkpoints) and add a candidate version.

        The copy is written and synced under a private name first; the version number is then claimed by
        renaming it to `vN`, which fails when another process holds that number (its folder is there), so two
        registrations of one name at once get two numbers and two complete folders. No folder this call did
        not create is ever removed: one left by a crash between rename and commit keeps its number unused.
        """
        models = Home(self.home).versions(name)
        models.mkdir(parents=True, exist_ok=True)
        staging = models / f".v-{uuid.uuid4().hex}.tmp"
        try:
            try:
                shutil.copytree(run.root, staging, ignore=shutil.ignore_patterns(*VersionFolder.NOT_REGISTERED))
                fsync_tree(staging)  # the files are on disk before a row can point at them
                number = self._claim_number(name, staging)
            except OSError as exc:
                raise TuneloopError(
                    f"cannot store the artifacts of {name} in {models}: {exc}; nothing was registered"
                ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        target = models / f"v{number}"
        row = ModelVersion(
            name=name,
            version=number,
            stage="candidate",
            base_model=base_model,
            data_fingerprint=data_fingerprint,
            config=config,
            metrics=metrics,
            parent=parent,
            artifact_dir=target.relative_to(self.home).as_posix(),
            created_at=utc_now(),
        )
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except SQLAlchemyError as exc:
            # The commit may have happened with only its answer lost (a connection dropped): then the row
            # points at the folder, which must stay.
            with contextlib.suppress(SQLAlchemyError), self._sessions() as session:
                stored = session.scalar(
                    select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == number)
                )
                if stored is not None:
                    return stored
            shutil.rmtree(target, ignore_errors=True)  # this call's own folder
            raise TuneloopError(f"registering {name} v{number} failed, nothing was stored: {first_line(exc)}") from exc
        return row

    def _claim_number(self, name: str, staging: Path) -> int:
        """The first number above the registered ones whose folder this process could rename `staging` to."""
        with self._sessions() as session:
            number = (session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name)) or 0) + 1
        while True:
            target = staging.parent / f"v{number}"
            try:
                os.rename(staging, target)  # atomic, and refused when `target` is a folder with files in it
            except OSError:
                if not target.exists():
                    raise
                number += 1
                continue
            fsync_directory(staging.parent)
            return number

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

    def promote(self, ref: str, reason: str = "manual", *, replacing: int | None | object = CURRENT) -> ModelVersion:
        """Make a version production; the one it replaces is archived, in the same transaction.

        A compare-and-swap: it replaces the production version this call saw when it started, or `replacing`
        (the version number a caller such as the gate judged against; None for "no production version"),
        and refuses with Conflict when production changed in between. The database itself holds at most one
        production version per name, whatever runs at once.
        """
        target = self.get(ref)
        expected = self._production_number(target.name) if replacing is CURRENT else replacing
        if expected == target.version:
            return target
        now = utc_now()
        try:
            with self._sessions.begin() as session:
                # The first statement writes, so SQLite takes its write lock here instead of failing to upgrade a
                # read transaction that another writer (the prediction log) overtook.
                if expected is None:
                    taken = _rows_changed(
                        session,
                        update(ModelVersion)
                        .where(
                            ModelVersion.id == target.id,
                            _no_production(target.name),
                        )
                        .values(stage="production", promoted_at=now),
                    )
                else:
                    archived = _rows_changed(
                        session,
                        update(ModelVersion)
                        .where(
                            ModelVersion.name == target.name,
                            ModelVersion.stage == "production",
                            ModelVersion.version == expected,
                        )
                        .values(stage="archived"),
                    )
                    if archived != 1:  # the expected version is no longer production (replaced, or archived)
                        raise _ProductionMoved
                    taken = _rows_changed(
                        session,
                        update(ModelVersion)
                        .where(
                            ModelVersion.id == target.id,
                            _no_production(target.name),
                        )
                        .values(stage="production", promoted_at=now),
                    )
                if taken != 1:
                    raise _ProductionMoved
                session.add(
                    StageChange(
                        name=target.name,
                        version=target.version,
                        previous_version=expected,
                        kind="promote",
                        reason=reason,
                        at=now,
                    )
                )
        except (_ProductionMoved, IntegrityError) as exc:
            seen = f"v{expected}" if expected is not None else "none"
            raise Conflict(
                f"production of {target.name} changed while {target.ref} was being promoted (expected "
                f"{seen}, now {self._production_text(target.name)}); nothing changed"
            ) from exc
        return self.get(target.ref)

    def archive(self, ref: str) -> ModelVersion:
        target = self.get(ref)
        with self._sessions.begin() as session:
            session.execute(update(ModelVersion).where(ModelVersion.id == target.id).values(stage="archived"))
        return self.get(target.ref)

    def rollback(self, name: str, reason: str = "manual rollback") -> ModelVersion:
        """Put back the version that was production before the current one; repeatable, step by step. Like
        promote, a compare-and-swap on the production version this call saw."""
        current = self.get(f"{name}@production")
        now = utc_now()
        try:
            with self._sessions.begin() as session:
                archived = _rows_changed(
                    session,
                    update(ModelVersion)
                    .where(ModelVersion.id == current.id, ModelVersion.stage == "production")
                    .values(stage="archived"),
                )
                if archived != 1:
                    raise _ProductionMoved
                change = _last_promotion(session, current)
                if change is None or change.previous_version is None:
                    raise _NothingToRestore
                session.execute(
                    update(ModelVersion)
                    .where(ModelVersion.name == name, ModelVersion.version == change.previous_version)
                    .values(stage="production", promoted_at=now)
                )
                change.undone = True
                restored = change.previous_version
                session.add(
                    StageChange(
                        name=name,
                        version=restored,
                        previous_version=current.version,
                        kind="rollback",
                        reason=reason,
                        at=now,
                    )
                )
        except _NothingToRestore:
            raise Conflict(f"{current.ref} has no earlier production version to roll back to") from None
        except (_ProductionMoved, IntegrityError) as exc:
            raise Conflict(
                f"production of {name} changed while rolling back from {current.ref} (now "
                f"{self._production_text(name)}); nothing changed"
            ) from exc
        return self.get(f"{name}@{restored}")

    def previous_production(self, name: str) -> ModelVersion:
        """The version a rollback of `name` would put back."""
        current = self.get(f"{name}@production")
        with self._sessions() as session:
            change = _last_promotion(session, current)
        if change is None or change.previous_version is None:
            raise Conflict(f"{current.ref} has no earlier production version to roll back to")
        return self.get(f"{name}@{change.previous_version}")

    def _production_number(self, name: str) -> int | None:
        with self._sessions() as session:
            return session.scalar(
                select(ModelVersion.version).where(ModelVersion.name == name, ModelVersion.stage == "production")
            )

    def _production_text(self, name: str) -> str:
        number = self._production_number(name)
        return "none" if number is None else f"v{number}"

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


def _last_promotion(session: Session, production: ModelVersion) -> StageChange | None:
    """The promotion that made `production` production and has not been rolled back: it names the version
    a rollback restores."""
    return session.scalar(
        select(StageChange)
        .where(
            StageChange.name == production.name,
            StageChange.version == production.version,
            StageChange.kind == "promote",
            StageChange.undone.is_(False),
        )
        .order_by(StageChange.id.desc())
    )
