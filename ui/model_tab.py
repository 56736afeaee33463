"""Model tab: how the model is loaded (quantisation, dtype, which devices), LoRA, its card.

"Load model" submits a `load_model` job and polls it: the adaptation loads the same model
itself, so loading here is a check (does it load, how big is it, where does it run) that
also saves the time later.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import gradio as gr

from sessions import jobs
from ttrv.config import BUNDLED_MODEL, LoraConfig, ModelConfig

from . import forms
from .model_card import card_markdown, hf_cache_dir
from .state import Context, error, guarded, info, ok

POLL_S = 1.0


def model_choices() -> list[tuple[str, str]]:
    """(label, value) of the bundled model, other folders in models/, and cached hub models.

    Only folder names are listed (cheap); whether a cached model takes images is known
    when it loads.
    """
    bundled = Path(BUNDLED_MODEL)
    built = (bundled / "config.json").is_file()
    out = [(f"{bundled.name} (bundled{'' if built else ', not built yet'})", str(bundled))]
    if bundled.parent.is_dir():
        for folder in sorted(bundled.parent.iterdir()):
            if folder != bundled and (folder / "config.json").is_file():
                out.append((f"{folder.name} (models/)", str(folder)))
    cache = hf_cache_dir()
    if cache.is_dir():
        for entry in sorted(cache.iterdir()):
            if entry.name.startswith("models--") and (entry / "snapshots").is_dir():
                hub_id = entry.name[len("models--") :].replace("--", "/")
                out.append((f"{hub_id} (cached)", hub_id))
    return out


def model_picker(f: Any, common: dict[str, Any]) -> gr.Dropdown:
    """The model field: a dropdown of known models that also takes a typed hub id or path."""
    common = {**common, "info": common["info"] + " Type a hub id or a folder path to add one."}
    return gr.Dropdown(
        model_choices(), value=f.default, allow_custom_value=True, filterable=True, **common
    )


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def job_text(job: dict[str, Any] | None) -> str:
    """What a load_model job says: queued / loading / the model's numbers / the error."""
    if job is None:
        return info("No model loaded yet. The adaptation loads its model by itself.")
    name = (job.get("request") or {}).get("model", {}).get("model", "?")
    short = Path(name).name if Path(name).is_absolute() else name
    if job["status"] == "queued":
        return info(f"Queued: loading **{short}** after the job that is running now.")
    if job["status"] == "running":
        return info(f"Loading **{short}** …")
    if job["status"] == "failed":
        return error(f"Loading {short} failed: {job.get('error')}")
    if job["status"] == "cancelled":
        return info("The load was cancelled.")
    i = (job.get("result") or {}).get("info") or {}
    trainable = i.get("trainable_params")
    lora = f", {_size(trainable)} trainable (LoRA)" if trainable else ""
    text = (
        f"Loaded **{short}** — {_size(i.get('total_params'))} parameters{lora} · device "
        f"**{i.get('device')}** · {i.get('dtype')} · quantisation {i.get('quantization')} · "
        f"weights {(i.get('param_bytes') or 0) / 2**20:.1f} MiB"
        + (f" · GPU memory {i['gpu_memory_mib']:.0f} MiB" if i.get("gpu_memory_mib") else "")
    )
    placement = i.get("placement") or []
    if len(placement) > 1:  # a split model: where each part sits
        text += "\n\n" + "\n".join(
            f"- **{p['device']}**: {', '.join(p['parts'])} ({p['mib']:.0f} MiB)" for p in placement
        )
    return ok(text)


