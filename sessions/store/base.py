"""The data directory, its database connections, and transactions.

`StoreBase` holds the data directory and one `sqlite_utils.Database` per thread
(`threading.local()`); WAL mode lets the engine's thread write while the UI's threads read.
`transaction` and `snapshot` are the only ways in: the other parts of the store, and
`sessions.jobs` and `sessions.archive`, run their SQL inside them, with `session_row`,
`update_session` and `insert_event` for the rows every part touches.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from .. import paths
from ..schema import (
    SCHEMA_VERSION,
    NotFoundError,
    StoreError,
    connect,
    open_database,
    translate,
    writable,
)
from .tables import now, to_json

if TYPE_CHECKING:
    from sqlite_utils import Database

DEFAULT_STALE_AFTER_S = 120.0


def query_rows(db: Database, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """The rows of a query as dicts."""
    return list(db.query(sql, list(params)))


class StoreBase:
    """The data directory and its database: connections, transactions, and the helpers
    for the rows every part of the store touches (see `sessions.store.Store`)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ) -> None:
        self.data_dir = paths.resolve_data_dir(data_dir)
        self.db_path = self.data_dir / paths.DB_NAME
        self.stale_after_s = stale_after_s
        self.schema_version = SCHEMA_VERSION
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create the data directory {self.data_dir}: {exc}") from exc
        self._local = threading.local()
        self._open: weakref.WeakSet[Database] = weakref.WeakSet()
        self._files_lock = threading.RLock()
        self._closed = False
        self.read_only = self.db_path.exists() and not writable(self.db_path)
        self._remember(open_database(self.db_path, read_only=self.read_only))

    # -- connections -----------------------------------------------------------------------

    def _remember(self, db: Database) -> Database:
        self._local.db = db
        self._open.add(db)
        return db

    def _db(self) -> Database:
        """This thread's connection (opened on first use)."""
        if self._closed:
            raise StoreError("This Store is closed; open a new one.")
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = self._remember(connect(self.db_path, read_only=self.read_only))
            except sqlite3.Error as exc:
                raise translate(exc, "opening the session database") from exc
        return db

    def close(self) -> None:
        """Close every thread's connection; the Store cannot be used afterwards."""
        self._closed = True
        for db in list(self._open):
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._open = weakref.WeakSet()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, doing: str) -> Iterator[Database]:
        """One write transaction on this thread's connection, committed when the block
        ends and rolled back when it raises. BEGIN IMMEDIATE takes the write lock up front,
        so it never fails half-way on a lock upgrade. SQLite errors and `OSError`s become a
        `StoreError` whose message names `doing` ("importing a session")."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.rollback()
                raise
        except (sqlite3.Error, OSError) as exc:
            raise translate(exc, doing) from exc

    @contextlib.contextmanager
    def snapshot(self, doing: str) -> Iterator[Database]:
        """One read transaction: every query inside sees the same snapshot."""
        db = self._db()
        try:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.rollback()
        except sqlite3.Error as exc:
            raise translate(exc, doing) from exc

    # -- rows every part touches (inside a transaction or snapshot) ------------------------

    def session_row(self, db: Database, session_id: str) -> dict[str, Any]:
        """The session's row as stored (config as JSON text); `NotFoundError` if none."""
        rows = query_rows(db, "SELECT * FROM sessions WHERE id = ?", [session_id])
        if not rows:
            raise NotFoundError(f"No session with id {session_id!r}.")
        return rows[0]

    def update_session(self, db: Database, session_id: str, **columns: Any) -> None:
        """Set columns of the session's row and its `updated` time; `NotFoundError` if
        there is no such session."""
        sets = {"updated": now(), **columns}
        assignments = ", ".join(f'"{c}" = ?' for c in sets)
        cursor = db.execute(
            f"UPDATE sessions SET {assignments} WHERE id = ?", [*sets.values(), session_id]
        )
        if cursor.rowcount == 0:
            raise NotFoundError(f"No session with id {session_id!r}.")

    def insert_event(self, db: Database, session_id: str, kind: str, data: Any) -> None:
        """Append an event to the session's log (`data` must be JSON-able)."""
        try:
            data_json = to_json(data)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{kind} event is not JSON-able: {exc}") from exc
        db["events"].insert(
            {"session_id": session_id, "kind": kind, "data": data_json, "created": now()}
        )

    # -- data-directory paths --------------------------------------------------------------

    def adapter_dir(self, session_id: str, create: bool = True) -> Path:
        """`<data_dir>/adapters/<session_id>`: where the engine should save adapters."""
        if not paths.is_session_id(session_id):
            raise StoreError(f"{session_id!r} is not a valid session id.")
        folder = self.data_dir / paths.adapter_relpath(session_id)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder
