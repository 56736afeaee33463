"""Sessions: create, read, list, rename, status and heartbeat, interrupted runs, delete."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from .. import paths
from ..schema import ACTIVE_STATUSES, STATUSES, NotFoundError, StoreError
from .base import StoreBase, query_rows
from .reads import headline
from .tables import SESSION_TABLES, now, parse_json_columns, to_json


def _pid_alive(pid: int | None, host: str | None) -> bool | None:
    """True/False when it can tell; None for another host, no pid, or Windows (where
    `os.kill(pid, 0)` would terminate the process): then only the heartbeat decides."""
    if not pid or host != socket.gethostname() or sys.platform == "win32":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def _age_s(timestamp: str | None) -> float | None:
    """Seconds since an ISO 8601 timestamp; None when there is none or it is unreadable."""
    if not timestamp:
        return None
    try:
        then = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    return (datetime.now(UTC) - then).total_seconds()


class Sessions(StoreBase):
    """The `sessions` rows: one per session, with its config, status and heartbeat
    (`get_session` and `list_sessions` add `reads.headline`)."""

    def create_session(self, name: str, config: Any, model: str, task_kind: str) -> str:
        """Create a "queued" session and return its new id.

        `config` is `AdaptConfig.to_dict()` (an object with `to_dict()` is accepted too);
        it is kept as JSON and returned unchanged by `get_session`.
        """
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, dict):
            raise StoreError("config must be a dict (AdaptConfig.to_dict()).")
        if not str(name).strip():
            raise StoreError("The session needs a name.")
        if not str(task_kind).strip():
            raise StoreError("The session needs a task kind.")
        try:
            config_json = to_json(config)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"config is not JSON-able: {exc}") from exc
        session_id = uuid.uuid4().hex[:12]
        stamp = now()
        with self.transaction("creating a session") as db:
            db["sessions"].insert(
                {
                    "id": session_id,
                    "name": str(name).strip(),
                    "created": stamp,
                    "updated": stamp,
                    "model": str(model),
                    "task_kind": str(task_kind),
                    "config": config_json,
                    "status": "queued",
                }
            )
        return session_id

    def set_status(
        self,
        session_id: str,
        status: str,
        error: str | None = None,
        traceback: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Set the status (one of `schema.STATUSES`) and replace error/traceback/reason
        (None clears them). "running" also records this process's pid and a heartbeat."""
        if status not in STATUSES:
            raise StoreError(f"Unknown status {status!r}; use one of {', '.join(STATUSES)}.")
        columns: dict[str, Any] = {
            "status": status,
            "error": error,
            "traceback": traceback,
            "reason": reason,
        }
        if status == "running":
            columns |= {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": now()}
        with self.transaction(f"setting session {session_id} to {status}") as db:
            self.update_session(db, session_id, **columns)

    def rename_session(self, session_id: str, name: str) -> None:
        """Give a session another (non-empty) name."""
        if not str(name).strip():
            raise StoreError("The session needs a name.")
        with self.transaction("renaming a session") as db:
            self.update_session(db, session_id, name=str(name).strip())

    def heartbeat(self, session_id: str) -> None:
        """Record that this process is alive and working on the session."""
        with self.transaction("recording a heartbeat") as db:
            cursor = db.execute(
                "UPDATE sessions SET heartbeat = ?, pid = ?, host = ? WHERE id = ?",
                [now(), os.getpid(), socket.gethostname(), session_id],
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"No session with id {session_id!r}.")

    def mark_interrupted_on_start(self, stale_after_s: float | None = None) -> list[str]:
        """Mark "running"/"stopping" sessions whose process is gone as "interrupted".

        Gone = its pid is not alive on this host, or its heartbeat is older than
        `stale_after_s` (default: the Store's, 120 s) or missing; so a worker must call
        `heartbeat` more often than that, also while it loads a model. Call once at app
        start. Returns the ids it marked.
        """
        stale = self.stale_after_s if stale_after_s is None else stale_after_s
        marked = []
        with self.transaction("marking interrupted sessions") as db:
            active = query_rows(
                db,
                "SELECT id, pid, host, heartbeat FROM sessions WHERE status IN (?, ?)",
                ACTIVE_STATUSES,
            )
            for row in active:
                age = _age_s(row["heartbeat"])
                alive = _pid_alive(row["pid"], row["host"])
                if alive is False:
                    why = f"its process (pid {row['pid']}) is gone"
                elif age is None or age > stale:
                    why = "no heartbeat" if age is None else f"no heartbeat for {age:.0f} s"
                else:
                    continue
                self.update_session(
                    db, row["id"], status="interrupted", reason=f"Interrupted: {why}."
                )
                marked.append(row["id"])
        return marked

    def delete_session(self, session_id: str) -> None:
        """Delete a session's rows, its adapter folder, and the images no other session
        uses. Refuses (StoreError) while the session is running or stopping."""
        with self._files_lock:
            with self.transaction(f"deleting session {session_id}") as db:
                row = self.session_row(db, session_id)
                if row["status"] in ACTIVE_STATUSES:
                    raise StoreError(
                        f"Session {row['name']!r} is {row['status']}; stop it before deleting "
                        "it. If its process is gone, restart the app to mark it interrupted."
                    )
                shas = {
                    r["sha256"]
                    for r in query_rows(
                        db,
                        "SELECT DISTINCT sha256 FROM session_images WHERE session_id = ? "
                        "AND sha256 IS NOT NULL",
                        [session_id],
                    )
                }
                for table in SESSION_TABLES:
                    db.execute(f"DELETE FROM {table} WHERE session_id = ?", [session_id])
                db.execute("DELETE FROM sessions WHERE id = ?", [session_id])
                orphans = [
                    r
                    for sha in sorted(shas)
                    for r in query_rows(
                        db,
                        "SELECT id, path, thumb FROM images WHERE id = ? AND NOT EXISTS "
                        "(SELECT 1 FROM session_images WHERE sha256 = ?)",
                        [sha, sha],
                    )
                ]
                for r in orphans:
                    db.execute("DELETE FROM images WHERE id = ?", [r["id"]])
            for r in orphans:
                for rel in (r["path"], r["thumb"]):
                    with contextlib.suppress(OSError, ValueError):
                        paths.inside(self.data_dir, rel).unlink(missing_ok=True)
            shutil.rmtree(self.adapter_dir(session_id, create=False), ignore_errors=True)

    def status(self, session_id: str) -> str:
        """The session's status alone (cheap enough to poll every step)."""
        with self.snapshot("reading a status") as db:
            return self.session_row(db, session_id)["status"]

    def get_session(self, session_id: str) -> dict[str, Any]:
        """The session row (config parsed back to a dict) plus `headline` numbers."""
        with self.snapshot("reading a session") as db:
            row = parse_json_columns("sessions", self.session_row(db, session_id))
            row["headline"] = headline(db, session_id)
        return row

    def session_state(self, session_id: str) -> list[Any]:
        """[id, status, updated, steps]: what changes while a session runs, read without the
        headline's per-image aggregate, for the UI's ticks (a fingerprint: redraw when it
        changes)."""
        with self.snapshot("reading a session's state") as db:
            row = self.session_row(db, session_id)
            steps = db.execute(
                "SELECT count(*) FROM steps WHERE session_id = ?", [session_id]
            ).fetchone()[0]
        return [session_id, row["status"], row["updated"], steps]

    def list_sessions(self) -> list[dict[str, Any]]:
        """Every session, newest first, without its config: id, name, created, updated,
        model, task_kind, status, reason, error, and `headline` (see `headline`)."""
        with self.snapshot("listing sessions") as db:
            rows = query_rows(
                db,
                "SELECT id, name, created, updated, model, task_kind, status, reason, error, "
                "heartbeat FROM sessions ORDER BY created DESC, id",
            )
            for row in rows:
                row["headline"] = headline(db, row["id"])
        return rows
