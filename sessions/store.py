"""The session store: SQLite (through sqlite-utils) plus content-addressed files.

One `Store` per data directory. It holds the database path and one `sqlite_utils.Database`
per thread (`threading.local()`): the engine's thread writes through `sink()`, the UI's
threads read through the query helpers, and WAL mode lets them run side by side.

Every multi-row write is one `BEGIN IMMEDIATE` transaction, so a reader sees an event
completely or not at all. The engine emits a step's "rollouts" event before its "step"
event, so any step visible in `steps` has all its rollouts. Query helpers that read
several tables do it inside one read transaction (one snapshot).

Every failure reaches the caller as a `StoreError` whose message says what to do; a full
disk is one of them, and the failed write leaves nothing half-saved. See `paths` for the
data-directory layout and `schema` for the tables and their migrations.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths
from .schema import (
    ACTIVE_STATUSES,
    JSON_COLUMNS,
    SCHEMA_VERSION,
    STATUSES,
    NotFoundError,
    StoreError,
    connect,
    open_database,
    translate,
    writable,
)

if TYPE_CHECKING:
    from sqlite_utils import Database

Sink = Callable[[str, dict[str, Any]], None]

STEP_COLUMNS = (
    "step",
    "round",
    "reward_mean",
    "reward_std",
    "consensus",
    "entropy",
    "invalid_rate",
    "kl",
    "loss",
    "grad_norm",
    "lr",
    "tokens",
    "seconds",
    "groups",
    "groups_skipped",
)
ROLLOUT_COLUMNS = (
    "step",
    "image_id",
    "index",
    "response",
    "answer",
    "reward",
    "components",
    "advantage",
    "trained",
    "option_order",
)
# Tables holding one session's rows, in the order they are written and deleted, each with
# the order its rows are dumped in (delete, dump and the archive all read this one list).
SESSION_TABLES: dict[str, str] = {
    "session_images": "position",
    "steps": "step",
    "rollouts": 'step, image_id, "index"',
    "answers": "phase, image_id",
    "checkpoints": "id",
    "events": "id",
    "reviews": "image_id",
}
RUN_END_STATUS = {"done": "done", "failed": "failed"}  # anything else ends as "stopped"
THUMB_PX = 128
DEFAULT_STALE_AFTER_S = 120.0
_PHASE = re.compile(r"^(before|after|round-\d+)$")


def now() -> str:
    """UTC timestamp, ISO 8601 with milliseconds (every `created`/`updated` column)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def to_json(value: Any) -> str:
    """The one JSON encoding used for JSON columns (the archive relies on it round-tripping)."""
    return json.dumps(value, ensure_ascii=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> tuple[str, int]:
    """(hash, bytes) of a file, or of a folder: sha256 over `relpath NUL filehash LF` lines
    of its files in sorted order (so a PEFT adapter folder has one hash)."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    h = hashlib.sha256()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        total += f.stat().st_size
    return h.hexdigest(), total


def write_atomic(target: Path, data: bytes) -> None:
    """Write `data` to `target` through a temporary file and a rename (never half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_path(source: Path, target: Path) -> None:
    """Copy a file or a folder (recursively) to `target`.

    Not `shutil.copytree`: it gathers per-file failures into one `shutil.Error` whose
    errno is None, so a full disk would not be recognised as one (`schema.translate`).
    Here the first `OSError` propagates as it is.
    """
    if not source.is_dir():
        shutil.copy2(source, target)
        return
    target.mkdir(parents=True, exist_ok=True)
    for child in sorted(source.iterdir()):
        copy_path(child, target / child.name)


@functools.lru_cache(maxsize=4096)  # a session holds few distinct answers, many times over
def _norm(answer: str | None) -> str | None:
    return None if answer is None else " ".join(str(answer).split()).casefold()


def _same(a: str | None, b: str | None) -> bool | None:
    return None if a is None or b is None else _norm(a) == _norm(b)


def _last_round(phases: Iterable[str]) -> str | None:
    """The "round-k" phase with the largest k, or None."""
    rounds = [p for p in phases if p.startswith("round-")]
    return max(rounds, key=lambda p: int(p[6:])) if rounds else None


def _parse_json_columns(table: str, row: dict[str, Any]) -> dict[str, Any]:
    for col in JSON_COLUMNS.get(table, ()):
        if row.get(col) is not None:
            row[col] = json.loads(row[col])
    return row


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
    if not timestamp:
        return None
    try:
        then = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    return (datetime.now(UTC) - then).total_seconds()


class _ImageFile:
    """One image's bytes ready to store: from a file path or an in-memory PIL image."""

    def __init__(self, data: bytes, ext: str, width: int, height: int, thumb: bytes) -> None:
        self.data, self.ext, self.width, self.height, self.thumb = data, ext, width, height, thumb
        self.sha256 = hashlib.sha256(data).hexdigest()


def load_image(source: Any, name: str) -> _ImageFile:
    """Read `source` (a path or a PIL image) into bytes + size + a 128 px PNG thumbnail.

    A path keeps its original bytes under the extension of the format Pillow finds in them
    (never the file's own suffix: the images folder is served, and a browser would render a
    `.html` name as a page); other formats, and PIL images, are stored as PNG.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"Cannot read image {name!r} from {path}: {exc}") from exc
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise StoreError(f"{path} is not an image Pillow can read ({exc}).") from exc
        ext = paths.ext_for_format(image.format)
        if ext is None:  # readable, but not a format served as it is: store it as PNG
            if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                image = image.convert("RGBA")  # modes PNG cannot hold (CMYK, YCbCr, F...)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data, ext = buffer.getvalue(), ".png"
    elif isinstance(source, Image.Image):
        image = source
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, ext = buffer.getvalue(), ".png"
    else:
        raise StoreError(
            f"Image {name!r} has neither a readable file path nor a PIL image "
            f"(got {type(source).__name__})."
        )
    thumb = image.copy()
    if thumb.mode not in ("RGB", "RGBA", "L", "LA"):
        thumb = thumb.convert("RGBA")
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return _ImageFile(data, ext, image.width, image.height, buffer.getvalue())


def _item_fields(item: Any) -> dict[str, Any]:
    """Normalise an item (a `ttrv.tasks.Item` or a dict) to the fields the store keeps."""
    if isinstance(item, dict):
        get = item.get
        meta = item.get("meta") or {}
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(item, key, default)

        meta = getattr(item, "meta", None) or {}
    path = get("path") or get("source") or meta.get("path")
    source: Any = path if path and Path(path).is_file() else get("image")
    if source is None:
        source = path  # let load_image report the unreadable path
    options = get("options")
    if options is not None and (
        not isinstance(options, list | tuple) or not all(isinstance(o, str) for o in options)
    ):
        raise StoreError(f"Options of image {get('name')!r} must be a list of strings.")
    label, question = get("label"), get("question")
    return {
        "image_id": get("image_id"),
        "name": get("name") or (Path(path).name if path else None),
        "source": source,
        "label": None if label is None else str(label),
        "question": question,
        "options": None if options is None else list(options),
    }


class Store:
    """All sessions of one data directory (see `sessions.paths` for its layout).

    `Store(data_dir)` opens (creating, migrating) `<data_dir>/sessions.db`; `data_dir`
    defaults to `paths.default_data_dir()`. It raises `StoreError` and changes nothing
    when the file is not an SQLite database, is damaged, belongs to another program, or was
    written by a newer schema version. Safe to share between threads. A data directory this
    process cannot write (a read-only folder or mount) opens read-only: `read_only` is True,
    reads work, and every write raises a `StoreError` that says so.
    """

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

    # -- connections and transactions ------------------------------------------------------

    def _remember(self, db: Database) -> Database:
        self._local.db = db
        self._open.add(db)
        return db

    def _db(self) -> Database:
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

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self, doing: str) -> Iterator[Database]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, so it
        never fails half-way on a lock upgrade); errors become `StoreError`."""
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
    def _read(self, doing: str) -> Iterator[Database]:
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

    @staticmethod
    def _rows(db: Database, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return list(db.query(sql, list(params)))

    def _session_row(self, db: Database, session_id: str) -> dict[str, Any]:
        rows = self._rows(db, "SELECT * FROM sessions WHERE id = ?", [session_id])
        if not rows:
            raise NotFoundError(f"No session with id {session_id!r}.")
        return rows[0]

    def _touch(self, db: Database, session_id: str, **columns: Any) -> None:
        sets = {"updated": now(), **columns}
        assignments = ", ".join(f'"{c}" = ?' for c in sets)
        cursor = db.execute(
            f"UPDATE sessions SET {assignments} WHERE id = ?", [*sets.values(), session_id]
        )
        if cursor.rowcount == 0:
            raise NotFoundError(f"No session with id {session_id!r}.")

    # -- sessions --------------------------------------------------------------------------

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
        with self._write("creating a session") as db:
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
        with self._write(f"setting session {session_id} to {status}") as db:
            self._touch(db, session_id, **columns)

    def rename_session(self, session_id: str, name: str) -> None:
        """Give a session another (non-empty) name."""
        if not str(name).strip():
            raise StoreError("The session needs a name.")
        with self._write("renaming a session") as db:
            self._touch(db, session_id, name=str(name).strip())

    def heartbeat(self, session_id: str) -> None:
        """Record that this process is alive and working on the session."""
        with self._write("recording a heartbeat") as db:
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
        with self._write("marking interrupted sessions") as db:
            active = self._rows(
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
                self._touch(db, row["id"], status="interrupted", reason=f"Interrupted: {why}.")
                marked.append(row["id"])
        return marked

    def delete_session(self, session_id: str) -> None:
        """Delete a session's rows, its adapter folder, and the images no other session
        uses. Refuses (StoreError) while the session is running or stopping."""
        with self._files_lock:
            with self._write(f"deleting session {session_id}") as db:
                row = self._session_row(db, session_id)
                if row["status"] in ACTIVE_STATUSES:
                    raise StoreError(
                        f"Session {row['name']!r} is {row['status']}; stop it before deleting "
                        "it. If its process is gone, restart the app to mark it interrupted."
                    )
                shas = {
                    r["sha256"]
                    for r in self._rows(
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
                    for r in self._rows(
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

    # -- images ----------------------------------------------------------------------------

    def _store_image_file(self, image: _ImageFile) -> tuple[str, str, bool]:
        """Write the image and its thumbnail once (content-addressed); (path, thumb, new)."""
        rel = paths.image_relpath(image.sha256, image.ext)
        thumb_rel = paths.thumb_relpath(image.sha256)
        target = self.data_dir / rel
        new = not target.exists()
        if new:
            write_atomic(target, image.data)
        if not (self.data_dir / thumb_rel).exists():
            write_atomic(self.data_dir / thumb_rel, image.thumb)
        return rel, thumb_rel, new

    def _remove_unreferenced(self, shas: Iterable[str]) -> None:
        """Remove image files (written by a failed call) that no row references."""
        db = self._db()
        for sha in shas:
            used = db.execute("SELECT 1 FROM images WHERE id = ?", [sha]).fetchone()
            if used:
                continue
            folder = self.data_dir / paths.IMAGES / sha[:2]
            for f in folder.glob(f"{sha}.*"):
                with contextlib.suppress(OSError):
                    f.unlink()

    def add_images(self, session_id: str, items: Iterable[Any]) -> list[dict[str, Any]]:
        """Add images to a session, each stored once per data directory.

        Each item is a `ttrv.tasks.Item` (its `meta["path"]`, when it is a readable file,
        gives the original bytes; else `image` is stored as PNG) or a dict with `image_id`
        (default: the sha256 of the stored bytes), `name`, `path` or `image` (PIL), `label`,
        `question`, `options`. `image_id` is the id the engine uses in its events; the
        stored file is named by the sha256 of its bytes. Re-adding an image_id updates its
        label, question and options and keeps its position. Returns the added images as
        `images()` describes them.
        """
        with self._read("adding images") as db:
            self._session_row(db, session_id)
        image_rows, links = [], []
        written: list[str] = []
        with self._files_lock:
            try:
                for item in items:  # one image in memory at a time
                    fields = _item_fields(item)
                    image = load_image(fields.pop("source"), str(fields["name"] or "image"))
                    fields["image_id"] = str(fields["image_id"] or image.sha256)
                    fields["name"] = str(fields["name"] or fields["image_id"][:12])
                    if fields["options"] is not None:
                        fields["options"] = to_json(fields["options"])
                    rel, thumb_rel, new = self._store_image_file(image)
                    if new:
                        written.append(image.sha256)
                    image_rows.append(
                        {
                            "id": image.sha256,
                            "ext": image.ext,
                            "width": image.width,
                            "height": image.height,
                            "bytes": len(image.data),
                            "path": rel,
                            "thumb": thumb_rel,
                            "created": now(),
                        }
                    )
                    links.append({"session_id": session_id, "sha256": image.sha256, **fields})
                with self._write("adding images") as db:
                    self._link_images(db, session_id, image_rows, links)
            except BaseException as exc:
                self._remove_unreferenced(written)
                if isinstance(exc, OSError):
                    raise translate(exc, "storing images") from exc
                raise
        ids = {link["image_id"] for link in links}
        return [r for r in self.images(session_id) if r["image_id"] in ids]

    def _link_images(
        self, db: Database, session_id: str, image_rows: list[dict], links: list[dict]
    ) -> None:
        self._session_row(db, session_id)
        db["images"].insert_all(image_rows, ignore=True)
        position = db.execute(
            "SELECT coalesce(max(position) + 1, 0) FROM session_images WHERE session_id = ?",
            [session_id],
        ).fetchone()[0]
        for link in links:
            old = db.execute(
                "SELECT position FROM session_images WHERE session_id = ? AND image_id = ?",
                [session_id, link["image_id"]],
            ).fetchone()
            db["session_images"].insert(
                {**link, "position": old[0] if old else position}, replace=True
            )
            position += 0 if old else 1

    def images(
        self,
        session_id: str,
        image_id: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """The session's images in order: image_id, name, position, label, question,
        options (list or None), sha256, width, height, path and thumb (absolute, or None
        for an image known only from the engine's run_start). `image_id` gives that image
        alone (or an empty list); `limit`/`offset` one page in order."""
        where, params = "si.session_id = ?", [session_id]
        if image_id is not None:
            where += " AND si.image_id = ?"
            params.append(image_id)
        where += " ORDER BY si.position"
        if limit is not None or offset:
            where += " LIMIT ? OFFSET ?"
            params += [-1 if limit is None else int(limit), int(offset)]
        keys = ("image_id", "name", "position", "label", "question", "options", "sha256",
                "width", "height", "path", "thumb")  # fmt: skip
        with self._read("listing images") as db:
            self._session_row(db, session_id)
            found = db.execute(
                "SELECT si.image_id, si.name, si.position, si.label, si.question, si.options, "
                "si.sha256, i.width, i.height, i.path, i.thumb FROM session_images si "
                f"LEFT JOIN images i ON i.id = si.sha256 WHERE {where}",
                params,
            ).fetchall()
        root = str(self.data_dir)  # os.path.join: a Path per file costs ~10 us x 20,000
        rows = []
        for values in found:
            r = dict(zip(keys, values, strict=True))
            _parse_json_columns("session_images", r)
            for key in ("path", "thumb"):
                r[key] = os.path.join(root, r[key]) if r[key] else None
            rows.append(r)
        return rows

    # -- engine events ---------------------------------------------------------------------

    def sink(self, session_id: str) -> Sink:
        """A `sink(kind, data)` for the engine that writes its events into this session.

        Every event is written in one transaction (see `ttrv.events` for the kinds).
        "run_start" marks the session running; "run_end" sets done/stopped/failed;
        "checkpoint" goes through `add_checkpoint`; "guard", "run_start", "run_end" and
        unknown kinds are kept in `events`. Raises `StoreError` on a malformed event or a
        failed write (e.g. disk full), with nothing of that event saved.
        """
        with self._read("opening a sink") as db:
            self._session_row(db, session_id)

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
        with self._write(f"saving a {kind} event") as db:
            try:
                if handler is not None:
                    handler(db, session_id, data)
                if kind not in ("answers", "step", "rollouts"):
                    self._add_event(db, session_id, kind, data)
            except KeyError as exc:
                raise StoreError(f"{kind} event without {exc} (see ttrv/events.py).") from exc

    def _add_event(self, db: Database, session_id: str, kind: str, data: Any) -> None:
        try:
            data_json = to_json(data)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{kind} event is not JSON-able: {exc}") from exc
        db["events"].insert(
            {"session_id": session_id, "kind": kind, "data": data_json, "created": now()}
        )

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
        self._touch(db, session_id, **columns)
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
        self._touch(
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
        self._touch(db, session_id)

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
        self._touch(db, session_id, heartbeat=now())

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
        with self._write("saving a step") as db:
            try:
                if rollouts is not None:
                    self._on_rollouts(db, session_id, rollouts)
                self._on_step(db, session_id, step)
            except KeyError as exc:
                raise StoreError(f"step event without {exc} (see ttrv/events.py).") from exc

    def add_event(self, session_id: str, kind: str, data: dict[str, Any]) -> None:
        """Append an event to the session's log, with no other effect (unlike `sink`,
        "run_end" here does not set the status)."""
        with self._write(f"saving a {kind} event") as db:
            self._session_row(db, session_id)
            self._add_event(db, session_id, kind, data)
            self._touch(db, session_id)

    def status(self, session_id: str) -> str:
        """The session's status alone (cheap enough to poll every step)."""
        with self._read("reading a status") as db:
            return self._session_row(db, session_id)["status"]

    def rewind(self, session_id: str, step: int, round: int) -> dict[str, int]:
        """Drop what a run recorded after a checkpoint at (`step`, `round`), before it is
        resumed from there: steps and rollouts from `step` on, answers of later rounds,
        "after" answers and later checkpoints. Returns the rows deleted per table."""
        deleted: dict[str, int] = {}
        with self._write(f"rewinding session {session_id} to step {step}") as db:
            self._session_row(db, session_id)
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
            self._touch(db, session_id)
        return deleted

    def sessions_with_checkpoint(self, path: str | os.PathLike[str]) -> list[str]:
        """Ids of the sessions that recorded a checkpoint from `path` (as the engine wrote
        it, or as stored), newest first."""
        resolved = Path(path).resolve()
        found: list[str] = []
        with self._read("finding a checkpoint's session") as db:
            rows = self._rows(
                db,
                "SELECT e.session_id, e.data FROM events e JOIN sessions s ON s.id = "
                "e.session_id WHERE e.kind = 'checkpoint' ORDER BY s.created DESC, e.id",
            )
            rows += self._rows(
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

    # -- checkpoints -----------------------------------------------------------------------

    def adapter_dir(self, session_id: str, create: bool = True) -> Path:
        """`<data_dir>/adapters/<session_id>`: where the engine should save adapters."""
        if not paths.is_session_id(session_id):
            raise StoreError(f"{session_id!r} is not a valid session id.")
        folder = self.data_dir / paths.adapter_relpath(session_id)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

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
        with self._write("recording a checkpoint") as db:
            self._session_row(db, session_id)
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
            self._add_event(db, session_id, "checkpoint", event)
            if warning:
                self._add_event(db, session_id, "warning", {"message": warning})
            self._touch(db, session_id)
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
        with self._read("listing checkpoints") as db:
            self._session_row(db, session_id)
            rows = self._rows(
                db,
                "SELECT * FROM checkpoints WHERE session_id = ? ORDER BY step, id",
                [session_id],
            )
        return [self._checkpoint_view(r) for r in rows]

    def latest_checkpoint(self, session_id: str) -> dict[str, Any] | None:
        """The checkpoint with the highest step (the last recorded on ties), or None."""
        found = self.checkpoints(session_id)
        return found[-1] if found else None

    # -- queries for the UI ----------------------------------------------------------------

    def get_session(self, session_id: str) -> dict[str, Any]:
        """The session row (config parsed back to a dict) plus `headline` numbers."""
        with self._read("reading a session") as db:
            row = _parse_json_columns("sessions", self._session_row(db, session_id))
            row["headline"] = self._headline(db, session_id)
        return row

    def list_sessions(self) -> list[dict[str, Any]]:
        """Every session, newest first, without its config: id, name, created, updated,
        model, task_kind, status, reason, error, and `headline` (see `headline`)."""
        with self._read("listing sessions") as db:
            rows = self._rows(
                db,
                "SELECT id, name, created, updated, model, task_kind, status, reason, error, "
                "heartbeat FROM sessions ORDER BY created DESC, id",
            )
            for row in rows:
                row["headline"] = self._headline(db, row["id"])
        return rows

    def _headline(self, db: Database, session_id: str) -> dict[str, Any]:
        """steps, last_step, reward_mean and consensus of the last step, images,
        compared (images with before and after answers), flipped, agreement (share of
        compared images whose answer did not change), labelled, accuracy_before/after
        (over labelled images answered in that phase; None without labels)."""
        last = self._rows(
            db,
            "SELECT step, reward_mean, consensus, (SELECT count(*) FROM steps WHERE "
            "session_id = ?1) AS steps FROM steps WHERE session_id = ?1 "
            "ORDER BY step DESC LIMIT 1",
            [session_id],
        )
        last_row = last[0] if last else {}
        # (label, before, after) per image, "after" as `_answers` picks it, in one query.
        per_image = db.execute(
            "SELECT si.label, b.answer, CASE WHEN af.image_id IS NOT NULL THEN af.answer "
            "ELSE (SELECT r.answer FROM answers r WHERE r.session_id = ?1 AND r.image_id = "
            "si.image_id AND substr(r.phase, 1, 6) = 'round-' ORDER BY "
            "CAST(substr(r.phase, 7) AS INTEGER) DESC LIMIT 1) END "
            "FROM session_images si LEFT JOIN answers b ON b.session_id = ?1 AND "
            "b.phase = 'before' AND b.image_id = si.image_id LEFT JOIN answers af ON "
            "af.session_id = ?1 AND af.phase = 'after' AND af.image_id = si.image_id "
            "WHERE si.session_id = ?1",
            [session_id],
        ).fetchall()
        compared = flipped = labelled = 0
        right = {"before": [0, 0], "after": [0, 0]}  # [correct, known] over labelled images
        for label, before, after in per_image:
            same = _same(before, after)
            if same is not None:
                compared += 1
                flipped += not same
            if label is None:
                continue
            labelled += 1
            for key, answer in (("before", before), ("after", after)):
                correct = _same(answer, label)
                if correct is not None:
                    right[key][0] += correct
                    right[key][1] += 1

        def accuracy(key: str) -> float | None:
            correct, known = right[key]
            return correct / known if known else None

        return {
            "steps": last_row.get("steps", 0),
            "last_step": last_row.get("step"),
            "reward_mean": last_row.get("reward_mean"),
            "consensus": last_row.get("consensus"),
            "images": len(per_image),
            "compared": compared,
            "flipped": flipped,
            "agreement": 1 - flipped / compared if compared else None,
            "labelled": labelled,
            "accuracy_before": accuracy("before"),
            "accuracy_after": accuracy("after"),
        }

    def metrics(self, session_id: str) -> list[dict[str, Any]]:
        """One dict per step (every StepRecord field, plus `extra` keys), ordered by step."""
        with self._read("reading metrics") as db:
            self._session_row(db, session_id)
            rows = self._rows(
                db, "SELECT * FROM steps WHERE session_id = ? ORDER BY step", [session_id]
            )
        out = []
        for r in rows:
            extra_json = r.pop("extra")
            extra = json.loads(extra_json) if extra_json else {}
            r.pop("session_id")
            r.pop("created")
            out.append({**r, **extra})
        return out

    def rollouts(self, session_id: str, image_id: str, step: int | None = None) -> list[dict]:
        """The rollouts of one image at `step` (default: the latest step that has rollouts
        for it), ordered by index, as RolloutRecord dicts."""
        with self._read("reading rollouts") as db:
            self._session_row(db, session_id)
            if step is None:
                step = db.execute(
                    "SELECT max(step) FROM rollouts WHERE session_id = ? AND image_id = ?",
                    [session_id, image_id],
                ).fetchone()[0]
            rows = self._rows(
                db,
                "SELECT * FROM rollouts WHERE session_id = ? AND image_id = ? AND step = ? "
                'ORDER BY "index"',
                [session_id, image_id, step],
            )
        for r in rows:
            r.pop("session_id")
            r["trained"] = bool(r["trained"])
            _parse_json_columns("rollouts", r)
        return rows

    def rollout_stats(self, session_id: str) -> dict[str, dict[str, Any]]:
        """{image_id: {"step", "n", "consensus", "invalid"}} at each image's latest step with
        rollouts, from the per-(image, step) summary (`image_steps`) instead of every
        rollout: consensus is the most common valid answer's share of the n rollouts,
        invalid the share without a valid answer (as `ui.charts.image_stats` computes them
        from `rollouts`)."""
        with self._read("reading rollout statistics") as db:
            self._session_row(db, session_id)
            rows = db.execute(
                "SELECT image_id, max(step), n, top, invalid FROM image_steps "
                "WHERE session_id = ? GROUP BY image_id",
                [session_id],
            ).fetchall()
        return {
            image_id: {"step": step, "n": n, "consensus": top / n, "invalid": invalid / n}
            for image_id, step, n, top, invalid in rows
        }

    def _answers(
        self,
        db: Database,
        session_id: str,
        image_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        image_ids: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        where, params = "session_id = ?", [session_id]
        if image_id is not None:
            where += " AND image_id = ?"
            params.append(image_id)
        if image_ids is not None:
            where += " AND image_id IN (SELECT value FROM json_each(?))"
            params.append(to_json(list(image_ids)))
        if limit is not None or offset:
            where += " ORDER BY position LIMIT ? OFFSET ?"
            params += [-1 if limit is None else int(limit), int(offset)]
        else:
            where += " ORDER BY position"
        keys = ("image_id", "name", "position", "label", "sha256")
        images = db.execute(
            f"SELECT {', '.join(keys)} FROM session_images WHERE {where}", params
        ).fetchall()
        if len(images) == 0:
            return []
        sql = "SELECT phase, image_id, response, answer FROM answers WHERE session_id = ?"
        answer_params: list[Any] = [session_id]
        if image_id is not None or image_ids is not None or limit is not None or offset:
            sql += f" AND image_id IN (SELECT image_id FROM session_images WHERE {where})"
            answer_params += params
        phases: dict[str, dict[str, tuple]] = {}
        for phase, iid, response, answer in db.execute(sql, answer_params):
            phases.setdefault(iid, {})[phase] = (answer, response)
        out = []
        for image in images:
            seen = phases.get(image[0], {})
            before = seen.get("before", (None, None))
            after_phase = "after" if "after" in seen else _last_round(seen)
            after = seen[after_phase] if after_phase else (None, None)
            label = image[3]
            same = _same(before[0], after[0])
            out.append(
                {
                    **dict(zip(keys, image, strict=True)),
                    "before": before[0],
                    "before_response": before[1],
                    "after": after[0],
                    "after_response": after[1],
                    "after_phase": after_phase,
                    "phases": {p: a for p, (a, _r) in seen.items()},
                    "flipped": None if same is None else not same,
                    "correct_before": _same(before[0], label),
                    "correct_after": _same(after[0], label),
                }
            )
        return out

    def flips(self, session_id: str) -> dict[str, Any]:
        """What the flip review reads, without the other images' rows: `answered` (images
        with a "before" answer and an "after" answer row) and `rows` (the `answers` rows of
        those whose answer flipped, in image order)."""
        pairs = (
            "FROM answers b JOIN answers af ON af.session_id = b.session_id AND "
            "af.image_id = b.image_id AND af.phase = 'after' JOIN session_images si ON "
            "si.session_id = b.session_id AND si.image_id = b.image_id "
            "WHERE b.session_id = ? AND b.phase = 'before' AND b.answer IS NOT NULL"
        )
        with self._read("reading flips") as db:
            self._session_row(db, session_id)
            answered = db.execute(f"SELECT count(*) {pairs}", [session_id]).fetchone()[0]
            # differing text is a superset of a flip (answers are compared normalised)
            ids = [r[0] for r in db.execute(
                f"SELECT b.image_id {pairs} AND af.answer IS NOT NULL AND af.answer != b.answer",
                [session_id],
            )]  # fmt: skip
            rows = self._answers(db, session_id, image_ids=ids) if ids else []
        return {"answered": answered, "rows": [r for r in rows if r["flipped"]]}

    def answer_phases(self, session_id: str) -> dict[str, int]:
        """{phase: answers given in it (None answers not counted)} for each phase the
        session has answer rows in: whether the baseline or the final pass has run,
        without reading every image's answers."""
        with self._read("reading answer phases") as db:
            self._session_row(db, session_id)
            rows = db.execute(
                "SELECT phase, count(answer) FROM answers WHERE session_id = ? GROUP BY phase",
                [session_id],
            ).fetchall()
        return dict(rows)

    def converged_images(self, session_id: str) -> dict[str, int]:
        """{image_id: first step at which all of its rollouts gave one valid answer}: the
        images `optim.skip_converged` drops from later rounds (`ttrv.adapt.is_converged`)."""
        with self._read("reading converged images") as db:
            self._session_row(db, session_id)
            rows = db.execute(
                "SELECT image_id, min(step) FROM image_steps WHERE session_id = ? AND "
                "invalid = 0 AND answers = 1 GROUP BY image_id",
                [session_id],
            ).fetchall()
        return {image_id: int(step) for image_id, step in rows}

    def answers(
        self,
        session_id: str,
        image_id: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Per image, in order: image_id, name, position, label, sha256, before,
        before_response, after, after_response, after_phase ("after", else the last
        "round-k" answered), phases ({phase: answer}), flipped, correct_before,
        correct_after. Answers match after trimming and case folding; flipped/correct are
        None when an answer (or the label) is missing.

        `image_id` gives that image's row alone (an empty list when the session has no such
        image); `limit`/`offset` one page of rows in image order: neither reads the rest."""
        with self._read("reading answers") as db:
            self._session_row(db, session_id)
            return self._answers(db, session_id, image_id, limit, offset)

    # -- flip review -----------------------------------------------------------------------

    def set_review_mark(self, session_id: str, image_id: str, mark: str) -> None:
        """Record which answer of a flipped image was right ("before", "after", "neither");
        "skip" removes a mark."""
        if mark not in ("before", "after", "neither", "skip"):
            raise StoreError(f"Unknown review mark {mark!r}: before, after, neither or skip.")
        with self._write("saving a review mark") as db:
            self._session_row(db, session_id)
            db.execute(
                "DELETE FROM reviews WHERE session_id = ? AND image_id = ?",
                [session_id, image_id],
            )
            if mark != "skip":
                db["reviews"].insert(
                    {"session_id": session_id, "image_id": image_id, "mark": mark, "created": now()}
                )

    def review_marks(self, session_id: str) -> dict[str, str]:
        """image_id -> mark, for the session's reviewed flips."""
        with self._read("reading review marks") as db:
            self._session_row(db, session_id)
            rows = db.execute(
                "SELECT image_id, mark FROM reviews WHERE session_id = ? ORDER BY created",
                [session_id],
            ).fetchall()
        return {image_id: mark for image_id, mark in rows}

    def compare(self, a: str, b: str) -> dict[str, Any]:
        """Two sessions side by side: {"a": session, "b": session (both as get_session),
        "config_diff": [{"key", "a", "b"}] (dotted keys), "images": [{"key", "name",
        "label", "a": answers row, "b": answers row}] for images both sessions hold
        (matched by content sha256, else by image_id)}."""
        sessions = {"a": self.get_session(a), "b": self.get_session(b)}
        per_image = {"a": self.answers(a), "b": self.answers(b)}
        keyed = {
            s: {r["sha256"] or r["image_id"]: r for r in rows} for s, rows in per_image.items()
        }
        shared = [
            {
                "key": key,
                "name": row["name"],
                "label": row["label"] if row["label"] is not None else keyed["b"][key]["label"],
                "a": row,
                "b": keyed["b"][key],
            }
            for key, row in keyed["a"].items()
            if key in keyed["b"]
        ]
        return {
            **sessions,
            "config_diff": _diff(sessions["a"]["config"], sessions["b"]["config"]),
            "images": shared,
        }

    def events(self, session_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Logged events in order: id, kind, data (parsed), created; optionally one kind."""
        sql = "SELECT id, kind, data, created FROM events WHERE session_id = ?"
        params: list[Any] = [session_id]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        with self._read("reading events") as db:
            self._session_row(db, session_id)
            rows = self._rows(db, sql + " ORDER BY id", params)
        return [_parse_json_columns("events", r) for r in rows]

    def dump(self, session_id: str) -> dict[str, list[dict[str, Any]]]:
        """Every row of the session as stored (JSON columns as text), by table, from one
        snapshot: sessions, images (those it uses), then `SESSION_TABLES`."""
        with self._read("reading a session") as db:
            out = {"sessions": [self._session_row(db, session_id)]}
            out["images"] = self._rows(
                db,
                "SELECT * FROM images WHERE id IN (SELECT sha256 FROM session_images "
                "WHERE session_id = ?) ORDER BY id",
                [session_id],
            )
            for table, order in SESSION_TABLES.items():
                out[table] = self._rows(
                    db,
                    f"SELECT * FROM {table} WHERE session_id = ? ORDER BY {order}",
                    [session_id],
                )
        return out

    # -- archives --------------------------------------------------------------------------

    def export_session(self, session_id: str, dest: str | os.PathLike[str]) -> Path:
        """Write the session to one zip archive; see `sessions.archive.export_session`."""
        from .archive import export_session

        return export_session(self, session_id, dest)

    def import_archive(self, path: str | os.PathLike[str]) -> str:
        """Restore an exported session; see `sessions.archive.import_archive`."""
        from .archive import import_archive

        return import_archive(self, path)


def _diff(a: Any, b: Any, prefix: str = "") -> list[dict[str, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [{"key": prefix.rstrip("."), "a": a, "b": b}]
