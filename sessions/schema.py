"""The database file: schema migrations, opening checks, and the store's error type.

Schema versions are sqlite-utils migrations (`sqlite_utils.Migrations`, built into
sqlite-utils 4.2) in the set `ttrv-sessions`, recorded in its `_sqlite_migrations` table.
Each migration is named `NNNN_what`; the schema version of a database is the largest
`NNNN` applied. A database that records a migration this code does not know was written by
a newer release: it is refused, never migrated down.

Opening checks run before anything can write to the file, so a file that is not ours is
left byte-for-byte as it was: the SQLite header is read first, then the schema, and only
then is WAL switched on and pending migrations applied (all in one transaction).

sqlite-utils is imported lazily (it pulls in pandas when installed), so importing
`sessions` stays cheap.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlite_utils import Database, Migrations

MIGRATION_SET = "ttrv-sessions"
MIGRATIONS_TABLE = "_sqlite_migrations"
SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0

STATUSES = ("queued", "running", "stopping", "stopped", "done", "failed", "interrupted")
ACTIVE_STATUSES = ("running", "stopping")

# Columns that hold JSON text, per table (parsed by the query helpers and the archive).
JSON_COLUMNS: dict[str, tuple[str, ...]] = {
    "sessions": ("config",),
    "session_images": ("options",),
    "steps": ("extra",),
    "rollouts": ("components", "option_order"),
    "events": ("data",),
    "jobs": ("request", "result"),
}


class StoreError(Exception):
    """The store cannot do what was asked; the message says why and what to do."""


class NotFoundError(StoreError):
    """No session (or image) with that id."""


def _m0001_initial(db: Database) -> None:
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    db.executescript(f"""
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created TEXT NOT NULL,
        updated TEXT NOT NULL,
        model TEXT NOT NULL,
        task_kind TEXT NOT NULL,
        config TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ({statuses})),
        reason TEXT,
        error TEXT,
        traceback TEXT,
        heartbeat TEXT,
        pid INTEGER,
        host TEXT
    );
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        ext TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        path TEXT NOT NULL,
        thumb TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE TABLE session_images (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        image_id TEXT NOT NULL,
        sha256 TEXT REFERENCES images(id),
        position INTEGER NOT NULL,
        name TEXT NOT NULL,
        label TEXT,
        question TEXT,
        options TEXT,
        PRIMARY KEY (session_id, image_id)
    );
    CREATE INDEX session_images_sha256 ON session_images(sha256);
    CREATE TABLE steps (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        "round" INTEGER NOT NULL,
        reward_mean REAL,
        reward_std REAL,
        consensus REAL,
        entropy REAL,
        invalid_rate REAL,
        kl REAL,
        loss REAL,
        grad_norm REAL,
        lr REAL,
        tokens INTEGER,
        seconds REAL,
        "groups" INTEGER,
        groups_skipped INTEGER,
        extra TEXT,
        created TEXT NOT NULL,
        PRIMARY KEY (session_id, step)
    );
    CREATE TABLE rollouts (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        image_id TEXT NOT NULL,
        "index" INTEGER NOT NULL,
        response TEXT,
        answer TEXT,
        reward REAL,
        components TEXT,
        advantage REAL,
        trained INTEGER NOT NULL DEFAULT 0,
        option_order TEXT,
        PRIMARY KEY (session_id, step, image_id, "index")
    );
    CREATE INDEX rollouts_image ON rollouts(session_id, image_id, step);
    CREATE TABLE answers (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        phase TEXT NOT NULL,
        image_id TEXT NOT NULL,
        response TEXT,
        answer TEXT,
        created TEXT NOT NULL,
        PRIMARY KEY (session_id, phase, image_id)
    );
    CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        "round" INTEGER NOT NULL,
        step INTEGER NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT,
        bytes INTEGER,
        created TEXT NOT NULL
    );
    CREATE INDEX checkpoints_session ON checkpoints(session_id, step);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE INDEX events_session ON events(session_id, kind);
    """)


def _m0002_jobs(db: Database) -> None:
    # The job queue lives in the store, so a UI only writes rows and never touches the
    # worker; the worker polls, claims and reports here.
    db.executescript("""
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        session_id TEXT REFERENCES sessions(id) ON DELETE CASCADE,
        status TEXT NOT NULL DEFAULT 'queued'
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        request TEXT NOT NULL,
        result TEXT,
        error TEXT,
        traceback TEXT,
        created TEXT NOT NULL,
        started TEXT,
        finished TEXT
    );
    CREATE INDEX jobs_status ON jobs(status, id);
    """)


def _m0003_reviews(db: Database) -> None:
    # Flip review: a person's marks on images whose greedy answer changed, one per image.
    db.executescript("""
    CREATE TABLE reviews (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        image_id TEXT NOT NULL,
        mark TEXT NOT NULL CHECK (mark IN ('before', 'after', 'neither')),
        created TEXT NOT NULL,
        PRIMARY KEY (session_id, image_id)
    );
    """)


# A rollout counts as invalid when it has no answer or the engine's `<invalid>` one.
_IMAGE_STEP_ROW = """
    SELECT {key}, coalesce(sum(c), 0) AS n,
        coalesce(sum(CASE WHEN bad THEN c END), 0) AS invalid,
        coalesce(max(CASE WHEN NOT bad THEN c END), 0) AS top,
        count(CASE WHEN NOT bad THEN 1 END) AS answers
    FROM (SELECT {group}count(*) AS c, (answer IS NULL OR answer IN ('', '<invalid>')) AS bad
          FROM rollouts {where} GROUP BY {group}answer)
    {outer}"""


def _image_step_sql(ref: str) -> str:
    """Recompute the image_steps row of the (session, image, step) of `ref` (new/old)."""
    key = f"{ref}.session_id, {ref}.image_id, {ref}.step"
    where = (f"WHERE session_id = {ref}.session_id AND image_id = {ref}.image_id "
             f"AND step = {ref}.step")  # fmt: skip
    select = _IMAGE_STEP_ROW.format(key=key, group="", where=where, outer="")
    return (
        f"DELETE FROM image_steps WHERE session_id = {ref}.session_id AND image_id = "
        f"{ref}.image_id AND step = {ref}.step;\n"
        f"INSERT INTO image_steps SELECT * FROM ({select}) WHERE n > 0;"
    )


def _m0004_read_indexes(db: Database) -> None:
    # Reads at the scale of 10,000 images x N = 16 x 3 rounds (bench/store_scale.py):
    # one image's answers, pages of images in order, and a per-(image, step) summary of
    # the rollouts (kept by triggers, so every writer - sink, import, rewind, delete -
    # keeps it right) that Inspect's per-image consensus and the converged images read
    # instead of aggregating ~500,000 rollouts.
    backfill = _IMAGE_STEP_ROW.format(
        key="session_id, image_id, step",
        group="session_id, image_id, step, ",
        where="",
        outer="GROUP BY session_id, image_id, step",
    )
    db.executescript(f"""
    CREATE INDEX answers_image ON answers(session_id, image_id);
    CREATE INDEX session_images_position ON session_images(session_id, position);
    CREATE TABLE image_steps (
        session_id TEXT NOT NULL,
        image_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        n INTEGER NOT NULL,
        invalid INTEGER NOT NULL,
        top INTEGER NOT NULL,
        answers INTEGER NOT NULL,
        PRIMARY KEY (session_id, image_id, step)
    ) WITHOUT ROWID;
    INSERT INTO image_steps {backfill};
    CREATE TRIGGER image_steps_insert AFTER INSERT ON rollouts BEGIN
        {_image_step_sql("new")}
    END;
    CREATE TRIGGER image_steps_delete AFTER DELETE ON rollouts BEGIN
        {_image_step_sql("old")}
    END;
    CREATE TRIGGER image_steps_update AFTER UPDATE ON rollouts BEGIN
        {_image_step_sql("old")}
        {_image_step_sql("new")}
    END;
    """)


# Append only: never edit or reorder a migration that has shipped.
MIGRATIONS: list[tuple[str, Callable[[Database], None]]] = [
    ("0001_initial", _m0001_initial),
    ("0002_jobs", _m0002_jobs),
    ("0003_reviews", _m0003_reviews),
    ("0004_read_indexes", _m0004_read_indexes),
]
SCHEMA_VERSION = len(MIGRATIONS)

_NAME = re.compile(r"^(\d{4})_\w+$")


def migration_version(name: str) -> int:
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"migration name {name!r} does not start with a 4-digit version")
    return int(match.group(1))


def build_migrations() -> Migrations:
    """The sqlite-utils migration set for this code's schema."""
    from sqlite_utils import Migrations

    migrations = Migrations(MIGRATION_SET)
    for name, fn in MIGRATIONS:
        migrations(name=name)(fn)
    return migrations


