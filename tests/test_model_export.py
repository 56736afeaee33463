"""Export of what people came for (issue 12): a session's adapter as a zip, and the model
with the adapter merged in as a folder plain transformers loads (an "export_model" worker
job); a session its flip review reverted exports the unadapted model and says so."""

from __future__ import annotations

import html
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sessions import Store, review
from sessions import jobs as jobs_mod
from sessions.worker import Worker, run_until_idle
from ttrv.config import AdaptConfig, ModelConfig, RolloutConfig, TaskConfig
from ttrv.images import load_items

pytestmark = pytest.mark.slow


def make_session(store: Store, folder: Path, tmp: Path) -> tuple[str, Image.Image]:
    """A session on the tiny model with two images and a saved adapter whose LoRA weights
    are far from zero (so merging it changes the answers)."""
    import torch

    from ttrv.loading import load_model
    from ttrv.lora import attach_lora, save_adapter

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    cfg = AdaptConfig(model=ModelConfig(model=str(folder)), task=TaskConfig(),
                      rollout=RolloutConfig(n_rollouts=4, n_train=4, max_new_tokens=4))  # fmt: skip
    items, _ = load_items(paths)
    sid = store.create_session("export me", cfg.to_dict(), cfg.model.model, cfg.task.kind)
    store.add_images(sid, items)
    model = attach_lora(load_model(cfg.model).model, cfg.lora, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_adapter(model, tmp / "adapter")
    store.add_checkpoint(sid, 0, 3, tmp / "adapter")
    return sid, Image.open(paths[0]).convert("RGB")


def greedy(model, processor, image) -> tuple[list[int], object]:
    """(greedy token ids, last-position logits) for the image and the default question."""
    import torch

    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": TaskConfig().question}]}]  # fmt: skip
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist(), logits


def test_merged_model_loads_with_plain_transformers_and_answers_as_base_plus_adapter(
    tiny_model_dir, tmp_path
):
    """The merged folder loads with AutoModelForImageTextToText/AutoProcessor and gives the
    greedy tokens (and logits) of base + adapter, not those of the base; after a flip
    review reverts the session, the export is the unadapted model and says so."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ttrv.loading import load_model
    from ttrv.lora import load_adapter

    folder = tiny_model_dir("llava")
    store = Store(tmp_path / "data")
    sid, image = make_session(store, folder, tmp_path)
    jid = jobs_mod.submit(store, "export_model", {"session_id": sid})
    run_until_idle(Worker(store))
    job = jobs_mod.get(store, jid)
    assert job["status"] == "done", job.get("error")
    result = job["result"]
    assert result["adapted"] and result["step"] == 3
    merged_dir = Path(result["path"])
    assert merged_dir.is_relative_to(store.data_dir) and list(merged_dir.glob("*.safetensors"))
    assert not list(merged_dir.glob("adapter_*"))  # a plain model, not a peft folder

    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    base = load_model(ModelConfig(model=str(folder)))
    adapted = load_adapter(base.model, store.latest_checkpoint(sid)["path"])
    tokens, logits = greedy(merged, processor, image)
    want, want_logits = greedy(adapted, base.processor, image)
    assert tokens == want
    assert np.allclose(logits.numpy(), want_logits.numpy(), atol=1e-4)
    with adapted.disable_adapter():
        _, base_logits = greedy(adapted, base.processor, image)
    assert np.abs(logits.numpy() - base_logits.numpy()).max() > 1e-2  # the adapter mattered

    review.apply(store, sid, "revert")
    jid = jobs_mod.submit(store, "export_model", {"session_id": sid})
    run_until_idle(Worker(store))
    result = jobs_mod.get(store, jid)["result"]
    assert result["adapted"] is False and result["path"] == str(merged_dir)
    plain = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    _, plain_logits = greedy(plain, processor, image)
    assert np.allclose(plain_logits.numpy(), base_logits.numpy(), atol=1e-5)

    from ui.sessions_tab import export_model_text

    text, finished = export_model_text(jobs_mod.get(store, jid))
    assert finished and "reverted" in text and "**unadapted** model" in text
    store.close()


def test_sessions_tab_adapter_zip_and_merged_model(tiny_model_dir, tmp_path):
    """Through the app's API: the adapter zip holds the peft files only (no optimiser
    state); the merged-model button queues a job whose result the tab polls and reports;
    a reverted session's adapter is refused with the reason."""
    from tests.test_ui import free_port
    from ui.workbench import create_app, launch_options

    store = Store(tmp_path / "data")
    sid, _ = make_session(store, tiny_model_dir("llava"), tmp_path)
    worker = Worker(store, poll_s=0.1).start()
    demo = create_app(store)
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=free_port(),
                **launch_options(store))  # fmt: skip
    try:
        from gradio_client import Client

        c = Client(demo.local_url, verbose=False, download_files=False)
        status, button = c.predict(sid, api_name="/adapter_zip")
        assert "adapter of step 3" in status
        with zipfile.ZipFile(button["value"]["path"]) as zf:
            names = sorted(Path(n).name for n in zf.namelist())
        assert "adapter_model.safetensors" in names and "adapter_config.json" in names
        assert not any("optim" in n or "state" in n for n in names), names

        status = c.predict(sid, api_name="/export_model")[0]
        assert "Merging the adapter" in status
        deadline = time.monotonic() + 120
        while "Merging" in status:
            assert time.monotonic() < deadline, "the export job did not finish"
            time.sleep(0.3)
            status = c.predict(api_name="/export_model_poll")[0]
        status = html.unescape(status)
        assert "adapter of step 3 merged in" in status and str(store.data_dir) in status

        review.apply(store, sid, "revert")
        status, _ = c.predict(sid, api_name="/adapter_zip")
        assert "reverted it to the unadapted model" in html.unescape(status)
        status, _ = c.predict(sid, api_name="/answers_csv")
        assert "answers of 2 images" in status
    finally:
        worker.shutdown(timeout=30)
        demo.close()
        store.close()
