"""The background worker through the store: follow, stop, fail, kill, resume, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sessions import Store, StoreError
from sessions import jobs as jobs_mod
from sessions.worker import Worker, run_until_idle
from ttrv.config import (
    AdaptConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    TaskConfig,
)
from ttrv.images import load_items

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def image_files(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        p = tmp_path / "imgs" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def session_config(folder: Path, rounds: int = 2) -> AdaptConfig:
    return AdaptConfig(
        model=ModelConfig(model=str(folder)),
        task=TaskConfig(kind="multiple_choice", options="cat,dog,bird,fish"),
        rollout=RolloutConfig(n_rollouts=4, n_train=4, max_new_tokens=3),
        reward=RewardConfig(reward="random"),
        optim=OptimConfig(images_per_step=2, rounds=rounds, learning_rate=0.05),
    )


def new_session(store: Store, cfg: AdaptConfig, image_files: list[Path]) -> str:
    items, _ = load_items(image_files)
    sid = store.create_session("test", cfg.to_dict(), cfg.model.model, cfg.task.kind)
    store.add_images(sid, items)
    return sid


def test_adapt_job_is_followed_through_the_store(tiny_model_dir, tmp_path, image_files):
    store = Store(tmp_path / "data")
    sid = new_session(store, session_config(tiny_model_dir("llava")), image_files)
    jobs_mod.submit(store, "adapt", {}, sid)
    with pytest.raises(StoreError, match="already has"):
        jobs_mod.submit(store, "adapt", {}, sid)  # a second tab clicking start
    run_until_idle(Worker(store))
    session = store.get_session(sid)
    assert session["status"] == "done"
    assert [m["step"] for m in store.metrics(sid)] == [0, 1, 2, 3]
    answers = store.answers(sid)
    assert len(answers) == 4 and all(a["before"] is not None for a in answers)
    assert store.latest_checkpoint(sid)["exists"]
    assert len(store.rollouts(sid, answers[0]["image_id"])) == 4
    job = jobs_mod.latest(store, "adapt", sid)
    assert job["status"] == "done" and job["result"]["steps"] == 4


def test_job_that_raises_keeps_earlier_steps_and_worker_goes_on(
    tiny_model_dir, tmp_path, image_files, monkeypatch
):
    """Guards 'a crash must not lose what was already computed' and a wedged worker."""
    import ttrv.adapt as adapt_mod

    store = Store(tmp_path / "data")
    cfg = session_config(tiny_model_dir("llava"))
    sid = new_session(store, cfg, image_files)
    real = adapt_mod.run_step
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in step 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_mod, "run_step", flaky)
    jobs_mod.submit(store, "adapt", {}, sid)
    worker = Worker(store)
    run_until_idle(worker)
    session = store.get_session(sid)
    assert session["status"] == "failed"
    assert "boom in step 3" in session["error"] and "Traceback" in session["traceback"]
    assert [m["step"] for m in store.metrics(sid)] == [0, 1]

    monkeypatch.setattr(adapt_mod, "run_step", real)
    other = new_session(store, cfg, image_files)
    jobs_mod.submit(store, "adapt", {}, other)
    run_until_idle(worker)
    assert store.get_session(other)["status"] == "done"


def test_out_of_memory_is_reported_plainly(tiny_model_dir, tmp_path, image_files, monkeypatch):
    import torch

    import ttrv.adapt as adapt_mod

    store = Store(tmp_path / "data")
    sid = new_session(store, session_config(tiny_model_dir("llava")), image_files)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(adapt_mod, "run_step", oom)
    jobs_mod.submit(store, "adapt", {}, sid)
    worker = Worker(store)
    run_until_idle(worker)
    session = store.get_session(sid)
    assert session["status"] == "failed" and session["error"].startswith("Out of memory")
    assert worker.loaded is None  # the model was dropped to free memory


def test_stop_request_is_honoured_within_one_step(tiny_model_dir, tmp_path, image_files):
    store = Store(tmp_path / "data")
    sid = new_session(store, session_config(tiny_model_dir("llava"), rounds=5), image_files)
    jobs_mod.submit(store, "adapt", {}, sid)
    worker = Worker(store, poll_s=0.05).start()
    try:
        deadline = time.monotonic() + 120
        while not store.metrics(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.metrics(sid), "no step was recorded"
        assert jobs_mod.request_stop(store, sid) == "Stopping after the current step."
        assert jobs_mod.request_stop(store, sid) == "Already stopping."
        steps_at_request = len(store.metrics(sid))
        while store.get_session(sid)["status"] == "stopping" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.shutdown()
    assert store.get_session(sid)["status"] == "stopped"
    assert len(store.metrics(sid)) <= steps_at_request + 1
    assert store.latest_checkpoint(sid)["exists"]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from sessions import Store
from sessions.worker import Worker
Worker(Store({data!r}), poll_s=0.05).start()
time.sleep(600)
"""


