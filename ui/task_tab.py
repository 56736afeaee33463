"""Task tab: what is asked of every image, with a preview of the exact prompt the model
sees (through the model's own chat template) and of how a response would be parsed.

The preview loads only the model's processor (tokenizer + image processor), cached per
model, never the weights.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr

from ttrv.answers import extract_answer
from ttrv.config import TaskConfig
from ttrv.tasks import Item, build_prompt

from . import draft as drafts
from . import forms
from .state import Context, bullet_list, error, guarded, info, ok

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


@functools.lru_cache(maxsize=4)
def cached_processor(source: str, trust_remote_code: bool) -> Any:
    """The processor of a model (no weights). Raises ttrv.loading.ModelLoadError."""
    from transformers import AutoConfig

    from ttrv.loading import load_processor

    local = Path(source).expanduser()
    config_file = local / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text())["model_type"]
    else:
        model_type = AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code
        ).model_type
    return load_processor(str(local) if local.is_dir() else source, model_type, trust_remote_code)


def preview(task: TaskConfig, image: dict[str, Any] | None, model: str, trust: bool,
            response: str) -> tuple[str, str]:  # fmt: skip
    """(the exact prompt text, how `response` parses) for one draft image (or none)."""
    from ttrv.tasks import render_prompt

    item = Item(
        image_id=(image or {}).get("image_id", "preview"),
        name=(image or {}).get("name", "an image"),
        image=None,  # build_prompt never looks at the pixels
        question=(image or {}).get("question"),
        options=(image or {}).get("options"),
    )
    prompt = build_prompt(task, item)
    try:
        text = render_prompt(cached_processor(model, bool(trust)), prompt)
        note = ""
    except Exception as exc:  # noqa: BLE001 - the user text is still worth showing
        text = prompt.text
        detail = f"{type(exc).__name__}: {str(exc)[:200]}"
        note = "\n\n" + info(
            f"Showing the user text only: this model's chat template is unavailable ({detail})."
        )
    answer = extract_answer(response or "", task, prompt.options)
    options = f" Options as shown: {', '.join(prompt.options)}." if prompt.options else ""
    # The template in effect, so the paper's default can be copied into the template field
    # and edited into the wording a model was trained on.
    source = "the task's template" if task.template else "the paper's wording, the default"
    parsed = (
        f"A response `{(response or '').strip()[:120]}` is parsed as **{answer}**."
        f"{options} Rollouts vote on these parsed answers; `<invalid>` gets no frequency "
        f"reward.\n\nWording ({source}): `{task.wording()}`{note}"
    )
    return text, parsed


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

    kind, question = task_form["task__kind"], task_form["task__question"]

    @guarded(outputs=2, status=1, warn=False)
    def show(draft: list, image_id: str | None, sample: str, **values: Any) -> tuple[str, str]:
        cfg = forms.config_from_values(values)
        image = next((d for d in draft or [] if d["image_id"] == image_id), None)
        return preview(cfg.task, image, cfg.model.model, cfg.model.trust_remote_code, sample)

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
        preview_args = ([ctx.draft, image_pick, response], [prompt_box, parsed])
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

    ctx.draft.change(image_choices, [ctx.draft, image_pick], image_pick,
                     api_visibility="private")  # fmt: skip
    questions_csv.upload(apply_questions, [ctx.draft, questions_csv], [ctx.draft, csv_status],
                         api_name="apply_questions")  # fmt: skip
    return {"on_select": (image_choices, [ctx.draft, image_pick], image_pick), "wire": wire}
