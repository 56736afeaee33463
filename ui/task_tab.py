"""Task tab: what is asked of every image, with a preview of the exact prompt the model
sees (through the model's own chat template) and of how a response would be parsed.

The chat template needs the model's processor, which the UI never loads: the preview is a
"preview" job (`sessions.worker.render_preview`, processor only, never the weights) that
this tab submits and polls, as the Ask tab does. The parse is shown at once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import gradio as gr

from sessions import jobs
from sessions.schema import StoreError
from ttrv.answers import extract_answer
from ttrv.config import TaskConfig
from ttrv.tasks import Item, Prompt, build_prompt

from . import draft as drafts
from . import forms
from .state import Context, bullet_list, error, guarded, info, ok

POLL_S = 0.5
RENDERING = "Applying the model's chat template …"

# preset -> (task kind, an example question that fits the bundled digits model)
PRESETS: dict[str, tuple[str, str]] = {
    "Open question": ("open", TaskConfig().question),
    "Class list": ("classes", "Which digit is shown?"),
    "Multiple choice": ("multiple_choice", "Which digit is shown?"),
    "Yes / no": ("yes_no", "Is the digit in this image a 7? Answer yes or no."),
    "Per-image questions (CSV)": ("per_image", TaskConfig().question),
}
EXAMPLE_QUESTIONS = {q for _, q in PRESETS.values()}


def apply_preset(name: str, current_question: str) -> tuple[Any, Any]:
    """(task kind, question) for a preset; a question the user typed is kept."""
    new_kind, example = PRESETS[name]
    keep = current_question and current_question not in EXAMPLE_QUESTIONS
    return new_kind, gr.skip() if keep else example


def preview_prompt(task: TaskConfig, image: dict[str, Any] | None) -> tuple[Prompt, dict]:
    """(the prompt's user text and options, the item part of a preview job's request) for
    one draft image (or none)."""
    item = {
        "image_id": (image or {}).get("image_id", "preview"),
        "name": (image or {}).get("name", "an image"),
        "question": (image or {}).get("question"),
        "options": (image or {}).get("options"),
    }
    return build_prompt(task, Item(image=None, **item)), item  # no pixels needed


def parsed_text(task: TaskConfig, prompt: Prompt, response: str, note: str = "") -> str:
    """How `response` parses for this prompt, and the wording in effect."""
    answer = extract_answer(response or "", task, prompt.options)
    options = f" Options as shown: {', '.join(prompt.options)}." if prompt.options else ""
    # The template in effect, so the paper's default can be copied into the template field
    # and edited into the wording a model was trained on.
    source = "the task's template" if task.template else "the paper's wording, the default"
    return (
        f"A response `{(response or '').strip()[:120]}` is parsed as **{answer}**."
        f"{options} Rollouts vote on these parsed answers; `<invalid>` gets no frequency "
        f"reward.\n\nWording ({source}): `{task.wording()}`" + (f"\n\n{note}" if note else "")
    )


def template_note(result: dict[str, Any]) -> str:
    """The note under the parse for a finished preview job's result."""
    if not result.get("note"):
        return ""
    why = result["note"]
    return info(f"Showing the user text only: this model's chat template is unavailable ({why}).")


