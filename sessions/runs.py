"""One recorded run: the lifecycle of an adaptation, shared by the app's worker and the CLI.

Both front ends call this module and differ only in how they show progress; two copies of
this code drifted apart once (issue 11). A `Run` records, in one session:

- start: "running" with this process's pid, and a heartbeat thread beating every
  `HEARTBEAT_S`, so any process can tell a live run from a dead one (`mark_interrupted`,
  called whenever a run begins, here and in the app);
- the engine's events (`Run.sink`): a step and its rollouts in ONE transaction (the engine
  emits "rollouts" then "step"; the rollouts wait in the sink for their step), so a run
  killed at any moment leaves no rollouts without their step;
- the end, set exactly once by `Run.finish`, after the adapter is on disk, with the
  engine's reason; a failure (or Ctrl-C) is recorded by leaving the `with` block, with a
  plain message (a full disk says so, errno kept) and no temporary folder left behind.

Resume continues the same session: what the killed run recorded after the checkpoint is
dropped (`Store.rewind`) and recorded again by the resumed run. The CLI finds the session
of a checkpoint through `session.json` in the run's output folder (`SESSION_FILE`), or
through the store's record of the checkpoint's path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import threading
import traceback as tb
from pathlib import Path
from types import TracebackType
from typing import Any

from .paths import DB_NAME
from .schema import ACTIVE_STATUSES, StoreError, translate
from .store import RUN_END_STATUS, Store

HEARTBEAT_S = 10.0  # must stay well below Store.stale_after_s (120 s)
SESSION_FILE = "session.json"  # in a CLI run's output folder: which session records it
STATE_FILE = "state.json"  # ttrv.adapt.STATE_FILE (not imported: it pulls in torch)


class DiskFullError(OSError):
    """A run failed because the disk is full; `str()` is the message to show."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def oom_message(exc: BaseException) -> str | None:
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return (
            "Out of memory. Lower the rollouts per image (N), images per step or max new "
            "tokens, or load the model in 4-bit."
        )
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def disk_full_message(exc: BaseException) -> str | None:
    """The store's disk-full message when `exc` (or what caused it) is a full disk."""
    for e in _chain(exc):
        if isinstance(e, DiskFullError):
            return str(e)
        if isinstance(e, StoreError) and str(e).startswith("The disk is full"):
            return str(e)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        full |= isinstance(e, sqlite3.Error) and "disk is full" in str(e)
        # shutil.copytree's Error keeps only the text of each failure, not its errno
        full |= isinstance(e, shutil.Error) and f"[Errno {errno.ENOSPC}]" in str(e)
        if full:
            return str(translate(OSError(errno.ENOSPC, str(e)), "recording the run"))
    return None


def failure_message(exc: BaseException) -> str:
    """What a failed run records and shows: plain words for a full disk or memory."""
    return disk_full_message(exc) or oom_message(exc) or f"{type(exc).__name__}: {exc}"


def mark_interrupted(store: Store) -> list[str]:
    """Mark the runs whose process is gone (pid dead, or heartbeat stale) "interrupted".

    Called whenever a run begins, from the CLI too, so a killed CLI run does not stay
    "running" until the app starts. A read-only store is left as it is."""
    if store.read_only:
        return []
    return store.mark_interrupted_on_start()


