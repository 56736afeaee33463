"""The Gradio workbench: one module per tab, each with a `build(ctx)` that lays out its
components and wires its events; `ui.workbench.create_app` assembles them.

    forms.py     config dataclasses -> components; form values -> validated AdaptConfig
    charts.py    store rows -> progress, tables and plotly figures (pure functions)
    draft.py     the images picked for the next session (uploads, zips, CSV labels)
    state.py     shared context, per-tab states, readable error handling
    *_tab.py     Model, Images, Task, Adapt, Inspect, Sessions, Ask
    workbench.py assembly, page-load re-attachment, launch options

The UI writes only to the store (sessions, images, jobs, stop requests) and polls it; the
worker (`sessions.worker`) does all model work. Importing `ui` imports nothing heavy.
"""
