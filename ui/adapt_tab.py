"""Adapt tab: hyperparameters, start / stop / resume, live progress and curves.

Start validates the whole config (every tab's form), creates the session in the store with
the draft images and submits an "adapt" job (the baseline answers are part of it). The
worker does the rest; this tab polls the store with a `gr.Timer` and redraws only when the
session changed since the last tick.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr

from sessions import jobs
from sessions.schema import StoreError
from ttrv.tasks import Item, build_prompt

from . import charts, forms
from . import draft as drafts
from .state import ACTIVE, Context, error, guarded, header_text, info, ok

TICK_S = 2.0
RESUMABLE = ("stopped", "interrupted", "failed")


def _age(stamp: str | None, until: str | None = None) -> float | None:
    if not stamp:
        return None
    start = datetime.fromisoformat(stamp)
    end = datetime.fromisoformat(until) if until else datetime.now(UTC)
    return max(0.0, (end - start).total_seconds())


def check_prompts(cfg: Any, draft: list[dict[str, Any]]) -> None:
    """Build every image's prompt once, so a task that cannot be asked of an image (a
    multiple-choice task without options, ...) is refused before anything starts."""
    for d in draft:
        build_prompt(cfg.task, Item(d["image_id"], d["name"], None, d.get("question"),
                                    d.get("options")))  # fmt: skip


def default_name(cfg: Any, n_images: int) -> str:
    model = Path(cfg.model.model).name or cfg.model.model
    return f"{model} · {cfg.task.kind} · {n_images} images · {time.strftime('%b %d %H:%M')}"


def build(ctx: Context) -> dict[str, Any]:
    sections = {}
    for section, title, open_ in (
        ("rollout", "Rollouts", True),
        ("optim", "Optimisation", True),
        ("reward", "Reward", False),
        ("guard", "Guard", False),
    ):
        with gr.Accordion(title, open=open_):
            sections[section] = forms.build_section(section, columns=4)
            ctx.forms.update(sections[section])
    with gr.Row():
        name = gr.Textbox(label="Session name (optional)", scale=3, elem_id="session-name")
        start_btn = gr.Button("▶ Start adaptation", variant="primary", scale=1,
                              elem_id="start-btn")  # fmt: skip
        stop_btn = gr.Button("■ Stop", variant="stop", scale=0, elem_id="stop-btn")
        resume_btn = gr.Button("⟳ Resume", scale=0, elem_id="resume-btn")
    status = gr.Markdown(elem_id="adapt-status")
    progress = gr.HTML(elem_id="progress")
    curves = gr.Plot(label="Training curves", show_label=False, elem_id="curves")
    timer = gr.Timer(TICK_S)
    seen = gr.State(None)  # what the last redraw showed, so unchanged ticks skip

    @guarded(outputs=4)
    def start(draft: list, session_name: str, **values: Any) -> tuple:
        cfg = forms.config_from_values(values)
        if not draft:
            raise ValueError(
                "No images to adapt on: add some in the Images tab (or click Load demo images)."
            )
        check_prompts(cfg, draft)
        busy = [j for j in jobs.active(ctx.store) if j["kind"] == "adapt"]
        if busy:
            raise StoreError(
                f"Another adaptation (session {busy[0]['session_id']}) is queued or running; "
                "one runs at a time. Stop it or wait for it to finish."
            )
        sid = ctx.store.create_session(
            (session_name or "").strip() or default_name(cfg, len(draft)),
            cfg.to_dict(), cfg.model.model, cfg.task.kind,
        )  # fmt: skip
        try:
            ctx.store.add_images(sid, drafts.to_store_items(draft))
            jobs.submit(ctx.store, "adapt", {"resume": False}, sid)
        except BaseException:
            ctx.store.delete_session(sid)  # a refused start leaves nothing behind
            raise
        n_steps = charts.total_steps(len(draft), cfg.optim.rounds, cfg.optim.images_per_step)
        return (
            ok(f"Started session `{sid}`: {len(draft)} images, up to {n_steps} steps. "
               "You can close this tab; the run goes on and a reload re-attaches."),
            sid, header_text(ctx.store, sid), None,
        )  # fmt: skip

    @guarded(outputs=1)
    def stop(sid: str | None) -> str:
        if not sid:
            return error("No current session to stop.")
        return info(jobs.request_stop(ctx.store, sid))

    @guarded(outputs=2)
    def resume(sid: str | None) -> tuple:
        if not sid:
            return error("No current session: open one in the Sessions tab."), gr.skip()
        session = ctx.store.get_session(sid)
        if session["status"] not in RESUMABLE:
            return error(
                f"Session {session['name']!r} is {session['status']}; only stopped, "
                "interrupted or failed sessions can be resumed."
            ), gr.skip()
        ckpt = ctx.store.latest_checkpoint(sid)
        if ckpt is None or ckpt["missing"]:
            return error(
                "This session has no checkpoint to resume from (it stopped before its first "
                "save): start a new adaptation instead."
            ), gr.skip()
        jobs.submit(ctx.store, "adapt", {"resume": True}, sid)
        return ok(f"Resuming from step {ckpt['step']}."), None

    def redraw(sid: str | None, last: Any = None) -> tuple:
        """(progress, curves, header, fingerprint); all skipped when nothing changed."""
        if not sid:
            empty = "<div class='ttrv-progress' data-done='0' data-total='0'>No session.</div>"
            return empty, None, header_text(ctx.store, None), None
        try:
            session = ctx.store.get_session(sid)
        except Exception as exc:  # noqa: BLE001 - deleted meanwhile, or a locked store
            return error(str(exc)), gr.skip(), header_text(ctx.store, None), None
        fingerprint = [sid, session["status"], session["updated"], session["headline"]["steps"]]
        active = session["status"] in ACTIVE
        if fingerprint == last and not active:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        steps = ctx.store.metrics(sid)
        p = charts.progress(steps, session["config"], session["headline"]["images"],
                            session["status"])  # fmt: skip
        answers = ctx.store.answers(sid) if active else []
        phase = charts.phase_text(
            p, any(a["before"] is not None for a in answers),
            any(a["after_phase"] == "after" for a in answers),
        )  # fmt: skip
        if not active and session.get("reason"):
            phase = session["reason"]
        if session.get("error"):
            phase = f"failed: {session['error']}"
        job = jobs.latest(ctx.store, "adapt", sid)
        elapsed = _age(job.get("started"), job.get("finished")) if job else None
        changed = fingerprint != last
        return (
            charts.progress_html(p, phase, elapsed),
            (charts.curves_figure({session["name"]: steps}) if steps else None)
            if changed
            else gr.skip(),
            header_text(ctx.store, sid) if changed else gr.skip(),
            fingerprint,
        )

    def tick(sid: str | None, last: Any) -> tuple:
        if not sid and last is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return redraw(sid, last)

    started = start_btn.click(start, [ctx.draft, name], [status, ctx.session, ctx.header, seen],
                    inputs_kwargs=dict(ctx.forms), api_name="start")  # fmt: skip
    stop_btn.click(stop, ctx.session, status, api_name="stop")
    resume_btn.click(resume, ctx.session, [status, seen], api_name="resume")
    timer.tick(tick, [ctx.session, seen], [progress, curves, ctx.header, seen],
               show_progress="hidden", api_name="progress")  # fmt: skip
    ctx.on_session_change(redraw, [ctx.session], [progress, curves, ctx.header, seen])
    ctx.session_events.append(started)
    return {"start": start_btn}