def writable(path: Path) -> bool:
    """Whether the database at `path` (and its folder, where SQLite keeps the WAL files)
    can be written by this process; False on a read-only folder or mount."""
    folder_ok = os.access(path.parent, os.W_OK | os.X_OK)
    return folder_ok and (not path.exists() or os.access(path, os.W_OK))


def _probe(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection. `mode=ro` reads the WAL when its index (`-shm`) exists; in a
    folder where SQLite cannot create that index it fails, and the file is opened as
    `immutable` (what was checkpointed into the main file; nobody can write it here)."""
    uri = "file:" + urllib.parse.quote(str(path.resolve()))
    try:
        return _probe(f"{uri}?mode=ro")
    except sqlite3.Error:
        return _probe(f"{uri}?immutable=1")


def connect(path: Path, read_only: bool = False) -> Database:
    """A new connection (one per thread): foreign keys on, busy timeout, no plugins."""
    from sqlite_utils import Database

    if read_only:
        conn = _connect_read_only(path)
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    db = Database(conn, execute_plugins=False)
    db.execute("PRAGMA foreign_keys = ON")
    return db


def translate(exc: BaseException, doing: str) -> StoreError:
    """A `StoreError` that says in plain words what went wrong while `doing` something."""
    text = str(exc)
    if isinstance(exc, StoreError):
        return exc
    if "disk is full" in text or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return StoreError(
            f"The disk is full while {doing}; nothing of it was saved. Free some space "
            "(or move the data directory with $TTRV_DATA_DIR) and try again."
        )
    if "readonly database" in text or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        return StoreError(
            f"The data directory is read-only, so nothing can be changed while {doing}: "
            "sessions can be browsed, not run, edited or deleted. Open a writable data "
            "directory (--data-dir or $TTRV_DATA_DIR) to work in it."
        )
    if "database is locked" in text or "database is busy" in text:
        return StoreError(
            f"The session database stayed locked by another process while {doing}; "
            "close other TTRV workbench windows or wait, then try again."
        )
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return StoreError(f"The session database is damaged ({text}) while {doing}.")
    return StoreError(f"Failed while {doing}: {text}")


def _check_header(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_file():
        raise StoreError(f"{path} is not a file; point the data directory elsewhere.")
    with path.open("rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        raise StoreError(
            f"{path} is not an SQLite database (its first bytes are not the SQLite header); "
            "it was left untouched. Move it away or choose another data directory."
        )


def applied_versions(db: Database) -> list[str]:
    """Names of this set's applied migrations (read only)."""
    if MIGRATIONS_TABLE not in db.table_names():
        return []
    rows = db.execute(
        f"SELECT name FROM {MIGRATIONS_TABLE} WHERE migration_set = ? ORDER BY rowid",
        [MIGRATION_SET],
    ).fetchall()
    return [r[0] for r in rows]


def schema_version(db: Database) -> int:
    """The largest migration version applied (0 for an empty database)."""
    versions = [migration_version(n) for n in applied_versions(db) if _NAME.match(n)]
    return max(versions, default=0)


def _check_schema(db: Database, path: Path) -> None:
    known = {name for name, _ in MIGRATIONS}
    applied = applied_versions(db)
    unknown = [n for n in applied if n not in known]
    if unknown:
        newest = max((migration_version(n) for n in unknown if _NAME.match(n)), default=0)
        raise StoreError(
            f"{path} was written by a newer TTRV workbench (schema version {newest or '?'}, "
            f"this release knows up to {SCHEMA_VERSION}); upgrade the app to open it. "
            "The database was not changed."
        )
    if not applied:
        tables = [t for t in db.table_names() if not t.startswith("sqlite_")]
        if tables:
            raise StoreError(
                f"{path} is an SQLite database of another program (tables: "
                f"{', '.join(sorted(tables)[:5])}); it was left untouched. Choose another "
                "data directory."
            )


def _open_read_only(path: Path) -> Database:
    """Open an existing database for reading only (see `writable`); nothing is migrated."""
    if not path.exists():
        raise StoreError(
            f"The data directory {path.parent} is read-only and holds no session database; "
            "choose a writable data directory."
        )
    try:
        db = connect(path, read_only=True)
    except sqlite3.Error as exc:
        raise StoreError(
            f"{path} is not a readable SQLite database ({exc}); it was left untouched. "
            "Move it away or choose another data directory."
        ) from exc
    try:
        _check_schema(db, path)
        applied = set(applied_versions(db))
        pending = [name for name, _ in MIGRATIONS if name not in applied]
        if pending:
            raise StoreError(
                f"{path} was written by an older TTRV workbench and must be upgraded before "
                "it can be browsed, which needs write access; the data directory is read-only."
            )
    except BaseException:
        db.close()
        raise
    return db


def open_database(path: Path, read_only: bool = False) -> Database:
    """Check, then migrate, the database at `path` (created if absent); return a connection.

    Raises `StoreError`, leaving the file unchanged, when the file is not SQLite, is
    damaged, belongs to another program, or was written by a newer schema version.
    `read_only`: open an existing, current database for browsing; nothing is written.
    """
    _check_header(path)
    if read_only:
        return _open_read_only(path)
    db = connect(path)
    try:
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path} is not a readable SQLite database ({exc}); it was left untouched. "
                "Move it away or choose another data directory."
            ) from exc
        _check_schema(db, path)
        db.enable_wal()
        db.execute("BEGIN IMMEDIATE")
        try:
            _check_schema(db, path)  # another process may have migrated meanwhile
            build_migrations().apply(db)
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
    except sqlite3.Error as exc:
        db.close()
        raise translate(exc, f"opening {path}") from exc
    except BaseException:
        db.close()
        raise
    return db
