"""Adapt tab, the first screen: model, images, task and Start in one place, the advanced
settings folded, then live progress, the finished run's headline and the curves.

Start validates the whole config (every tab's form), checks the model and the task
against it (`ui.checks`), creates the session in the store with the draft images and
submits an "adapt" job (the baseline answers are part of it). The worker does the rest;
this tab polls the store with a `gr.Timer` and redraws only when the session changed
since the last tick. While a run is active the settings forms show its settings,
read-only (also after a reload).
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

from . import charts, checks, exports, forms, images_tab, model_card, model_tab, presets, task_tab
from . import draft as drafts
from .state import ACTIVE, Context, bullet_list, error, guarded, header_text, info, ok

TICK_S = 2.0
RESUMABLE = ("stopped", "interrupted", "failed")
ADVANCED = (  # (section, title) folded under "Advanced settings"
    ("rollout", "Rollouts"),
    ("optim", "Optimisation"),
    ("reward", "Reward"),
    ("guard", "Guard"),
)
QUICK_GALLERY = 24  # thumbnails on the first screen (the Images tab shows them all)


def _age(stamp: str | None, until: str | None = None) -> float | None:
    if not stamp:
        return None
    start = datetime.fromisoformat(stamp)
    end = datetime.fromisoformat(until) if until else datetime.now(UTC)
    return max(0.0, (end - start).total_seconds())


def run_seconds(adapt_jobs: list[dict[str, Any]]) -> float | None:
    """Time spent running, summed over a session's adapt jobs (so Resume adds to it)."""
    spans = [_age(j.get("started"), j.get("finished")) for j in adapt_jobs if j.get("started")]
    return sum(s for s in spans if s is not None) if spans else None


def check_prompts(cfg: Any, draft: list[dict[str, Any]]) -> None:
    """Build every image's prompt once, so a task that cannot be asked of an image (a
    multiple-choice task without options, ...) is refused before anything starts."""
    for d in draft:
        build_prompt(cfg.task, Item(d["image_id"], d["name"], None, d.get("question"),
                                    d.get("options")))  # fmt: skip


def default_name(cfg: Any, n_images: int) -> str:
    model = Path(cfg.model.model).name or cfg.model.model
    return f"{model} · {cfg.task.kind} · {n_images} images · {time.strftime('%b %d %H:%M')}"


def task_text(kind: str, question: str, options: str, model: str) -> str:
    """The first screen's one-paragraph view of the task, with the model's caveats."""
    text = f"**{(kind or '-').replace('_', ' ')}** · asks *{question or '-'}*"
    if kind in ("classes", "multiple_choice") and options:
        text += f" · options `{options}`"
    notes = checks.task_notes(model, _task(kind, question, options))
    if notes:
        text += "\n\n" + "\n".join(f"⚠ {n}" for n in notes)
    return text + "\n\nAll task settings and the exact prompt: **Task** tab."


def _task(kind: str, question: str, options: str) -> Any:
    from ttrv.config import TaskConfig

    try:
        return TaskConfig(kind=kind, question=question or "", options=options or "")
    except Exception:  # noqa: BLE001 - a half-typed task: no caveats yet
        return TaskConfig()


