"""Ask tab: one image and a question, answered by the base model and by a session's adapted
model side by side. It submits an "ask" job and polls its result, so the page never waits
on the model (an ask queues behind a running adaptation: one model, one worker).
"""

from __future__ import annotations

import html
from dataclasses import asdict
from typing import Any

import gradio as gr

from sessions import jobs
from ttrv.config import ModelConfig, TaskConfig

from . import forms
from .state import Context, error, guarded, info, session_choices

POLL_S = 1.0


def answer_md(title: str, answer: dict[str, Any] | None, missing: str) -> str:
    if not answer:
        return f"#### {title}\n\n{missing}"
    response = html.escape((answer.get("response") or "").strip()) or "<i>(empty)</i>"
    return (
        f"#### {title}\n\n**{html.escape(str(answer.get('answer')))}**\n\n"
        f"<small>raw response:</small> `{response}`"
    )


def job_views(job: dict[str, Any]) -> tuple[str, str, str, bool]:
    """(status, base, adapted, finished) for an ask job row."""
    if job["status"] in ("queued", "running"):
        ahead = "" if job["status"] == "running" else " (after the job running now)"
        return info(f"Asking …{ahead}"), "", "", False
    if job["status"] != "done":
        return error(f"The question failed: {job.get('error') or job['status']}"), "", "", True
    result = job.get("result") or {}
    sid = (job.get("request") or {}).get("session_id")
    missing = "No session chosen." if not sid else "This session has no adapter saved yet."
    return (
        info(f"Question: {html.escape(result.get('question') or '')}"),
        answer_md("Base model", result.get("base"), "-"),
        answer_md("Adapted model", result.get("adapted"), missing),
        True,
    )


def build(ctx: Context) -> dict[str, Any]:
    with gr.Row():
        image = gr.Image(type="filepath", label="Image", height=260, elem_id="ask-image")
        with gr.Column():
            question = gr.Textbox(label="Question", value=TaskConfig().question,
                                  elem_id="ask-question")  # fmt: skip
            session = gr.Dropdown(label="Adapted model of session", choices=[],
                                  elem_id="ask-session", allow_custom_value=True)  # fmt: skip
            max_new = gr.Number(label="max new tokens", value=32, precision=0, minimum=1)
            ask_btn = gr.Button("Ask both models", variant="primary", elem_id="ask-btn")
    status = gr.Markdown(elem_id="ask-status")
    with gr.Row():
        base = gr.Markdown(elem_id="ask-base")
        adapted = gr.Markdown(elem_id="ask-adapted")
    job_id = gr.State(None)
    timer = gr.Timer(POLL_S, active=False)

    @guarded(outputs=5)
    def ask(path: str | None, text: str, sid: str | None, n: float | None,
            **values: Any) -> tuple:  # fmt: skip
        if not path:
            return error("Add an image first."), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        request: dict[str, Any] = {
            "image_path": path,
            "question": (text or "").strip(),
            "session_id": sid or None,
            "max_new_tokens": int(n or 32),
        }
        if not sid:  # base model only, as set in the Model tab
            request["model"] = asdict(ModelConfig(**forms.config_dict(values)["model"]))
        jid = jobs.submit(ctx.store, "ask", request)
        return info("Asking …"), "", "", jid, gr.Timer(active=True)

    def poll(jid: int | None) -> tuple:
        if jid is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        try:
            s, b, a, finished = job_views(jobs.get(ctx.store, jid))
        except Exception as exc:  # noqa: BLE001 - shown, polling stops
            return error(str(exc)), gr.skip(), gr.skip(), gr.Timer(active=False)
        return s, b, a, gr.Timer(active=not finished)

    def sessions(current: str | None) -> Any:
        return gr.Dropdown(choices=session_choices(ctx.store), value=current)

    model_inputs = {k: v for k, v in ctx.forms.items() if k.startswith("model__")}
    ask_btn.click(ask, [image, question, session, max_new], [status, base, adapted, job_id, timer],
                  inputs_kwargs=model_inputs, api_name="ask")  # fmt: skip
    timer.tick(poll, job_id, [status, base, adapted, timer], show_progress="hidden",
               api_name="ask_poll")  # fmt: skip
    ctx.on_session_change(sessions, [ctx.session], [session])
    return {"on_select": (sessions, [session], [session])}
