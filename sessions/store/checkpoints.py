"""Adapter checkpoints: copied into the session's adapter folder, hashed, and listed."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..schema import translate
from .base import StoreBase, query_rows
from .files import copy_path, sha256_path
from .tables import now


class Checkpoints(StoreBase):
    """The `checkpoints` rows and the adapter folders they point into."""

    def _relative(self, path: Path) -> str:
        resolved = path.resolve()
        if resolved.is_relative_to(self.data_dir):
            return resolved.relative_to(self.data_dir).as_posix()
        return str(resolved)

    def add_checkpoint(
        self, session_id: str, round: int, step: int, path: str | os.PathLike[str]
    ) -> dict[str, Any]:
        """Record an adapter checkpoint (a file or a PEFT folder) with its sha256.

        A checkpoint outside `adapter_dir(session_id)` is copied into it (as
        `round<r>-step<s>`) so the store owns every adapter it lists. A missing path is
        recorded with `sha256=None`, a "warning" event is added, and nothing is raised.
        A "checkpoint" event is logged either way. Returns the checkpoint as
        `latest_checkpoint` describes it.
        """
        source = Path(path)
        folder = self.adapter_dir(session_id)
        warning = None
        sha = size = None
        stored = source
        try:
            if not source.exists():
                warning = f"Checkpoint {source} (round {round}, step {step}) does not exist."
            else:
                if not source.resolve().is_relative_to(folder.resolve()):
                    stored = folder / f"round{int(round)}-step{int(step)}{source.suffix}"
                    tmp = folder / f".tmp-{uuid.uuid4().hex}"
                    try:
                        copy_path(source, tmp)
                    except BaseException:
                        # A half-copied folder must not stay behind (export would ship it).
                        if tmp.is_dir():
                            shutil.rmtree(tmp, ignore_errors=True)
                        else:
                            tmp.unlink(missing_ok=True)
                        raise
                    if stored.is_dir():
                        shutil.rmtree(stored)
                    elif stored.exists():
                        stored.unlink()
                    os.replace(tmp, stored)
                sha, size = sha256_path(stored)
        except OSError as exc:
            raise translate(exc, f"saving checkpoint {source}") from exc
        with self.transaction("recording a checkpoint") as db:
            self.session_row(db, session_id)
            row = {
                "session_id": session_id,
                "round": int(round),
                "step": int(step),
                "path": self._relative(stored),
                "sha256": sha,
                "bytes": size,
                "created": now(),
            }
            db["checkpoints"].insert(row)
            event = {"round": int(round), "step": int(step), "path": str(source)}
            self.insert_event(db, session_id, "checkpoint", event)
            if warning:
                self.insert_event(db, session_id, "warning", {"message": warning})
            self.update_session(db, session_id)
        return self._checkpoint_view(row)

    def _checkpoint_view(self, row: dict[str, Any]) -> dict[str, Any]:
        view = dict(row)
        full = Path(row["path"])
        full = full if full.is_absolute() else self.data_dir / full
        view["path"] = str(full)
        view["exists"] = full.exists()
        view["missing"] = row["sha256"] is None or not view["exists"]
        return view

    def checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """All checkpoints by step: round, step, path (absolute), sha256, bytes, exists,
        missing (the file was absent when recorded, or is absent now)."""
        with self.snapshot("listing checkpoints") as db:
            self.session_row(db, session_id)
            rows = query_rows(
                db,
                "SELECT * FROM checkpoints WHERE session_id = ? ORDER BY step, id",
                [session_id],
            )
        return [self._checkpoint_view(r) for r in rows]

    def latest_checkpoint(self, session_id: str) -> dict[str, Any] | None:
        """The checkpoint with the highest step (the last recorded on ties), or None."""
        found = self.checkpoints(session_id)
        return found[-1] if found else None

    def sessions_with_checkpoint(self, path: str | os.PathLike[str]) -> list[str]:
        """Ids of the sessions that recorded a checkpoint from `path` (as the engine wrote
        it, or as stored), newest first."""
        resolved = Path(path).resolve()
        found: list[str] = []
        with self.snapshot("finding a checkpoint's session") as db:
            rows = query_rows(
                db,
                "SELECT e.session_id, e.data FROM events e JOIN sessions s ON s.id = "
                "e.session_id WHERE e.kind = 'checkpoint' ORDER BY s.created DESC, e.id",
            )
            rows += query_rows(
                db,
                "SELECT c.session_id, json_object('path', c.path) AS data FROM checkpoints c "
                "JOIN sessions s ON s.id = c.session_id ORDER BY s.created DESC, c.id",
            )
        for row in rows:
            stored = Path(json.loads(row["data"]).get("path") or "")
            stored = stored if stored.is_absolute() else self.data_dir / stored
            if stored.resolve() == resolved and row["session_id"] not in found:
                found.append(row["session_id"])
        return found
