"""The session store: SQLite (through sqlite-utils) plus content-addressed files.

One `Store` per data directory, safe to share between threads: the engine's thread writes
through `sink()`, the UI's threads read through the read models, and WAL mode lets them run
side by side. `Store` is assembled from parts with one job each:

    base         the data directory, one connection per thread, `transaction` / `snapshot`
    tables       `SESSION_TABLES` (the one list delete, dump and the archive read), columns,
                 timestamps and JSON encoding
    files        content hashes, atomic writes, copies
    sessions     create, get, list, rename, status, heartbeat, interrupted runs, delete
    images       reading, thumbnailing and storing images, a session's image list
    checkpoints  adapter checkpoints
    sink         engine events -> rows (`sink`, `record_step`, `add_event`, `rewind`)
    reads        read models: metrics, rollouts, answers, flips, reviews, compare, events
    dump         every row of a session, and its archive export/import

Every multi-row write is one `BEGIN IMMEDIATE` transaction, so a reader sees an event
completely or not at all. Query helpers that read several tables do it inside one read
transaction (one snapshot). Code outside the store (`sessions.jobs`, `sessions.archive`)
uses the same public `transaction` / `snapshot` with `session_row`, `update_session`,
`insert_event` and `storing_files`.

Every failure reaches the caller as a `StoreError` whose message says what to do; a full
disk is one of them, and the failed write leaves nothing half-saved. See `paths` for the
data-directory layout and `schema` for the tables and their migrations.
"""

from __future__ import annotations

from .base import DEFAULT_STALE_AFTER_S
from .dump import Dump
from .files import copy_path, sha256_file, sha256_path, write_atomic
from .images import THUMB_PX, Images, load_image
from .reads import ReadModels
from .sessions import Sessions
from .sink import RUN_END_STATUS, EventSink, Sink
from .tables import ROLLOUT_COLUMNS, SESSION_TABLES, STEP_COLUMNS, now, to_json


class Store(Sessions, Images, EventSink, ReadModels, Dump):
    """All sessions of one data directory (see `sessions.paths` for its layout).

    `Store(data_dir)` opens (creating, migrating) `<data_dir>/sessions.db`; `data_dir`
    defaults to `paths.default_data_dir()`. It raises `StoreError` and changes nothing
    when the file is not an SQLite database, is damaged, belongs to another program, or was
    written by a newer schema version. Safe to share between threads. A data directory this
    process cannot write (a read-only folder or mount) opens read-only: `read_only` is True,
    reads work, and every write raises a `StoreError` that says so.
    """


__all__ = [
    "DEFAULT_STALE_AFTER_S",
    "ROLLOUT_COLUMNS",
    "RUN_END_STATUS",
    "SESSION_TABLES",
    "STEP_COLUMNS",
    "THUMB_PX",
    "Sink",
    "Store",
    "copy_path",
    "load_image",
    "now",
    "sha256_file",
    "sha256_path",
    "to_json",
    "write_atomic",
]
