"""What the tabs share: the store, the per-browser-tab states, and error handling.

The UI only writes to the store (sessions, images, jobs, stop requests) and reads it back;
it never calls the worker or the engine. Per browser tab it keeps two `gr.State`s: the
current session id and the draft images (`ui.draft`).

Every handler is wrapped in `guarded`: an exception becomes a readable message in the
handler's status Markdown and a `gr.Warning` toast, never a stack trace or a spinner
that does not end.
"""

from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from sessions import jobs
from sessions.schema import StoreError
from sessions.store import Store
from ttrv.config import ConfigError

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running", "stopping")


@dataclass
class Context:
    """Handed to every tab's `build`: the store, shared states and the config forms."""

    store: Store
    demo_dir: Path
    session: gr.State  # current session id (str | None)
    draft: gr.State  # list of draft image dicts
    forms: dict[str, Any] = field(default_factory=dict)  # "section__field" -> component
    # Called with the session-changing event; tabs add (fn, inputs, outputs) refreshers.
    refreshers: list[tuple[Callable, list, list, tuple | None]] = field(default_factory=list)
    # Run once when a page opens (after the current session is picked).
    loaders: list[tuple[Callable, list, list]] = field(default_factory=list)
    header: Any = None  # the Markdown naming the current session
    # Events that set `session`; the workbench chains every refresher after each.
    session_events: list[Any] = field(default_factory=list)
    # Components one tab shows and another tab's events update, by name.
    parts: dict[str, Any] = field(default_factory=dict)
    tabs: Any = None  # the gr.Tabs, so that a page load can select the running run's tab

    def on_session_change(
        self, fn: Callable, inputs: list, outputs: list, then: tuple | None = None
    ) -> None:
        """Refresh `outputs` whenever the current session changes (and on page load);
        `then` = (fn, inputs, outputs) runs after it."""
        self.refreshers.append((fn, inputs, outputs, then))

    def on_load(self, fn: Callable, inputs: list, outputs: list) -> None:
        self.loaders.append((fn, inputs, outputs))


# -- messages ----------------------------------------------------------------------------------


def ok(text: str) -> str:
    return f"<span class='ttrv-ok'>✓</span> {text}"


def info(text: str) -> str:
    return f"<span class='ttrv-info'>ℹ</span> {text}"


def error(text: str) -> str:
    return f"<span class='ttrv-err'>✗</span> {text}"


def bullet_list(lines: list[str], limit: int = 12) -> str:
    shown = [f"- {html.escape(line)}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"- … and {len(lines) - limit} more")
    return "\n".join(shown)


def guarded(outputs: int, status: int | None = 0, warn: bool = True) -> Callable:
    """Wrap a handler with `outputs` outputs: on an exception, put a readable message in
    output `status` (None: no such output), leave the others unchanged, and (when `warn`)
    show a toast."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a message
                message = describe(exc)
                if not isinstance(exc, ValueError | LookupError | OSError | StoreError):
                    log.exception("handler %s failed", fn.__name__)
                if warn:
                    gr.Warning(message)
                out = [gr.skip()] * outputs
                if status is not None:
                    out[status] = error(html.escape(message))
                return out[0] if outputs == 1 else tuple(out)

        return wrapper

    return deco


def describe(exc: BaseException) -> str:
    """The message a user sees for an exception (our errors already say what to do)."""
    if isinstance(exc, ConfigError | StoreError):
        return str(exc)
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, ValueError | FileNotFoundError | PermissionError):
        return text
    return f"{type(exc).__name__}: {text}"


# -- sessions ----------------------------------------------------------------------------------


def pick_session(store: Store) -> str | None:
    """The session a freshly opened tab shows: the running adaptation, else the newest."""
    for job in jobs.active(store):
        if job["kind"] == "adapt" and job.get("session_id"):
            return job["session_id"]
    sessions = store.list_sessions()
    for s in sessions:
        if s["status"] in ACTIVE:
            return s["id"]
    return sessions[0]["id"] if sessions else None


def session_choices(store: Store) -> list[tuple[str, str]]:
    """(label, id) for dropdowns, newest first."""
    return [(f"{s['name']} · {s['status']} · {s['id']}", s["id"]) for s in store.list_sessions()]


def header_text(store: Store, session_id: str | None) -> str:
    """The line at the top of the page naming the current session."""
    if not session_id:
        return "**No session yet.** Add images, pick a task, then start an adaptation."
    try:
        s = store.get_session(session_id)
    except Exception:  # noqa: BLE001 - deleted meanwhile
        return "**No session selected.**"
    reason = s.get("reason") or ""
    if reason.startswith(f"{s['status']}: "):  # "stopped: stop requested" after "stopped"
        reason = reason[len(s["status"]) + 2 :]
    extra = f" — {html.escape(reason)}" if reason else ""
    if s.get("error"):
        extra = f" — {html.escape(s['error'])}"
    return (
        f"**Current session:** {html.escape(s['name'])} · `{s['id']}` · "
        f"<span class='ttrv-status ttrv-{s['status']}'>{s['status']}</span>{extra}"
    )