def checkpoint_position(checkpoint: str | os.PathLike[str]) -> tuple[int, int]:
    """(step, round) a checkpoint folder resumes from, read from its loop state."""
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text())
        return int(state["step"]), int(state["round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileNotFoundError(
            f"{checkpoint} is not a complete checkpoint (its {STATE_FILE} is missing or "
            f"unreadable: {exc}); resume from another checkpoint."
        ) from exc


def clean_temporary(store: Store, session_id: str) -> list[Path]:
    """Remove `.tmp-*` leftovers (a half-copied checkpoint) from the session's adapter
    folder; export would otherwise ship them. Returns what was removed."""
    folder = store.adapter_dir(session_id, create=False)
    removed = []
    for p in sorted(folder.glob(".tmp-*")) if folder.is_dir() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class Run:
    """A session being adapted, from start to its one final status.

    Use as a context manager around the engine::

        with Run(store, sid, resume_from=ckpt) as run:
            result = adapt(loaded, items, cfg, run.sink, run.stop_requested, ...)
            run.finish(result, adapter_file)

    Leaving the block with an exception records "failed" (Ctrl-C: "interrupted") with a
    plain message; a full disk is re-raised as `DiskFullError`. Leaving it without
    `finish` is recorded as a failure too: a run never stays "running" after it ends.
    """

    def __init__(
        self,
        store: Store,
        session_id: str,
        *,
        resume_from: str | os.PathLike[str] | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.resume_from = Path(resume_from) if resume_from else None
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.finished: str | None = None  # the final status, once recorded
        self._store_sink = store.sink(session_id)
        self._rollouts: dict[str, Any] | None = None
        self._beating = threading.Event()
        self._beat: threading.Thread | None = None
        self._owned = False  # set once this run has taken the session over

    # -- start -------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        try:
            self.begin()
        except BaseException as exc:
            self._end_failed(exc)
            raised = self._reraise(exc)
            if raised is not exc:
                raise raised from exc
            raise
        return self

    def begin(self) -> None:
        """Check the session can run here, drop what a killed run left after the resume
        point, and mark it running with a live heartbeat."""
        from .archive import imported_model_problem

        store, sid = self.store, self.session_id
        mark_interrupted(store)
        session = store.get_session(sid)
        if session["status"] in ACTIVE_STATUSES:
            raise StoreError(
                f"Session {session['name']!r} is {session['status']} in another process "
                f"(pid {session.get('pid')}, host {session.get('host')}); stop it or wait for "
                "it to end before running it again."
            )
        self._owned = True  # from here on a failure is this run's to record
        model = ((session.get("config") or {}).get("model") or {}).get("model") or session["model"]
        problem = imported_model_problem(store, sid, model)
        if problem:
            raise FileNotFoundError(problem)
        clean_temporary(store, sid)
        if self.resume_from is not None:
            step, rnd = checkpoint_position(self.resume_from)
            deleted = store.rewind(sid, step, rnd)
            store.add_event(
                sid,
                "resumed",
                {
                    "checkpoint": str(self.resume_from),
                    "step": step,
                    "round": rnd,
                    "previous_status": session["status"],
                    "previous_reason": session.get("reason"),
                    "dropped": deleted,
                },
            )
        store.set_status(sid, "running")
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._beating.wait(self.heartbeat_s):
                # A missed beat is harmless; only a long silence marks the run interrupted.
                with contextlib.suppress(Exception):
                    self.store.heartbeat(self.session_id)

        self._beat = threading.Thread(target=beat, name=f"heartbeat-{self.session_id}", daemon=True)
        self._beat.start()

    def _stop_heartbeat(self) -> None:
        self._beating.set()
        if self._beat is not None:
            self._beat.join(max(1.0, self.heartbeat_s))

    # -- during the run -----------------------------------------------------------------------

    def sink(self, kind: str, data: dict[str, Any]) -> None:
        """The engine's sink (see `ttrv.events`) for this session."""
        if kind == "rollouts":
            self._rollouts = data  # written with its step, in one transaction
        elif kind == "step":
            rollouts, self._rollouts = self._rollouts, None
            if rollouts is not None and rollouts.get("step") != data.get("step"):
                raise StoreError(
                    f"rollouts of step {rollouts.get('step')} arrived before step "
                    f"{data.get('step')}: the engine emits a step's rollouts just before it."
                )
            self.store.record_step(self.session_id, data, rollouts)
        elif kind == "run_end":
            # Logged only: the status is set by `finish`, once the adapter is on disk.
            self.store.add_event(self.session_id, kind, data)
        else:
            self._store_sink(kind, data)

    def stop_requested(self) -> bool:
        """The engine's stop flag: someone asked (the app's Stop) for this session."""
        return self.store.status(self.session_id) == "stopping"

    def record_review(self, review: dict[str, Any]) -> None:
        """A flip review played after the run (`ttrv.cli.play_review`): its marks and the
        decision, as the app's review records them."""
        self._store_sink("review_applied", {"decision": review["applied"], **review})
        for image_id, mark in review["marks"].items():
            self.store.set_review_mark(self.session_id, image_id, mark)

    # -- the end --------------------------------------------------------------------------------

    def finish(self, result: Any, adapter: str | os.PathLike[str] | None) -> str:
        """Record the end of a run that returned `result` (`ttrv.adapt.AdaptResult`).

        `adapter`: the final adapter as written (file or folder); it must exist, so a
        session never reads "done" without its weights on disk. When the engine wrote no
        checkpoint it is recorded as one. Returns the final status."""
        if adapter is None or not Path(adapter).exists():
            raise FileNotFoundError(f"The run's adapter was not written ({adapter}).")
        if result.checkpoint is None:
            folder = Path(adapter)
            folder = folder.parent if folder.is_file() else folder
            self.store.add_checkpoint(self.session_id, -1, result.steps, folder)
        status = RUN_END_STATUS.get(result.status, "stopped")
        reason = f"{result.status}: {result.reason or ''}".rstrip(": ")
        self.store.set_status(self.session_id, status, reason=reason)
        self.finished = status
        return status

    def _end_failed(self, exc: BaseException) -> None:
        """Record a failure (best effort: on a full disk even this write may fail; then
        the stopped heartbeat lets `mark_interrupted` tell later) and clean up."""
        self._stop_heartbeat()
        if not self._owned:  # e.g. the session is running elsewhere: not ours to end
            return
        if isinstance(exc, KeyboardInterrupt):
            status, error, reason = "interrupted", None, "Interrupted: stopped with Ctrl-C."
        else:
            status, error, reason = "failed", failure_message(exc), None
        with contextlib.suppress(Exception):
            self.store.set_status(
                self.session_id,
                status,
                error=error,
                traceback="".join(tb.format_exception(exc)),
                reason=reason,
            )
            self.finished = status
        with contextlib.suppress(Exception):
            clean_temporary(self.store, self.session_id)

    @staticmethod
    def _reraise(exc: BaseException) -> BaseException:
        message = disk_full_message(exc)
        return DiskFullError(message) if message and not isinstance(exc, DiskFullError) else exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if exc is None and self.finished is None:
            exc = RuntimeError("the run ended without recording its result")
            self._end_failed(exc)
            raise exc
        if exc is not None and self.finished is not None:
            # Failed after its end was recorded (the adapter is on disk): the status stays.
            self._stop_heartbeat()
            return
        if exc is not None:
            self._end_failed(exc)
            raised = self._reraise(exc)
            if raised is not exc:
                raise raised from exc
            return
        self._stop_heartbeat()
        with contextlib.suppress(Exception):
            clean_temporary(self.store, self.session_id)


# -- the CLI's recorded run ----------------------------------------------------------------


def run_folder(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The output folder of the run a checkpoint belongs to (`<out>/checkpoints/<tag>`),
    when it looks like one (it holds the run's config.json)."""
    folder = Path(checkpoint).resolve().parent.parent
    return folder if (folder / "config.json").is_file() else None


def _session_file(out: Path) -> dict[str, Any] | None:
    path = out / SESSION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("session_id") else None


def checkpoint_session(
    checkpoint: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None
) -> tuple[Store, str | None]:
    """The store and the session a checkpoint belongs to (None when none recorded it):
    `session.json` in the checkpoint's run folder first, else the store's record of it."""
    folder = run_folder(checkpoint)
    recorded = _session_file(folder) if folder else None
    if recorded and data_dir is None:
        data_dir = recorded.get("data_dir")
    store = Store(data_dir)
    if recorded:
        with contextlib.suppress(StoreError):
            store.get_session(recorded["session_id"])
            return store, recorded["session_id"]
    found = store.sessions_with_checkpoint(checkpoint)
    return store, found[0] if found else None


def cli_run(
    data_dir: str | os.PathLike[str] | None,
    out: Path,
    cfg: Any,
    items: list[Any],
    name: str | None = None,
    resume_from: str | os.PathLike[str] | None = None,
) -> Run:
    """The `Run` of `python -m ttrv adapt --store`: a new session for a new run, or, with
    `resume_from`, the session that checkpoint belongs to (a checkpoint no session recorded
    starts a new one that says so). Writes `session.json` into `out`."""
    if resume_from:
        store, sid = checkpoint_session(resume_from, data_dir)
    else:
        store, sid = Store(data_dir), None
    if sid is None:
        sid = store.create_session(name or out.name, cfg.to_dict(), cfg.model.model, cfg.task.kind)
        store.add_images(sid, items)
        if resume_from:
            _adopt_checkpoint(store, sid, Path(resume_from))
    (out / SESSION_FILE).write_text(
        json.dumps({"session_id": sid, "data_dir": str(store.data_dir)}, indent=1)
    )
    return Run(store, sid, resume_from=resume_from)


def image_rows(store: Store, sid: str) -> list[dict[str, Any]]:
    """What a run needs of a session's images (no pixels): id, name, path, question,
    options and label, in order. Plain data, so one process can hand them to the others
    of a data-parallel run."""
    keys = ("image_id", "name", "path", "question", "options", "label")
    return [{k: row.get(k) for k in keys} for row in store.images(sid)]


def load_session_items(rows: list[dict[str, Any]]) -> list[Any]:
    """The engine's items for `image_rows`, pixels read from the data directory; a missing
    file or an empty session is refused with a message that says so."""
    from ttrv.images import load_image
    from ttrv.tasks import Item

    items = []
    for row in rows:
        path = row.get("path")
        if not path or not Path(path).exists():
            raise FileNotFoundError(
                f"Image {row.get('name')} of this session is missing from the data "
                f"directory ({path})."
            )
        fields = {k: row.get(k) for k in ("image_id", "name", "question", "options", "label")}
        items.append(Item(image=load_image(path), **fields))
    if not items:
        raise ValueError("This session has no images: add at least one image.")
    return items


def existing_store(data_dir: str | os.PathLike[str] | None) -> Store:
    """The app's store in `data_dir`, which must hold one already (never created here: a
    mistyped folder is an error, not a new empty store)."""
    if data_dir is None or not (Path(data_dir) / DB_NAME).is_file():
        raise StoreError(
            f"No session store in {data_dir}: --data-dir names the app's data directory "
            f"(the one holding {DB_NAME})."
        )
    return Store(data_dir)


def session_data(data_dir: str | os.PathLike[str] | None, sid: str) -> tuple[dict, list]:
    """(config, `image_rows`) of a session the app created, for `adapt --session`."""
    store = existing_store(data_dir)
    return store.get_session(sid)["config"], image_rows(store, sid)


def session_run(
    data_dir: str | os.PathLike[str] | None,
    sid: str,
    out: Path,
    resume_from: str | os.PathLike[str] | None = None,
) -> Run:
    """The `Run` of `python -m ttrv adapt --session SID`: a run of a session the app
    created (its config and images), as the app's worker starts one on several devices."""
    store = existing_store(data_dir)
    store.get_session(sid)  # a wrong id is refused with the store's message
    (out / SESSION_FILE).write_text(
        json.dumps({"session_id": sid, "data_dir": str(store.data_dir)}, indent=1)
    )
    return Run(store, sid, resume_from=resume_from)


def _adopt_checkpoint(store: Store, sid: str, checkpoint: Path) -> None:
    """A new session for a checkpoint of an unrecorded run: it gets the run's "before"
    answers (kept in the checkpoint) and a warning that its earlier steps are missing."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    store.sink(sid)("answers", {"phase": "before", "answers": state.get("before") or []})
    store.add_event(
        sid,
        "warning",
        {
            "message": f"Resumed from {checkpoint}, a checkpoint of a run no session recorded: "
            f"its first {state.get('step', 0)} steps are not in this session."
        },
    )
