"""Sessions: the SQLite store the worker writes and the UI reads, plus session archives.

`Store(data_dir)` is the whole API (see `sessions.store`); `sessions.paths` says where data
lives, `sessions.schema` how the database is versioned, `sessions.archive` how a session
travels as one zip. Importing this package does not import sqlite-utils, Pillow or torch.
"""

from .archive import export_session, import_archive, read_manifest
from .paths import default_data_dir, resolve_data_dir
from .schema import SCHEMA_VERSION, STATUSES, NotFoundError, StoreError
from .store import Store

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "NotFoundError",
    "Store",
    "StoreError",
    "default_data_dir",
    "export_session",
    "import_archive",
    "read_manifest",
    "resolve_data_dir",
]