def devices_text(gpus: list[dict[str, Any]], cpu_count: int | None) -> str:
    """This machine's devices, for choosing `gpus` / `processes` (`gpus`:
    `ttrv.placement.gpu_table()`)."""
    cores = f"{cpu_count} CPU cores" if cpu_count else "CPU"
    if not gpus:
        return info(
            f"This machine: {cores}, no CUDA GPU. Runs use the CPU; **processes** > 1 runs "
            "that many data-parallel CPU processes."
        )
    listed = "; ".join(
        f"**{g['index']}** {g['name']} ({g['total_gib']:.0f} GiB)"
        for g in gpus
    )
    return info(
        f"This machine: {cores}; GPUs {listed}. List the ones a run uses in **gpus** (e.g. "
        "0,1): **replicate** runs one process per GPU through accelerate, **split** spreads "
        "one copy of a model too big for one GPU over them."
    )


def machine_devices() -> str:
    import os

    from ttrv.placement import gpu_table  # torch, imported when the tab is shown

    try:
        gpus = gpu_table()
    except Exception as exc:  # noqa: BLE001 - a driver problem is shown, not raised
        return error(f"Could not list the GPUs: {exc}")
    return devices_text(gpus, os.cpu_count())


def build(ctx: Context) -> dict[str, Any]:
    gr.Markdown(
        "The model itself is picked at the top of the **Adapt** tab (the bundled demo model, "
        "a local folder, or a Hugging Face hub id). Here: how it is loaded, and the LoRA "
        "adapter. Only the LoRA weights of the language model are trained."
    )
    card = gr.Markdown(elem_id="model-tab-card")
    devices = gr.Markdown(elem_id="model-devices")
    model_form = forms.build_section("model", exclude=("model",), columns=3)
    with gr.Accordion("LoRA", open=False):
        lora_form = forms.build_section("lora", columns=4)
    ctx.forms.update(model_form)
    ctx.forms.update(lora_form)
    with gr.Row():
        load_btn = gr.Button("Load model", variant="primary", elem_id="load-model", scale=0)
        refresh_btn = gr.Button("↻ Refresh model list", scale=0, size="sm")
    status = gr.Markdown(elem_id="model-status")
    job_id = gr.State(None)
    timer = gr.Timer(POLL_S, active=False)

    @guarded(outputs=3)
    def load(**values: Any) -> tuple[Any, ...]:
        data = forms.config_dict(values)
        request = {"model": asdict(ModelConfig(**data["model"])),
                   "lora": asdict(LoraConfig(**data["lora"]))}  # fmt: skip
        jid = jobs.submit(ctx.store, "load_model", request)
        return info("Queued the model load …"), jid, gr.Timer(active=True)

    def poll(jid: int | None) -> tuple[Any, ...]:
        if jid is None:
            return gr.skip(), gr.Timer(active=False)
        try:
            job = jobs.get(ctx.store, jid)
        except Exception as exc:  # noqa: BLE001 - shown, polling stops
            return error(str(exc)), gr.Timer(active=False)
        done = job["status"] not in ("queued", "running")
        return job_text(job), gr.Timer(active=not done)

    def last_load() -> str:
        try:
            return job_text(jobs.latest(ctx.store, "load_model"))
        except Exception as exc:  # noqa: BLE001
            return error(str(exc))

    def refresh_list(current: str) -> Any:
        return gr.Dropdown(choices=model_choices(), value=current)

    def wire() -> None:
        # The model field is built by the Adapt tab (the first screen): wired once all exist.
        picker = ctx.forms["model__model"]
        model_inputs = {k: v for k, v in ctx.forms.items() if k.startswith(("model__", "lora__"))}
        load_btn.click(load, None, [status, job_id, timer], inputs_kwargs=model_inputs,
                       api_name="load_model")  # fmt: skip
        refresh_btn.click(refresh_list, picker, picker, api_visibility="private")
        picker.change(card_markdown, picker, card, api_visibility="private")
        ctx.on_load(card_markdown, [picker], [card])

    timer.tick(poll, job_id, [status, timer], show_progress="hidden", api_visibility="private")
    ctx.on_load(last_load, [], [status])
    ctx.on_load(machine_devices, [], [devices])
    return {"wire": wire}
