"""The event sink: the engine's events (`ttrv.events`) become rows of one session.

`sink(session_id)` is what the engine writes through; `record_step`, `add_event` and
`rewind` are what a recorded run (`sessions.runs`) adds around it. Every event is one
transaction. The engine emits a step's "rollouts" event before its "step" event, and
`record_step` writes both in one transaction, so any step visible in `steps` has all its
rollouts.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..schema import StoreError
from .checkpoints import Checkpoints
from .tables import ROLLOUT_COLUMNS, STEP_COLUMNS, now, to_json

if TYPE_CHECKING:
    from sqlite_utils import Database

Sink = Callable[[str, dict[str, Any]], None]
RUN_END_STATUS = {"done": "done", "failed": "failed"}  # anything else ends as "stopped"
_PHASE = re.compile(r"^(before|after|round-\d+)$")


class EventSink(Checkpoints):
    """Engine events into rows ("checkpoint" events go through `add_checkpoint`)."""

    def sink(self, session_id: str) -> Sink:
        """A `sink(kind, data)` for the engine that writes its events into this session.

        Every event is written in one transaction (see `ttrv.events` for the kinds).
        "run_start" marks the session running; "run_end" sets done/stopped/failed;
        "checkpoint" goes through `add_checkpoint`; "guard", "run_start", "run_end" and
        unknown kinds are kept in `events`. Raises `StoreError` on a malformed event or a
        failed write (e.g. disk full), with nothing of that event saved.
        """
        with self.snapshot("opening a sink") as db:
            self.session_row(db, session_id)

        def sink(kind: str, data: dict[str, Any]) -> None:
            self._record(session_id, kind, data)

        return sink

    def _record(self, session_id: str, kind: str, data: dict[str, Any]) -> None:
        if kind == "checkpoint":
            try:
                self.add_checkpoint(session_id, data["round"], data["step"], data["path"])
            except KeyError as exc:
                raise StoreError(f"checkpoint event without {exc}.") from exc
            return
        handler = {
            "run_start": self._on_run_start,
            "answers": self._on_answers,
            "step": self._on_step,
            "rollouts": self._on_rollouts,
            "run_end": self._on_run_end,
        }.get(kind)
        with self.transaction(f"saving a {kind} event") as db:
            try:
                if handler is not None:
                    handler(db, session_id, data)
                if kind not in ("answers", "step", "rollouts"):
                    self.insert_event(db, session_id, kind, data)
            except KeyError as exc:
                raise StoreError(f"{kind} event without {exc} (see ttrv/events.py).") from exc

    def _on_run_start(self, db: Database, session_id: str, data: dict[str, Any]) -> None:
        columns: dict[str, Any] = {
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "heartbeat": now(),
            "error": None,
            "traceback": None,
            "reason": None,
        }
        if data.get("config") is not None:
            columns["config"] = to_json(data["config"])
        self.update_session(db, session_id, **columns)
        position = db.execute(
            "SELECT coalesce(max(position) + 1, 0) FROM session_images WHERE session_id = ?",
            [session_id],
        ).fetchone()[0]
        for image in data.get("images") or []:
            cursor = db.execute(
                "INSERT OR IGNORE INTO session_images (session_id, image_id, position, name) "
                "VALUES (?, ?, ?, ?)",
                [session_id, image["image_id"], position, image.get("name") or image["image_id"]],
            )
            position += cursor.rowcount

    def _on_run_end(self, db: Database, session_id: str, data: dict[str, Any]) -> None:
        status = data["status"]
        self.update_session(
            db,
            session_id,
            status=RUN_END_STATUS.get(status, "stopped"),
            reason=f"{status}: {data.get('reason') or ''}".rstrip(": "),
        )

    def _on_answers(self, db: Database, session_id: str, data: dict[str, Any]) -> None:
        phase = data["phase"]
        if not isinstance(phase, str) or not _PHASE.match(phase):
            raise StoreError(f"Answer phase {phase!r} is not before, after or round-<k>.")
        stamp = now()
        rows = [
            {
                "session_id": session_id,
                "phase": phase,
                "image_id": a["image_id"],
                "response": a.get("response"),
                "answer": a.get("answer"),
                "created": stamp,
            }
            for a in data["answers"]
        ]
        db["answers"].insert_all(rows, replace=True)
        self.update_session(db, session_id)

    def _on_step(self, db: Database, session_id: str, data: dict[str, Any]) -> None:
        row = {col: data.get(col) for col in STEP_COLUMNS}
        row["step"], row["round"] = data["step"], data["round"]
        extra = {k: v for k, v in data.items() if k not in STEP_COLUMNS}
        row |= {
            "session_id": session_id,
            "extra": to_json(extra) if extra else None,
            "created": now(),
        }
        db["steps"].insert(row, replace=True)
        self.update_session(db, session_id, heartbeat=now())

    def _on_rollouts(self, db: Database, session_id: str, data: dict[str, Any]) -> None:
        step = data["step"]
        rows = []
        for r in data["rollouts"]:
            row = {col: r.get(col) for col in ROLLOUT_COLUMNS}
            row |= {
                "session_id": session_id,
                "step": r.get("step", step),
                "image_id": r["image_id"],
                "index": r["index"],
                "components": to_json(r.get("components") or {}),
                "trained": bool(r.get("trained")),
                "option_order": None
                if r.get("option_order") is None
                else to_json(r["option_order"]),
            }
            rows.append(row)
        # A step replayed after a rollback replaces that step's rollouts for its images.
        for s, image_id in sorted({(r["step"], r["image_id"]) for r in rows}):
            db.execute(
                "DELETE FROM rollouts WHERE session_id = ? AND step = ? AND image_id = ?",
                [session_id, s, image_id],
            )
        db["rollouts"].insert_all(rows)

    # -- recorded runs (see `sessions.runs`) -----------------------------------------------

    def record_step(
        self, session_id: str, step: dict[str, Any], rollouts: dict[str, Any] | None
    ) -> None:
        """Write a step and its rollouts in one transaction: a reader (or a process killed
        mid-way) sees both or neither, never rollouts without their step."""
        with self.transaction("saving a step") as db:
            try:
                if rollouts is not None:
                    self._on_rollouts(db, session_id, rollouts)
                self._on_step(db, session_id, step)
            except KeyError as exc:
                raise StoreError(f"step event without {exc} (see ttrv/events.py).") from exc

    def add_event(self, session_id: str, kind: str, data: dict[str, Any]) -> None:
        """Append an event to the session's log, with no other effect (unlike `sink`,
        "run_end" here does not set the status)."""
        with self.transaction(f"saving a {kind} event") as db:
            self.session_row(db, session_id)
            self.insert_event(db, session_id, kind, data)
            self.update_session(db, session_id)

    def rewind(self, session_id: str, step: int, round: int) -> dict[str, int]:
        """Drop what a run recorded after a checkpoint at (`step`, `round`), before it is
        resumed from there: steps and rollouts from `step` on, answers of later rounds,
        "after" answers and later checkpoints. Returns the rows deleted per table."""
        deleted: dict[str, int] = {}
        with self.transaction(f"rewinding session {session_id} to step {step}") as db:
            self.session_row(db, session_id)
            for table in ("steps", "rollouts"):
                deleted[table] = db.execute(
                    f"DELETE FROM {table} WHERE session_id = ? AND step >= ?", [session_id, step]
                ).rowcount
            phases = [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT phase FROM answers WHERE session_id = ?", [session_id]
                )
                if r[0] == "after"
                or (r[0].startswith("round-") and int(r[0].split("-")[1]) > round)
            ]
            deleted["answers"] = sum(
                db.execute(
                    "DELETE FROM answers WHERE session_id = ? AND phase = ?", [session_id, ph]
                ).rowcount
                for ph in phases
            )
            deleted["checkpoints"] = db.execute(
                "DELETE FROM checkpoints WHERE session_id = ? AND step > ?", [session_id, step]
            ).rowcount
            self.update_session(db, session_id)
        return deleted
