"""Sessions tab: every session with its status and headline numbers; open one (it becomes
the current session the other tabs show), compare two, delete, export and import; and what
a run is for: its answers (CSV), its adapter (zip) and the model with the adapter merged in
(an "export_model" job, polled).
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from sessions import jobs
from sessions.schema import StoreError

from . import charts, exports, forms
from .state import (
    Context,
    describe,
    error,
    guarded,
    header_text,
    info,
    ok,
    pick_session,
    session_choices,
)

POLL_S = 1.0

HEADERS = ["name", "status", "steps", "last reward", "last consensus", "acc. before", "acc. after",
           "flipped", "images", "model", "created", "id"]  # fmt: skip
# The id column fits a whole 12-character id at 1280 px (tests/test_browser.py checks it).
WIDTHS = ["18%", "8%", "6%", "7%", "7%", "7%", "7%", "6%", "6%", "7%", "9%", "12%"]
COMPARE_HEADERS = ["image", "label", "A before", "A after", "B before", "B after"]
COMPARE_ROWS = 500  # images in Compare's table: the differing ones come first


def table_rows(sessions: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for s in sessions:
        h = s["headline"]
        rows.append([
            s["name"], s["status"], h.get("steps"), charts.fmt(h.get("reward_mean")),
            charts.fmt(h.get("consensus")), charts.fmt(h.get("accuracy_before"), 2),
            charts.fmt(h.get("accuracy_after"), 2),
            f"{h.get('flipped')}/{h.get('compared')}" if h.get("compared") else "-",
            h.get("images"), Path(s["model"]).name or s["model"], s["created"][:16].replace("T", " "),
            s["id"],
        ])  # fmt: skip
    return rows


def unique_name(name: str, taken: list[str]) -> str:
    """`name`, or `name (2)`, `name (3)`, … when another session already has it."""
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def compare_summary(data: dict[str, Any]) -> str:
    lines = ["| | A | B |", "|---|---|---|"]
    for key, label in (("name", "name"), ("status", "status")):
        lines.append(f"| {label} | {data['a'][key]} | {data['b'][key]} |")
    for key, label in (("steps", "steps"), ("reward_mean", "last reward"),
                       ("consensus", "last consensus"), ("flipped", "flipped"),
                       ("accuracy_before", "accuracy before"),
                       ("accuracy_after", "accuracy after")):  # fmt: skip
        a, b = data["a"]["headline"].get(key), data["b"]["headline"].get(key)
        lines.append(f"| {label} | {charts.fmt(a)} | {charts.fmt(b)} |")
    diff = data["config_diff"]
    if diff:
        lines.append("\n**Settings that differ:** " + ", ".join(
            f"`{d['key']}` {d['a']!r} → {d['b']!r}" for d in diff[:20]))  # fmt: skip
    return "\n".join(lines)


def export_model_text(job: dict[str, Any]) -> tuple[str, bool]:
    """(message, finished) for an export_model job row."""
    if job["status"] in ("queued", "running"):
        ahead = "" if job["status"] == "running" else " (after the job running now)"
        return info(f"Merging the adapter into the model …{ahead}"), False
    if job["status"] != "done":
        return error(f"The model export failed: {job.get('error') or job['status']}"), True
    result = job["result"]
    path = html.escape(result["path"])
    loads = "it loads with `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor`"
    if not result["adapted"]:
        return ok(
            f"Its flip review reverted this session, so this is the **unadapted** model, "
            f"written to `{path}`; {loads}."
        ), True
    return ok(
        f"The model with the adapter of step {result['step']} merged in, written to "
        f"`{path}`; {loads} (no peft needed)."
    ), True


def build(ctx: Context) -> dict[str, Any]:
    table = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, label="Sessions",
                         column_widths=WIDTHS, elem_id="sessions-table")  # fmt: skip
    with gr.Row():
        pick = gr.Dropdown(label="Session", choices=[], scale=3, elem_id="sessions-pick",
                           allow_custom_value=True)  # fmt: skip
        open_btn = gr.Button("Open", variant="primary", scale=0, elem_id="sessions-open")
        settings_btn = gr.Button("Use its settings", scale=0)
        export_btn = gr.Button("Export", scale=0, elem_id="sessions-export")
        export_file = gr.DownloadButton("Download", visible=False, scale=0, variant="primary",
                                        elem_id="export-file")  # fmt: skip
        csv_btn = gr.Button("Answers CSV", scale=0, elem_id="answers-csv")
        csv_file = gr.DownloadButton("Download CSV", visible=False, scale=0, variant="primary",
                                     elem_id="answers-csv-file")  # fmt: skip
        import_file = gr.UploadButton("Import…", file_types=[".zip"], scale=0,
                                      elem_id="import-file")  # fmt: skip
        delete_btn = gr.Button("Delete", variant="stop", scale=0, elem_id="sessions-delete")
        refresh_btn = gr.Button("↻", scale=0, min_width=40)
    with gr.Row():
        adapter_btn = gr.Button("Adapter (zip)", scale=0, elem_id="adapter-zip")
        adapter_file = gr.DownloadButton("Download adapter", visible=False, scale=0,
                                         variant="primary", elem_id="adapter-zip-file")  # fmt: skip
        merged_btn = gr.Button("Merged model", scale=0, elem_id="merged-model")
        gr.Markdown("The adapter as peft files, or the model with it merged in (a folder in "
                    "the data directory that plain transformers loads).")  # fmt: skip
    status = gr.Markdown(elem_id="sessions-status")
    export_job = gr.State(None)
    export_timer = gr.Timer(POLL_S, active=False)
    gr.Markdown("### Compare two sessions")
    with gr.Row():
        a_pick = gr.Dropdown(label="A", choices=[], elem_id="compare-a", allow_custom_value=True)
        b_pick = gr.Dropdown(label="B", choices=[], elem_id="compare-b", allow_custom_value=True)
        compare_btn = gr.Button("Compare", scale=0, elem_id="compare-btn")
    compare_md = gr.Markdown(elem_id="compare-summary")
    compare_plot = gr.Plot(label="Curves", elem_id="compare-curves")
    compare_table = gr.Dataframe(headers=COMPARE_HEADERS, interactive=False,
                                 label="Answers side by side (differences first)")  # fmt: skip

    def lists(current: str | None) -> tuple:
        choices = session_choices(ctx.store)
        ids = [c[1] for c in choices]
        value = current if current in ids else (ids[0] if ids else None)
        other = next((i for i in ids if i != value), value)
        return (
            table_rows(ctx.store.list_sessions()),
            gr.Dropdown(choices=choices, value=value),
            gr.Dropdown(choices=choices, value=value),
            gr.Dropdown(choices=choices, value=other),
        )

    list_outs = [table, pick, a_pick, b_pick]

    @guarded(outputs=4, status=None)
    def refresh(current: str | None) -> tuple:
        return lists(current)

    @guarded(outputs=3)
    def open_(sid: str | None) -> tuple:
        if not sid:
            return error("Pick a session first."), gr.skip(), gr.skip()
        session = ctx.store.get_session(sid)
        return ok(f"Opened {session['name']!r}."), sid, header_text(ctx.store, sid)

    @guarded(outputs=7)
    def delete(sid: str | None, current: str | None) -> tuple:
        if not sid:
            return (error("Nothing deleted."),) + (gr.skip(),) * 6
        name = ctx.store.get_session(sid)["name"]
        ctx.store.delete_session(sid)
        new_current = current if current != sid else pick_session(ctx.store)
        return (ok(f"Deleted {name!r}."), new_current, header_text(ctx.store, new_current),
                *lists(new_current))  # fmt: skip

    @guarded(outputs=2)
    def export(sid: str | None) -> tuple:
        if not sid:
            return error("Pick a session first."), gr.skip()
        session = ctx.store.get_session(sid)
        safe = exports.safe_stem(session)
        dest = Path(tempfile.mkdtemp(prefix="ttrv-export-")) / f"{safe}-{sid}.zip"
        path = ctx.store.export_session(sid, dest)
        size = path.stat().st_size / 2**20
        return (
            ok(f"Exported {session['name']!r} ({size:.1f} MiB): click Download."),
            gr.DownloadButton(f"⬇ {path.name}", value=str(path), visible=True),
        )

    @guarded(outputs=2)
    def answers_csv(sid: str | None) -> tuple:
        if not sid:
            return error("Pick a session first."), gr.skip()
        path = exports.write_answers_csv(ctx.store, sid)
        n = ctx.store.get_session(sid)["headline"]["images"]  # not every answer again
        return (
            ok(f"The answers of {n} images (before, after, votes, consensus): click Download."),
            gr.DownloadButton(f"⬇ {path.name}", value=str(path), visible=True),
        )

    @guarded(outputs=2)
    def adapter(sid: str | None) -> tuple:
        if not sid:
            return error("Pick a session first."), gr.skip()
        path, step = exports.adapter_zip(ctx.store, sid)
        return (
            ok(f"The adapter of step {step} (peft files): click Download adapter."),
            gr.DownloadButton(f"⬇ {path.name}", value=str(path), visible=True),
        )

    @guarded(outputs=3)
    def merged(sid: str | None) -> tuple:
        if not sid:
            return error("Pick a session first."), gr.skip(), gr.skip()
        ctx.store.get_session(sid)  # a deleted session is a message now, not a failed job
        jid = jobs.submit(ctx.store, "export_model", {"session_id": sid})
        return export_model_text(jobs.get(ctx.store, jid))[0], jid, gr.Timer(active=True)

    def poll_export(jid: int | None) -> tuple:
        if jid is None:
            return gr.skip(), gr.Timer(active=False)
        try:
            text, finished = export_model_text(jobs.get(ctx.store, jid))
        except Exception as exc:  # noqa: BLE001 - shown, polling stops
            return error(str(exc)), gr.Timer(active=False)
        return text, gr.Timer(active=not finished)

    @guarded(outputs=7)
    def import_(path: str | None) -> tuple:
        if not path:
            return (gr.skip(),) * 7
        upload = Path(path)
        try:
            sid = ctx.store.import_archive(path)
        except Exception as exc:  # name the file the user picked, not the upload's temp path
            text = describe(exc).replace(str(upload), upload.name)
            raise StoreError(text.replace(str(upload.parent), "(upload)")) from exc
        session = ctx.store.get_session(sid)
        name = unique_name(session["name"], [s["name"] for s in ctx.store.list_sessions()
                                             if s["id"] != sid])  # fmt: skip
        note = ""
        if name != session["name"]:  # e.g. the same archive imported twice
            ctx.store.rename_session(sid, name)
            note = f" A session named {session['name']!r} already exists, so this one is {name!r}."
        return (ok(f"Imported {name!r} as `{sid}`; it is now the current session.{note}"),
                sid, header_text(ctx.store, sid), *lists(sid))  # fmt: skip

    @guarded(outputs=len(ctx.forms) + 1)
    def use_settings(sid: str | None) -> tuple:
        if not sid:
            return (error("Pick a session first."),) + (gr.skip(),) * len(ctx.forms)
        session = ctx.store.get_session(sid)
        return (ok(f"The forms now hold the settings of {session['name']!r}."),
                *forms.form_updates(session["config"], ctx.forms))  # fmt: skip

    @guarded(outputs=3)
    def compare(a: str | None, b: str | None) -> tuple:
        if not a or not b:
            return error("Pick two sessions."), gr.skip(), gr.skip()
        data = ctx.store.compare(a, b, limit=COMPARE_ROWS)  # differing answers first
        names = {a: f"A: {data['a']['name']}", b: f"B: {data['b']['name']}"}
        runs = {names[a]: ctx.store.metrics(a), names[b]: ctx.store.metrics(b)}
        rows = [
            [i["name"], i["label"] or "", i["a"]["before"] or "", i["a"]["after"] or "",
             i["b"]["before"] or "", i["b"]["after"] or ""]
            for i in data["images"]
        ]  # fmt: skip
        summary = compare_summary(data)
        if not rows:
            summary += "\n\nThe two sessions share no images."
        else:
            summary += (f"\n\n{data['differing']} of {data['shared']} shared images differ "
                        "in an answer; they come first in the table")  # fmt: skip
            if data["shared"] > len(rows):
                summary += f", which shows the first {len(rows)}"
            summary += "."
        return summary, charts.curves_figure(runs, height=420), rows

    session_outs = [ctx.session, ctx.header]
    refresh_btn.click(refresh, ctx.session, list_outs, api_name="sessions_refresh")
    opened = open_btn.click(open_, pick, [status, *session_outs], api_name="open_session")
    deleted = delete_btn.click(
        delete,
        [pick, ctx.session],
        [status, *session_outs, *list_outs],
        api_name="delete_session",
        js="(sid, cur) => confirm('Delete this session, its answers and adapters?') ? "
        "[sid, cur] : [null, cur]",
    )
    export_btn.click(export, pick, [status, export_file], api_name="export_session")
    csv_btn.click(answers_csv, pick, [status, csv_file], api_name="answers_csv")
    adapter_btn.click(adapter, pick, [status, adapter_file], api_name="adapter_zip")
    merged_btn.click(merged, pick, [status, export_job, export_timer], api_name="export_model")
    export_timer.tick(poll_export, export_job, [status, export_timer], show_progress="hidden",
                      api_name="export_model_poll")  # fmt: skip
    downloads = [export_file, csv_file, adapter_file]
    pick.change(lambda: tuple(gr.DownloadButton(visible=False) for _ in downloads),
                None, downloads, api_visibility="private")  # fmt: skip
    imported = import_file.upload(import_, import_file, [status, *session_outs, *list_outs],
                                  api_name="import_session")  # fmt: skip
    settings_btn.click(use_settings, pick, [status, *ctx.forms.values()],
                       api_name="use_settings")  # fmt: skip
    compare_btn.click(compare, [a_pick, b_pick], [compare_md, compare_plot, compare_table],
                      api_name="compare")  # fmt: skip
    ctx.session_events += [opened, deleted, imported]
    ctx.on_session_change(refresh, [ctx.session], list_outs)
    return {"on_select": (refresh, [ctx.session], list_outs)}
