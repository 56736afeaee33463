"""Dump: every row of one session as stored, from one snapshot (what `sessions.archive`
exports), and the archive entry points."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import StoreBase, query_rows
from .tables import SESSION_TABLES


class Dump(StoreBase):
    """A session's rows by table (`SESSION_TABLES`), and its archive export and import."""

    def dump(self, session_id: str) -> dict[str, list[dict[str, Any]]]:
        """Every row of the session as stored (JSON columns as text), by table, from one
        snapshot: sessions, images (those it uses), then `SESSION_TABLES`."""
        with self.snapshot("reading a session") as db:
            out = {"sessions": [self.session_row(db, session_id)]}
            out["images"] = query_rows(
                db,
                "SELECT * FROM images WHERE id IN (SELECT sha256 FROM session_images "
                "WHERE session_id = ?) ORDER BY id",
                [session_id],
            )
            for table, order in SESSION_TABLES.items():
                out[table] = query_rows(
                    db,
                    f"SELECT * FROM {table} WHERE session_id = ? ORDER BY {order}",
                    [session_id],
                )
        return out

    def export_session(self, session_id: str, dest: str | os.PathLike[str]) -> Path:
        """Write the session to one zip archive; see `sessions.archive.export_session`."""
        from ..archive import export_session

        return export_session(self, session_id, dest)

    def import_archive(self, path: str | os.PathLike[str]) -> str:
        """Restore an exported session; see `sessions.archive.import_archive`."""
        from ..archive import import_archive

        return import_archive(self, path)
