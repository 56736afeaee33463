"""The job queue, kept in the store.

A UI (or any caller) submits a job by writing a row; the worker claims queued rows in
order and writes back status, result and errors. Nobody holds a reference to the worker,
so a closed browser tab, a reload or a second tab cannot orphan or duplicate work.

Job kinds: "load_model", "baseline", "adapt", "evaluate", "ask", "preview" (a prompt through
the model's chat template: the processor only), "export_model" (a merged model folder).
"""

from __future__ import annotations

import json
from typing import Any

from .schema import NotFoundError, StoreError
from .store import Store, now, to_json

KINDS = ("load_model", "baseline", "adapt", "evaluate", "ask", "preview", "export_model")
SESSION_KINDS = ("baseline", "adapt", "evaluate")
# Jobs that never touch the loaded model: the worker also runs them beside a running one.
LIGHT_KINDS = ("preview",)


def _parse(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("request", "result"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    return row


def submit(
    store: Store, kind: str, request: dict[str, Any] | None = None, session_id: str | None = None
) -> int:
    """Queue a job. Refuses a session job while that session has one queued or running,
    and an adaptation while any other adaptation is queued or running (one model, one GPU).
    """
    if kind not in KINDS:
        raise StoreError(f"Unknown job kind {kind!r}; expected one of {', '.join(KINDS)}.")
    with store.transaction(f"queueing a {kind} job") as db:
        if session_id is not None:
            store.session_row(db, session_id)
            busy = db.execute(
                "SELECT kind FROM jobs WHERE session_id = ? AND status IN ('queued','running')",
                [session_id],
            ).fetchone()
            if busy:
                raise StoreError(
                    f"This session already has a {busy[0]} job queued or running; wait for it "
                    "or stop it first."
                )
            status = db.execute(
                "SELECT status FROM sessions WHERE id = ?", [session_id]
            ).fetchone()[0]
            if status in ("running", "stopping"):
                raise StoreError("This session is already running; stop it first.")
        if kind == "adapt":
            other = db.execute(
                "SELECT session_id FROM jobs WHERE kind = 'adapt' AND status IN "
                "('queued','running')"
            ).fetchone()
            if other:
                raise StoreError(
                    f"Another adaptation (session {other[0]}) is queued or running; one runs "
                    "at a time. Stop it or wait for it to finish."
                )
        cursor = db.execute(
            "INSERT INTO jobs (kind, session_id, status, request, created) "
            "VALUES (?, ?, 'queued', ?, ?)",
            [kind, session_id, to_json(request or {}), now()],
        )
        if kind == "adapt" and session_id is not None:
            store.update_session(db, session_id, status="queued", error=None, traceback=None)
        return int(cursor.lastrowid)


def claim_next(store: Store, kinds: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """Atomically mark the oldest queued job (of one of `kinds`, default any) running and
    return it."""
    sql, params = "SELECT id FROM jobs WHERE status = 'queued'", []
    if kinds is not None:
        sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
        params = list(kinds)
    with store.transaction("claiming a job") as db:
        row = db.execute(sql + " ORDER BY id LIMIT 1", params).fetchone()
        if row is None:
            return None
        db.execute("UPDATE jobs SET status = 'running', started = ? WHERE id = ?", [now(), row[0]])
        return _parse(list(db.query("SELECT * FROM jobs WHERE id = ?", [row[0]]))[0])


def finish(
    store: Store,
    job_id: int,
    status: str,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    traceback: str | None = None,
) -> None:
    with store.transaction("finishing a job") as db:
        db.execute(
            "UPDATE jobs SET status = ?, result = ?, error = ?, traceback = ?, finished = ? "
            "WHERE id = ?",
            [status, to_json(result) if result is not None else None, error, traceback, now(),
             job_id],
        )  # fmt: skip


def get(store: Store, job_id: int) -> dict[str, Any]:
    with store.snapshot("reading a job") as db:
        rows = list(db.query("SELECT * FROM jobs WHERE id = ?", [job_id]))
    if not rows:
        raise NotFoundError(f"No job {job_id}.")
    return _parse(rows[0])


def latest(store: Store, kind: str, session_id: str | None = None) -> dict[str, Any] | None:
    """The most recent job of a kind (optionally of one session)."""
    sql = "SELECT * FROM jobs WHERE kind = ?"
    params: list[Any] = [kind]
    if session_id is not None:
        sql += " AND session_id = ?"
        params.append(session_id)
    with store.snapshot("reading jobs") as db:
        rows = list(db.query(sql + " ORDER BY id DESC LIMIT 1", params))
    return _parse(rows[0]) if rows else None


def of_session(store: Store, session_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    """Every job of one session, oldest first (optionally of one kind)."""
    sql, params = "SELECT * FROM jobs WHERE session_id = ?", [session_id]
    if kind is not None:
        sql, params = sql + " AND kind = ?", [session_id, kind]
    with store.snapshot("reading jobs") as db:
        rows = list(db.query(sql + " ORDER BY id", params))
    return [_parse(r) for r in rows]


def active(store: Store) -> list[dict[str, Any]]:
    with store.snapshot("reading jobs") as db:
        rows = list(db.query("SELECT * FROM jobs WHERE status IN ('queued','running') ORDER BY id"))
    return [_parse(r) for r in rows]


STOP_BEFORE_START = "stop_requested"  # an event: a stop asked while the run was starting


def request_stop(store: Store, session_id: str) -> str:
    """Ask a running adaptation to stop after its current step; returns a message."""
    with store.transaction("requesting a stop") as db:
        status = store.session_row(db, session_id)["status"]
        if status == "running":
            store.update_session(db, session_id, status="stopping")
            return "Stopping after the current step."
        if status == "stopping":
            return "Already stopping."
        queued = db.execute(
            "UPDATE jobs SET status = 'cancelled', finished = ? WHERE session_id = ? "
            "AND status = 'queued'",
            [now(), session_id],
        ).rowcount
        if queued:
            store.update_session(
                db, session_id, status="stopped", reason="cancelled before it started"
            )
            return "Cancelled before it started."
        starting = status == "queued" and db.execute(
            "SELECT 1 FROM jobs WHERE session_id = ? AND kind = 'adapt' AND status = 'running'",
            [session_id],
        ).fetchone()
        if starting:
            # Its job is claimed but its run has not taken the session over yet (a
            # data-parallel run's processes start for seconds): the worker watches for this.
            store.insert_event(db, session_id, STOP_BEFORE_START, {})
            return "Stopping as soon as the run has started."
        return f"Nothing to stop: the session is {status}."


def recover(store: Store) -> list[int]:
    """On worker start: jobs left running by a dead process are failed (their sessions are
    marked interrupted by `Store.mark_interrupted_on_start`)."""
    with store.transaction("recovering jobs") as db:
        ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'")]
        db.execute(
            "UPDATE jobs SET status = 'failed', error = 'the process running it stopped', "
            "finished = ? WHERE status = 'running'",
            [now()],
        )
    return ids