def build(ctx: Context) -> dict[str, Any]:
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=300):
            gr.Markdown("#### 1 · Model")
            # Only the model itself here; how it loads (quantisation, ...) is on the Model tab.
            model_form = forms.build_section(
                "model", only=("model",), overrides={"model": model_tab.model_picker}, columns=1
            )
            ctx.forms.update(model_form)
            with gr.Accordion("What this model knows", open=True):
                card = gr.Markdown(elem_id="model-card", max_height=260)
        with gr.Column(scale=4, min_width=300):
            gr.Markdown("#### 2 · Images")
            with gr.Row():
                demo_btn = gr.Button("Load demo images", variant="primary", size="sm",
                                     elem_id="quick-demo")  # fmt: skip
                upload = gr.UploadButton("Add images…", file_count="multiple", size="sm",
                                         elem_id="quick-upload")  # fmt: skip
            images_md = gr.Markdown(drafts.summary([]), elem_id="quick-images")
            gallery = gr.Gallery(columns=4, height=150, allow_preview=False, show_label=False,
                                 elem_id="quick-gallery", elem_classes=["ttrv-gallery"])  # fmt: skip
            domain = gr.Markdown(elem_id="quick-domain")
        with gr.Column(scale=3, min_width=260):
            gr.Markdown("#### 3 · Task")
            preset = gr.Radio(list(task_tab.PRESETS), value="Open question", label="Preset",
                              elem_id="quick-preset")  # fmt: skip
            task_md = gr.Markdown(elem_id="quick-task")
    gr.Markdown("#### 4 · Run")
    with gr.Row():
        name = gr.Textbox(label="Session name (optional)", scale=3, elem_id="session-name")
        start_btn = gr.Button("▶ Start adaptation", variant="primary", scale=1,
                              elem_id="start-btn")  # fmt: skip
        stop_btn = gr.Button("■ Stop", variant="stop", scale=0, elem_id="stop-btn")
        resume_btn = gr.Button("⟳ Resume", scale=0, elem_id="resume-btn")
    status = gr.Markdown(elem_id="adapt-status")
    with gr.Accordion("Advanced settings (defaults follow the paper)", open=False,
                      elem_id="advanced"):  # fmt: skip
        for section, title in ADVANCED:
            with gr.Accordion(title, open=section in ("rollout", "optim"),
                              elem_id=f"adv-{section}"):  # fmt: skip
                ctx.forms.update(forms.build_section(section, columns=4))
        with gr.Row():
            cli_btn = gr.Button("Show as a command line", size="sm", scale=0,
                                elem_id="cli-btn")  # fmt: skip
            gr.Markdown("The same run headless, with every setting that differs from the "
                        "defaults (all tabs' settings).")  # fmt: skip
        cli_box = gr.Code(language="shell", visible=False, elem_id="cli-command",
                          label="python -m ttrv adapt …")  # fmt: skip
        with gr.Row(equal_height=True):
            preset_name = gr.Textbox(label="Preset name", scale=2, elem_id="preset-name",
                                     placeholder="e.g. digits mc, lr 1e-4")  # fmt: skip
            save_preset_btn = gr.Button("Save preset", size="sm", scale=0,
                                        elem_id="preset-save")  # fmt: skip
            preset_pick = gr.Dropdown(label="Saved presets", choices=[], scale=2,
                                      elem_id="preset-pick", allow_custom_value=True)  # fmt: skip
            load_preset_btn = gr.Button("Load preset", size="sm", scale=0,
                                        elem_id="preset-load")  # fmt: skip
    progress = gr.HTML(elem_id="progress")
    headline = gr.Markdown(elem_id="run-headline")
    with gr.Accordion("Run log", open=False, elem_id="run-log-box"):
        log = gr.Markdown("Nothing logged yet.", elem_id="run-log", max_height=240)
    curves = gr.Plot(label="Training curves", show_label=False, elem_id="curves")
    timer = gr.Timer(TICK_S)
    seen = gr.State(None)  # what the last redraw showed, so unchanged ticks skip

    @guarded(outputs=4)
    def start(draft: list, session_name: str, **values: Any) -> tuple:
        # A run in progress is the first thing to say: its form is read-only anyway.
        busy = [j for j in jobs.active(ctx.store) if j["kind"] == "adapt"]
        if busy:
            raise StoreError(
                f"Another adaptation (session {busy[0]['session_id']}) is queued or running; "
                "one runs at a time. Stop it or wait for it to finish."
            )
        cfg = forms.config_from_values(values)
        if not draft:
            raise ValueError(
                "No images to adapt on: click Load demo images or Add images… above (or use "
                "the Images tab)."
            )
        where = checks.check_model(cfg.model)
        devices = checks.check_devices(cfg.model)
        if devices:
            where += f", {devices}"
        check_prompts(cfg, draft)
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
        n_adapt = charts.adapted_images(len(draft), cfg.to_dict())
        n_steps = charts.total_steps(n_adapt, cfg.optim.rounds, cfg.optim.images_per_step)
        notes = checks.task_notes(cfg.model.model, cfg.task)
        if model_card.domain_warning(cfg.model.model, draft):
            notes.append("Some images do not look like this model's training data (see above).")
        return (
            ok(f"Started session `{sid}` on the {where}: {len(draft)} images, up to {n_steps} "
               "steps. You can close this tab; the run goes on and a reload re-attaches.")
            + ("\n\n" + bullet_list(notes) if notes else ""),
            sid, header_text(ctx.store, sid), None,
        )  # fmt: skip

    @guarded(outputs=2, status=1)
    def as_command(draft: list, **values: Any) -> tuple:
        cfg = forms.config_from_values(values)
        images, labels = exports.image_args(draft or [], ctx.demo_dir)
        return gr.Code(exports.cli_command(cfg, images, labels), visible=True), ""

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

    @guarded(outputs=2)
    def save_preset(name: str, **values: Any) -> tuple:
        cfg = forms.config_from_values(values)  # only valid settings are saved
        saved, replaced = presets.save(ctx.store.data_dir, name, cfg)
        verb = "Replaced" if replaced else "Saved"
        return (ok(f"{verb} preset {saved!r} (every tab's settings)."),
                gr.Dropdown(choices=presets.names(ctx.store.data_dir), value=saved))  # fmt: skip

    def preset_choices(current: str | None = None) -> Any:
        choices = presets.names(ctx.store.data_dir)
        return gr.Dropdown(choices=choices, value=current if current in choices else None)

    form_keys = list(ctx.forms)  # grows as later tabs build theirs; read in `wire`

    def lock(session: dict[str, Any], active: bool, last: Any) -> list[Any]:
        """The forms as the run sees them: its settings, read-only, while it is active;
        editable again once the run that locked them ended. Untouched otherwise (an update
        could overwrite what the user is typing)."""
        if not active:
            was_locked = bool(last) and last[1] in ACTIVE
            return [gr.update(interactive=True) if was_locked else gr.skip() for _ in form_keys]
        out = []
        for k in form_keys:
            section, field = k.split(forms.SEP, 1)
            values = session["config"].get(section, {})
            out.append(gr.update(value=values[field], interactive=False) if field in values
                       else gr.update(interactive=False))  # fmt: skip
        return out

    def redraw(sid: str | None, last: Any = None) -> tuple:
        """(progress, curves, header, fingerprint, status, headline, log, *forms);
        skipped parts when nothing changed."""
        skip_forms = [gr.skip()] * len(form_keys)
        if not sid:
            empty = "<div class='ttrv-progress' data-done='0' data-total='0'>No session.</div>"
            return (empty, None, header_text(ctx.store, None), None, gr.skip(), "", "",
                    *lock({}, False, last))  # fmt: skip
        try:
            fingerprint = ctx.store.session_state(sid)  # cheap: no per-image aggregate
            active = fingerprint[1] in ACTIVE
            if fingerprint == last and not active:
                return (gr.skip(),) * 7 + tuple(skip_forms)
            session = ctx.store.get_session(sid)
        except Exception as exc:  # noqa: BLE001 - deleted meanwhile, or a locked store
            return (error(str(exc)), gr.skip(), header_text(ctx.store, None), None, gr.skip(),
                    "", gr.skip(), *skip_forms)  # fmt: skip
        steps = ctx.store.metrics(sid)
        converged = ctx.store.converged_images(sid) if steps else {}
        p = charts.progress(steps, session["config"], session["headline"]["images"],
                            session["status"], converged)  # fmt: skip
        phases = ctx.store.answer_phases(sid) if active else {}  # not every image's answers
        phase = charts.phase_text(p, phases.get("before", 0) > 0, "after" in phases)
        if not active and session.get("reason"):
            phase = session["reason"]
        if session.get("error"):
            phase = f"failed: {session['error']}"
        session_jobs = jobs.of_session(ctx.store, sid)
        elapsed = run_seconds([j for j in session_jobs if j["kind"] == "adapt"])
        changed = fingerprint != last
        was_active = bool(last) and last[0] == sid and last[1] in ACTIVE
        # "Stopping after the current step" (or "Started …") must not outlive the run.
        ended = was_active and not active
        events = ctx.store.events(sid) if changed else []
        return (
            charts.progress_html(p, phase, elapsed, charts.plan_note(p, session["config"])),
            (charts.curves_figure({session["name"]: steps}) if steps else None)
            if changed
            else gr.skip(),
            header_text(ctx.store, sid) if changed else gr.skip(),
            fingerprint,
            info(f"The run ended: {session['status']} — {phase}.") if ended else gr.skip(),
            charts.run_headline(session, events) if changed else gr.skip(),
            charts.run_log(events, session_jobs) if changed else gr.skip(),
            *(lock(session, active, last) if changed else skip_forms),
        )

    def tick(sid: str | None, last: Any) -> tuple:
        if not sid and last is None:
            return (gr.skip(),) * (7 + len(form_keys))
        return redraw(sid, last)

    def quick_demo(current: list) -> tuple:
        paths, csv = images_tab.demo_files(ctx.demo_dir)
        new, messages = drafts.add_files(current or [], paths, labels_csv=csv)
        return new, images_tab.report(messages)

    def quick_upload(current: list, paths: list[str] | None) -> tuple:
        if not paths:
            return gr.skip(), ""
        new, messages = drafts.add_files(current or [], paths)
        return new, images_tab.report(messages)

    def quick_views(draft: list) -> tuple:
        draft = draft or []
        return drafts.gallery(draft[:QUICK_GALLERY]), drafts.summary(draft)

    @guarded(outputs=2, status=None, warn=False)
    def domain_check(draft: list, model: str) -> tuple:
        text = model_card.domain_warning(model, draft or [])
        return text, text

    def wire() -> None:
        """Events that need components of later tabs (the forms, the Images tab)."""
        nonlocal form_keys
        form_keys = list(ctx.forms)
        form_comps = list(ctx.forms.values())
        picker = ctx.forms["model__model"]
        kind, question = ctx.forms["task__kind"], ctx.forms["task__question"]
        options = ctx.forms["task__options"]
        out = [progress, curves, ctx.header, seen, status, headline, log, *form_comps]
        started = start_btn.click(start, [ctx.draft, name],
                                  [status, ctx.session, ctx.header, seen],
                                  inputs_kwargs=dict(ctx.forms), api_name="start")  # fmt: skip
        stop_btn.click(stop, ctx.session, status, api_name="stop")
        cli_btn.click(as_command, ctx.draft, [cli_box, status], inputs_kwargs=dict(ctx.forms),
                      api_name="cli_command")  # fmt: skip
        resume_btn.click(resume, ctx.session, [status, seen], api_name="resume")

        @guarded(outputs=1 + len(form_comps))
        def load_preset(name: str | None) -> tuple:
            config = presets.load(ctx.store.data_dir, name)
            return (ok(f"Loaded preset {name!r} into the settings."),
                    *forms.form_updates(config, ctx.forms))  # fmt: skip

        save_preset_btn.click(save_preset, preset_name, [status, preset_pick],
                              inputs_kwargs=dict(ctx.forms), api_name="save_preset")  # fmt: skip
        load_preset_btn.click(load_preset, preset_pick, [status, *form_comps],
                              api_name="load_preset")  # fmt: skip
        ctx.on_load(preset_choices, [], [preset_pick])
        # Presets saved in another tab, or copied into the folder, show up when it opens.
        preset_pick.focus(preset_choices, preset_pick, preset_pick, api_visibility="private")
        timer.tick(tick, [ctx.session, seen], out, show_progress="hidden", api_name="progress")
        ctx.on_session_change(redraw, [ctx.session], out)
        ctx.session_events.append(started)

        guarded_add = guarded(outputs=2, status=1)
        demo_btn.click(guarded_add(quick_demo), ctx.draft, [ctx.draft, status],
                       api_name="quick_demo")  # fmt: skip
        upload.upload(guarded_add(quick_upload), [ctx.draft, upload], [ctx.draft, status],
                      api_name="quick_upload")  # fmt: skip
        ctx.draft.change(quick_views, ctx.draft, [gallery, images_md], api_visibility="private")
        warn_out = [domain, ctx.parts["images_domain"]]
        # The named event first: a private one registered before would take its name.
        picker.change(domain_check, [ctx.draft, picker], warn_out, api_name="domain_check")
        ctx.draft.change(domain_check, [ctx.draft, picker], warn_out, api_visibility="private")
        picker.change(model_card.card_markdown, picker, card, api_visibility="private")
        ctx.on_load(model_card.card_markdown, [picker], [card])
        preset.input(task_tab.apply_preset, [preset, question], [kind, question],
                     api_visibility="private")  # fmt: skip
        task_inputs = [kind, question, options, picker]
        for comp in (kind, question, options, picker):
            comp.change(task_text, task_inputs, task_md, api_visibility="private")
        ctx.on_load(task_text, task_inputs, [task_md])

    return {"start": start_btn, "wire": wire}
