"""Images tab: the unlabeled images to adapt on (the draft of the next session).

Upload image files, zip archives or a whole folder, or type local paths; one click loads
the bundled demo digits. Bad files and duplicates are reported and skipped, the rest kept.
Labels (from a CSV or class folder names) are optional and used only for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ttrv.images import IMAGE_EXTENSIONS

from . import draft as drafts
from .state import Context, bullet_list, error, guarded, ok


def report(messages: list[str]) -> str:
    """The status after adding: what was added, then each skipped thing."""
    head = [m for m in messages if m.startswith("Added ")]
    rest = [m for m in messages if not m.startswith("Added ")]
    text = ok(head[0]) if head else (error("Nothing was added.") if rest else "")
    if rest:
        text += "\n\n**Skipped or noted:**\n" + bullet_list(rest)
    return text


def views(new: list[dict[str, Any]]) -> tuple[Any, ...]:
    return drafts.gallery(new), drafts.summary(new), drafts.table(new)


def demo_files(demo_dir: Path) -> tuple[list[str], str | None]:
    """The demo images and their labels CSV (None when absent)."""
    if not demo_dir.is_dir():
        raise FileNotFoundError(
            f"The demo images are missing ({demo_dir}); build them with "
            "`python scripts/make_demo_model.py`."
        )
    csv = demo_dir / "labels.csv"
    images = sorted(p for p in demo_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [str(p) for p in images], str(csv) if csv.is_file() else None


def build(ctx: Context) -> dict[str, Any]:
    with gr.Row():
        demo_btn = gr.Button("Load demo images", variant="primary", elem_id="load-demo",
                             scale=0)  # fmt: skip
        gr.Markdown(
            "Handwritten digits from scikit-learn's test split, with labels for evaluation "
            f"(`{ctx.demo_dir}`)."
        )
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Images or zip archives (many at once)",
                            file_count="multiple", elem_id="upload-files")  # fmt: skip
        with gr.Column(scale=1):
            folder = gr.File(label="A whole folder", file_count="directory",
                             elem_id="upload-folder")  # fmt: skip
            gr.Markdown("Browsers send no sub-folder names: for class-folder labels upload "
                        "a zip, or type the folder's path below.")  # fmt: skip
        with gr.Column(scale=1):
            labels_csv = gr.File(label="Labels CSV (optional)", file_types=[".csv"],
                                 elem_id="labels-csv")  # fmt: skip
            gr.Markdown("Columns `file,label[,question][,options]`; options `;`-separated.")
    with gr.Row():
        local = gr.Textbox(label="Or local files / folders (one per line)", lines=1, scale=3,
                           placeholder="/home/me/photos/test-set")  # fmt: skip
        folder_labels = gr.Checkbox(label="Class sub-folder names are labels", value=False,
                                    info="zips: always", scale=1)  # fmt: skip
        add_local = gr.Button("Add", scale=0)
    status = gr.Markdown(elem_id="images-status")
    summary = gr.Markdown(drafts.summary([]), elem_id="images-summary")
    ctx.parts["images_domain"] = gr.Markdown(elem_id="images-domain")  # see ui.adapt_tab
    gallery = gr.Gallery(
        label="Images (click one, then Remove)",
        columns=8,
        height=320,
        allow_preview=False,
        fit_columns=False,
        elem_id="draft-gallery",
        elem_classes=["ttrv-gallery"],
    )
    with gr.Row():
        remove_btn = gr.Button("Remove selected", size="sm", scale=0)
        clear_btn = gr.Button("Remove all", size="sm", scale=0, variant="stop")
    with gr.Accordion("Labels and questions", open=False):
        table = gr.Dataframe(headers=["file", "label", "question", "options"],
                             interactive=False, wrap=True)  # fmt: skip
    selected = gr.State(None)
    outputs = [ctx.draft, gallery, summary, table, status]

    def add(current: list, paths: list[str], csv: str | None, by_folder: bool) -> tuple:
        new, messages = drafts.add_files(
            current or [], paths, labels_csv=csv, folder_labels=by_folder
        )
        return (new, *views(new), report(messages))

    @guarded(outputs=6, status=4)
    def add_uploads(current: list, paths: list[str] | None, csv: str | None) -> tuple:
        # The upload box is emptied after each drop: a box that keeps its files re-sends
        # them with the next drop (every earlier note repeated) and stops opening a dialog.
        if not paths:
            return (gr.skip(),) * 4 + ("", gr.skip())
        return (*add(current, paths, csv, False), None)

    @guarded(outputs=5, status=4)
    def add_paths(current: list, text: str, csv: str | None, by_folder: bool) -> tuple:
        paths = [line.strip().strip('"') for line in (text or "").splitlines() if line.strip()]
        if not paths:
            return (gr.skip(),) * 4 + (error("Type a file or folder path first."),)
        return add(current, paths, csv, by_folder)

    @guarded(outputs=5, status=4)
    def load_demo(current: list) -> tuple:
        images, csv = demo_files(ctx.demo_dir)
        return add(current, images, csv, False)

    @guarded(outputs=5, status=4)
    def apply_labels(current: list, csv: str | None) -> tuple:
        if not csv or not current:
            return (gr.skip(),) * 5
        new, messages = drafts.apply_csv(current, csv)
        return (new, *views(new), ok("Labels applied.") + "\n\n" + bullet_list(messages))

    def remove(current: list, index: int | None) -> tuple:
        new = drafts.remove(current or [], index)
        return (new, *views(new), ok("Removed.") if len(new) < len(current or []) else
                error("Click an image in the gallery first."), None)  # fmt: skip

    def clear() -> tuple:
        return ([], *views([]), ok("All images removed."), None)

    def pick(evt: gr.SelectData) -> int:
        return evt.index

    files.upload(add_uploads, [ctx.draft, files, labels_csv], [*outputs, files],
                 api_name="add_files")  # fmt: skip
    folder.upload(add_uploads, [ctx.draft, folder, labels_csv], [*outputs, folder],
                  api_name="add_folder")  # fmt: skip
    add_local.click(add_paths, [ctx.draft, local, labels_csv, folder_labels], outputs,
                    api_name="add_paths")  # fmt: skip
    demo_btn.click(load_demo, [ctx.draft], outputs, api_name="load_demo")
    labels_csv.upload(apply_labels, [ctx.draft, labels_csv], outputs, api_name="apply_labels")
    gallery.select(pick, None, selected, api_visibility="private")
    remove_btn.click(remove, [ctx.draft, selected], [*outputs, selected], api_name="remove_image")
    clear_btn.click(clear, None, [*outputs, selected], api_name="clear_images")
    return {"on_select": (views, [ctx.draft], [gallery, summary, table])}
