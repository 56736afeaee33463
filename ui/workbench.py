"""Assemble the workbench: one tab per module, shared states, page-load re-attachment.

`create_app(store)` returns the `gr.Blocks`; `launch_options(store)` the keyword arguments
its `launch()` needs (theme, css and allowed paths: Gradio 6 takes them in `launch`).
The worker is not created here: `app.py` starts it next to the UI, tests start their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from sessions.paths import servable_dirs
from sessions.store import Store

from . import (
    adapt_tab,
    ask_tab,
    draft,
    images_tab,
    inspect_tab,
    model_tab,
    sessions_tab,
    task_tab,
)
from .state import ACTIVE, Context, header_text, pick_session

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "demo" / "digits"

CSS = """
.ttrv-bar { background: #e5e7eb; border-radius: 6px; height: 12px; overflow: hidden;
            margin: 4px 0 6px; }
.ttrv-bar > div { background: #2563eb; height: 100%; transition: width .4s; }
.ttrv-status { padding: 1px 8px; border-radius: 10px; background: #e5e7eb; }
.ttrv-running, .ttrv-queued { background: #dbeafe; }
.ttrv-stopping { background: #fef3c7; }
.ttrv-done { background: #dcfce7; }
.ttrv-failed, .ttrv-interrupted { background: #fee2e2; }
#current-session { padding: 4px 0; }
.ttrv-ok { color: #16a34a; font-weight: bold; }
.ttrv-err { color: #dc2626; font-weight: bold; }
.ttrv-info { color: #2563eb; font-weight: bold; }
.ttrv-plan { color: #6b7280; }
/* Galleries of small images (8x8 digits): the caption sits under the thumbnail instead of
   over it, wraps instead of cutting the name, and pixels stay sharp. */
.ttrv-gallery .thumbnail-item { display: flex; flex-direction: column; aspect-ratio: auto; }
.ttrv-gallery .thumbnail-lg > img { flex: 1 1 auto; min-height: 0; height: auto;
    aspect-ratio: 1; object-fit: contain; image-rendering: pixelated; }
.ttrv-gallery .caption-label { position: static; max-width: none; white-space: normal;
    overflow-wrap: anywhere; text-overflow: clip; border: none; border-radius: 0;
    font-size: 11px; line-height: 1.25; padding: 2px 4px; }
"""

# The first tab is the whole first-run path (model, images, task, Start, progress); the
# others hold the details of each step and what comes after a run.
TABS = (
    ("Adapt", adapt_tab),
    ("Images", images_tab),
    ("Task", task_tab),
    ("Model", model_tab),
    ("Inspect", inspect_tab),
    ("Sessions", sessions_tab),
    ("Ask", ask_tab),
)


def create_app(store: Store, demo_dir: str | Path = DEMO_DIR) -> gr.Blocks:
    with gr.Blocks(title="TTRV workbench") as demo:
        with gr.Row():
            gr.Markdown(
                "## TTRV workbench\nAdapt a vision-language model to your unlabeled images: "
                "it samples several answers per image and rewards agreement (test-time RL "
                "with LoRA).",
            )
        header = gr.Markdown(elem_id="current-session")
        ctx = Context(
            store=store,
            demo_dir=Path(demo_dir),
            session=gr.State(None),
            draft=gr.State([]),
            header=header,
        )
        wires, tabs = [], {}
        with gr.Tabs(selected="adapt") as ctx.tabs:
            for title, module in TABS:
                with gr.Tab(title, id=title.lower(), elem_id=f"tab-{title.lower()}") as tab:
                    built = module.build(ctx) or {}
                tabs[title] = tab
                if "on_select" in built:
                    fn, inputs, outputs = built["on_select"]
                    event = tab.select(fn, inputs, outputs, api_visibility="private")
                    if "then" in built:
                        event.then(*built["then"], api_visibility="private")
                if "wire" in built:
                    wires.append(built["wire"])
        for wire in wires:  # events that use components of tabs built after their own
            wire()
        # Inspect follows a run live only while it is shown (its refresh reads every image).
        for title, tab in tabs.items():
            tab.select(lambda shown=title == "Inspect": gr.Timer(active=shown), None,
                       ctx.parts["inspect_timer"], api_visibility="private")  # fmt: skip

        def attach() -> tuple[str, Any, list, Any]:
            """A page (re)load lands on the run in progress, else the newest session, with
            that session's images as the draft (they are gone from a fresh page)."""
            sid = pick_session(store)
            images = store.images(sid) if sid else []
            active = bool(sid) and store.get_session(sid)["status"] in ACTIVE
            return (header_text(store, sid), sid, draft.from_session(images),
                    gr.Tabs(selected="adapt") if active else gr.skip())  # fmt: skip

        loaded = demo.load(attach, None, [header, ctx.session, ctx.draft, ctx.tabs],
                           api_name="attach")  # fmt: skip
        for event in [loaded, *ctx.session_events]:
            for fn, inputs, outputs, then in ctx.refreshers:
                follow = event.then(fn, inputs, outputs, api_visibility="private")
                if then:
                    follow.then(*then, api_visibility="private")
        for fn, inputs, outputs in ctx.loaders:
            demo.load(fn, inputs, outputs, api_visibility="private")
    return demo


def launch_options(store: Store, demo_dir: str | Path = DEMO_DIR) -> dict[str, Any]:
    """theme, css and the folders whose files the UI may show (images, demo, scratch)."""
    return {
        "theme": gr.themes.Soft(primary_hue="blue"),
        "css": CSS,
        "allowed_paths": servable_dirs(store.data_dir, Path(demo_dir), draft.scratch_dir()),
    }
