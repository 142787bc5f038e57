"""A named lease held in the database, so that one thing at a time happens to a model across processes and
machines (a server's job, a cron job, an engineer's shell), on SQLite and PostgreSQL alike.

Taking it is an insert on the lease's name (the primary key decides, never a read before a write). The
holder renews it from a thread while it works; a holder killed outright stops renewing, and the lease is
free again once it expires, so nothing waits for a person to clean up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import UTC, datetime, timedelta
from types import TracebackType

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from tuneloop.db.schema import Lease, utc_now
from tuneloop.errors import Conflict

log = logging.getLogger(__name__)


def database_now(connection: Connection) -> datetime:
    """The time leases are judged by: PostgreSQL's clock, which every machine sharing it reads alike (their
    own clocks may disagree by more than a lease lives); SQLite's users are on one machine anyway."""
    if connection.dialect.name == "postgresql":
        now: datetime = connection.execute(select(func.now())).scalar_one()
        return now.astimezone(UTC)
    return utc_now()


class HeldLease:
    """`with HeldLease(engine, "retrain-gate:toy", "retrain toy"):` — Conflict when someone else holds it."""

    def __init__(self, engine: Engine, name: str, purpose: str, ttl_seconds: float = 60.0) -> None:
        self.engine = engine
        self.name = name
        self.purpose = purpose
        self.ttl = timedelta(seconds=ttl_seconds)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = False  # set when a renewal found the lease taken (this holder stalled past its expiry)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> HeldLease:
        with self.engine.begin() as connection:  # an expired lease is anyone's
            now = database_now(connection)
            connection.execute(delete(Lease).where(Lease.name == self.name, Lease.expires_at < now))
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    insert(Lease).values(
                        name=self.name,
                        holder=self.holder,
                        purpose=self.purpose,
                        acquired_at=now,
                        expires_at=now + self.ttl,
                    )
                )
        except IntegrityError:
            raise Conflict(self._held_by()) from None
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._renewer.start()
        return self

    def _held_by(self) -> str:
        with self.engine.connect() as connection:
            row = connection.execute(select(Lease).where(Lease.name == self.name)).first()
        if row is None:  # released between our insert and this read
            return f"{self.purpose}: someone else was doing the same a moment ago; try again"
        return (
            f"{self.purpose}: refused, '{row.purpose}' is running (holder {row.holder}, since "
            f"{row.acquired_at:%Y-%m-%d %H:%M:%S} UTC); wait for it to finish"
        )

    def _renew(self) -> None:
        interval = self.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                with self.engine.begin() as connection:
                    renewed = connection.execute(
                        update(Lease)
                        .where(Lease.name == self.name, Lease.holder == self.holder)
                        .values(expires_at=database_now(connection) + self.ttl)
                    ).rowcount
            except Exception as exc:  # the database is away for a moment: try again at the next interval
                log.warning("could not renew the lease %s: %s", self.name, exc)
                continue
            if not renewed:
                self.lost = True
                log.error("the lease %s expired and was taken by another holder while %s ran", self.name, self.purpose)
                return

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self.engine.begin() as connection:
            connection.execute(delete(Lease).where(Lease.name == self.name, Lease.holder == self.holder))


def model_job_lease(engine: Engine, model: str, purpose: str) -> HeldLease:
    """The lease that serialises retraining and gating of one model."""
    return HeldLease(engine, _model_jobs(model), purpose)


def _model_jobs(model: str) -> str:
    return f"model-jobs:{model}"


def model_job_running(engine: Engine, model: str) -> str | None:
    """What holds `model`'s job lease right now (purpose and holder), or None when it is free."""
    with engine.connect() as connection:
        row = connection.execute(
            select(Lease).where(Lease.name == _model_jobs(model), Lease.expires_at >= database_now(connection))
        ).first()
    return None if row is None else f"'{row.purpose}' (holder {row.holder})"