@pytest.mark.slow
def test_killed_run_is_interrupted_and_resumes_from_checkpoint(
    tiny_model_dir, tmp_path, image_files
):
    """A process killed mid-run: next start marks it interrupted; resume skips done steps."""
    data = tmp_path / "data"
    store = Store(data)
    cfg = session_config(tiny_model_dir("llava"), rounds=3)
    sid = new_session(store, cfg, image_files)
    jobs_mod.submit(store, "adapt", {}, sid)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), data=str(data))],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ckpt = store.latest_checkpoint(sid)
            if ckpt and ckpt["step"] >= 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the worker subprocess wrote no checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    resumed_from = store.latest_checkpoint(sid)["step"]
    assert resumed_from < 6

    worker = Worker(Store(data))  # a fresh start of the app
    worker.store.mark_interrupted_on_start()
    assert worker.store.get_session(sid)["status"] == "interrupted"
    jobs_mod.recover(worker.store)
    kept = [m for m in worker.store.metrics(sid) if m["step"] < resumed_from]
    assert [m["step"] for m in kept] == list(range(resumed_from))
    jobs_mod.submit(worker.store, "adapt", {"resume": True}, sid)
    run_until_idle(worker)
    session = worker.store.get_session(sid)
    assert session["status"] == "done", session.get("error")
    steps = [m["step"] for m in worker.store.metrics(sid)]
    assert steps == list(range(6))
    # steps before the checkpoint were not run again (their rows are untouched)
    assert [m for m in worker.store.metrics(sid) if m["step"] < resumed_from] == kept


def test_export_import_roundtrip_after_a_run(tiny_model_dir, tmp_path, image_files):
    store = Store(tmp_path / "data")
    cfg = session_config(tiny_model_dir("llava"), rounds=1)
    sid = new_session(store, cfg, image_files)
    jobs_mod.submit(store, "adapt", {}, sid)
    run_until_idle(Worker(store))
    archive = store.export_session(sid, tmp_path / "s.zip")
    other = Store(tmp_path / "data2")
    new_id = other.import_archive(archive)
    assert other.metrics(new_id) == store.metrics(sid)
    assert other.answers(new_id) == store.answers(sid)
    assert other.latest_checkpoint(new_id)["exists"]


def test_ask_job_answers_with_base_and_adapted(tiny_model_dir, tmp_path, image_files):
    store = Store(tmp_path / "data")
    cfg = session_config(tiny_model_dir("llava"), rounds=1)
    sid = new_session(store, cfg, image_files)
    jobs_mod.submit(store, "adapt", {}, sid)
    run_until_idle(Worker(store))
    job_id = jobs_mod.submit(
        store, "ask", {"image_path": str(image_files[0]), "question": "What is it?",
                       "session_id": sid})  # fmt: skip
    run_until_idle(Worker(store))
    result = jobs_mod.get(store, job_id)["result"]
    assert set(result["base"]) >= {"response", "answer"}
    assert result["adapted"] is not None and result["question"] == "What is it?"