def build(ctx: Context) -> dict[str, Any]:
    preset = gr.Radio(list(PRESETS), value="Open question", label="Preset",
                      elem_id="task-preset")  # fmt: skip
    task_form = forms.build_section("task", columns=2)
    ctx.forms.update(task_form)
    with gr.Accordion("Per-image questions from a CSV", open=False):
        gr.Markdown(
            "Columns `file,question[,options][,label]` (options `;`-separated); rows match "
            "images by file name. The task's question is the fallback for images without one."
        )
        questions_csv = gr.File(label="Questions CSV", file_types=[".csv"])
        csv_status = gr.Markdown()
    gr.Markdown("### Preview")
    with gr.Row():
        image_pick = gr.Dropdown(label="Image", choices=[], elem_id="preview-image",
                                     allow_custom_value=True)  # fmt: skip
        response = gr.Textbox(label="A sample response", value="The answer is 7.",
                              elem_id="preview-response")  # fmt: skip
        preview_btn = gr.Button("Preview", scale=0, elem_id="preview-btn")
    prompt_box = gr.Code(
        label="Exact prompt the model sees (chat template applied)",
        language=None,
        wrap_lines=True,
        elem_id="preview-prompt",
    )  # fmt: skip
    parsed = gr.Markdown(elem_id="preview-parsed")
    pending = gr.State(None)  # {"job", "parsed", "key"} of the preview job being polled
    timer = gr.Timer(POLL_S, active=False)
    rendered: OrderedDict[str, dict[str, Any]] = OrderedDict()  # request -> job result

    kind, question = task_form["task__kind"], task_form["task__question"]

    @guarded(outputs=4, status=1, warn=False)
    def show(draft: list, image_id: str | None, sample: str, **values: Any) -> tuple:
        cfg = forms.config_from_values(values)
        image = next((d for d in draft or [] if d["image_id"] == image_id), None)
        prompt, item = preview_prompt(cfg.task, image)
        request = {"model": cfg.model.model, "trust_remote_code": cfg.model.trust_remote_code,
                   "task": cfg.to_dict()["task"], "item": item}  # fmt: skip
        key = json.dumps(request, sort_keys=True)
        base = parsed_text(cfg.task, prompt, sample)
        if key in rendered:  # the same prompt again: no second job
            result = rendered[key]
            note = template_note(result)
            return result["prompt"], base + (f"\n\n{note}" if note else ""), None, gr.skip()
        try:
            jid = jobs.submit(ctx.store, "preview", request)
        except StoreError as exc:  # e.g. a read-only data directory: no worker runs
            note = info(f"Showing the user text only: {exc}")
            return prompt.text, f"{base}\n\n{note}", None, gr.skip()
        pend = {"job": jid, "parsed": base, "key": key}
        return prompt.text, f"{base}\n\n{info(RENDERING)}", pend, gr.Timer(active=True)

    def poll(pend: dict[str, Any] | None) -> tuple:
        if not pend:
            return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        try:
            job = jobs.get(ctx.store, pend["job"])
        except Exception as exc:  # noqa: BLE001 - shown, polling stops
            return gr.skip(), error(str(exc)), None, gr.Timer(active=False)
        if job["status"] in ("queued", "running"):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if job["status"] != "done":
            note = error(f"The preview failed: {job.get('error') or job['status']}")
            return gr.skip(), f"{pend['parsed']}\n\n{note}", None, gr.Timer(active=False)
        result = job["result"]
        rendered[pend["key"]] = result
        while len(rendered) > 32:
            rendered.popitem(last=False)
        note = template_note(result)
        parsed_md = pend["parsed"] + (f"\n\n{note}" if note else "")
        return result["prompt"], parsed_md, None, gr.Timer(active=False)

    def image_choices(draft: list, current: str | None) -> Any:
        choices = [(d["name"], d["image_id"]) for d in draft or []]
        ids = [c[1] for c in choices]
        return gr.Dropdown(choices=choices, value=current if current in ids else
                           (ids[0] if ids else None))  # fmt: skip

    @guarded(outputs=2, status=1)
    def apply_questions(draft: list, csv: str | None) -> tuple:
        if not csv:
            return gr.skip(), gr.skip()
        if not draft:
            return gr.skip(), error("Add the images first (Images tab), then this CSV.")
        new, messages = drafts.apply_csv(draft, csv)
        return new, ok("Applied.") + "\n\n" + bullet_list(messages)

    def wire() -> None:
        # Wired once every tab is built: the model fields live on the Adapt and Model tabs.
        preview_inputs = {k: v for k, v in ctx.forms.items()
                          if k.startswith(("task__", "model__"))}  # fmt: skip
        preview_args = ([ctx.draft, image_pick, response], [prompt_box, parsed, pending, timer])
        preview_btn.click(show, *preview_args, inputs_kwargs=preview_inputs, api_name="preview")
        # The preview follows the task: after a preset, a new image, or an edited field.
        preset.input(apply_preset, [preset, question], [kind, question],
                     api_name="task_preset").then(
            show, *preview_args, inputs_kwargs=preview_inputs, api_visibility="private"
        )  # fmt: skip
        for trigger in (
            image_pick.change,
            response.submit,
            kind.input,
            *(c.blur for k, c in task_form.items() if isinstance(c, gr.Textbox)),
        ):
            trigger(show, *preview_args, inputs_kwargs=preview_inputs, api_visibility="private")

    timer.tick(poll, pending, [prompt_box, parsed, pending, timer], show_progress="hidden",
               api_name="preview_poll")  # fmt: skip
    ctx.draft.change(image_choices, [ctx.draft, image_pick], image_pick,
                     api_visibility="private")  # fmt: skip
    questions_csv.upload(apply_questions, [ctx.draft, questions_csv], [ctx.draft, csv_status],
                         api_name="apply_questions")  # fmt: skip
    return {"on_select": (image_choices, [ctx.draft, image_pick], image_pick), "wire": wire}
