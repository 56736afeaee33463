"""One recorded-run lifecycle (`sessions.runs`) behind both front ends.

The CLI's `--store` path once re-implemented the worker's session lifecycle and the two
copies drifted (issue 11, "One run lifecycle"). Each test here names the drift it guards.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sessions import Store, runs
from sessions import jobs as jobs_mod
from sessions.worker import Worker, run_until_idle
from ttrv.cli import main
from ttrv.config import AdaptConfig
from ttrv.images import load_items

ROOT = Path(__file__).resolve().parent.parent

TASK = [
    "--kind", "multiple_choice", "--options", "cat,dog,bird,fish", "--n-rollouts", "4",
    "--n-train", "4", "--max-new-tokens", "3", "--images-per-step", "2", "--reward", "random",
    "--learning-rate", "0.05",
]  # fmt: skip


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def adapt_argv(model: Path, images: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "adapt", str(images), "--model", str(model), "--out", str(out), *TASK,
        "--store", "--data-dir", str(data), *extra,
    ]  # fmt: skip


def only_session(data: Path) -> dict[str, Any]:
    with Store(data) as store:
        sessions = store.list_sessions()
        assert len(sessions) == 1, [s["id"] for s in sessions]
        return store.get_session(sessions[0]["id"])


def orphan_rollouts(store: Store, sid: str) -> int:
    """Rollout rows whose step row does not exist."""
    steps = {m["step"] for m in store.metrics(sid)}
    rows = store.dump(sid)["rollouts"]
    return sum(r["step"] not in steps for r in rows)


def adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def fake_result(status: str, reason: str, checkpoint: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(status=status, reason=reason, steps=1, checkpoint=checkpoint)


def new_session(store: Store) -> str:
    return store.create_session("t", AdaptConfig().to_dict(), "tiny", "open")


# -- the lifecycle on its own (no model) ------------------------------------------------------


def test_step_and_its_rollouts_are_one_write(tmp_path):
    """Guards rollouts written in one transaction and their step in another: a process
    killed between the two left rollouts without a step (orphan rows)."""
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    adapter.parent.mkdir()
    adapter.write_bytes(b"weights")
    with Store(tmp_path / "data") as store:
        sid = new_session(store)
        with runs.Run(store, sid) as run:
            rollout = {"step": 0, "image_id": "i", "index": 0, "response": "a", "answer": "a",
                       "reward": 1.0}  # fmt: skip
            run.sink("rollouts", {"step": 0, "rollouts": [rollout]})
            assert store.dump(sid)["rollouts"] == [], "rollouts were written before their step"
            run.sink("step", {"step": 0, "round": 0, "loss": 0.5})
            assert len(store.dump(sid)["rollouts"]) == 1 and store.metrics(sid)[0]["step"] == 0
            run.sink("run_end", {"status": "done", "steps": 1, "reason": "all rounds finished"})
            # the engine's run_end is logged, but the session is not done before its adapter
            assert store.status(sid) == "running"
            run.finish(fake_result("done", "all rounds finished"), adapter)
        session = store.get_session(sid)
        assert session["status"] == "done" and session["reason"] == "done: all rounds finished"
        assert store.latest_checkpoint(sid)["exists"]  # no engine checkpoint: the final one


def test_a_run_without_its_adapter_is_not_done(tmp_path):
    """Guards a session reading "done" with no adapter on disk."""
    with Store(tmp_path / "data") as store:
        sid = new_session(store)
        missing = pytest.raises(FileNotFoundError, match="adapter was not written")
        with missing, runs.Run(store, sid) as run:
            run.finish(fake_result("done", "all rounds finished"), tmp_path / "nothing")
        session = store.get_session(sid)
        assert session["status"] == "failed" and "adapter was not written" in session["error"]


def test_a_run_never_stays_running_after_its_block(tmp_path):
    """Guards a session left "running" (or "queued") when its run raised."""
    with Store(tmp_path / "data") as store:
        sid = new_session(store)
        with pytest.raises(ValueError), runs.Run(store, sid):
            raise ValueError("the engine broke")
        assert store.get_session(sid)["error"] == "ValueError: the engine broke"
        assert store.status(sid) == "failed"
        other = new_session(store)
        with pytest.raises(KeyboardInterrupt), runs.Run(store, other):
            raise KeyboardInterrupt
        assert store.status(other) == "interrupted"


def test_the_end_is_recorded_once(tmp_path):
    """Guards a second status write after the end: an error after `finish` (e.g. writing
    the CLI's summary) must not turn a finished run into a failed one."""
    adapter = tmp_path / "adapter_model.safetensors"
    adapter.write_bytes(b"weights")
    with Store(tmp_path / "data") as store:
        sid = new_session(store)
        with pytest.raises(OSError), runs.Run(store, sid) as run:
            run.finish(fake_result("guard_stopped", "collapsed", checkpoint=adapter), adapter)
            raise OSError("summary.json could not be written")
        session = store.get_session(sid)
        assert session["status"] == "stopped" and session["reason"] == "guard_stopped: collapsed"
        assert session["error"] is None


def test_a_session_running_elsewhere_is_not_taken_over(tmp_path):
    """Guards two processes adapting one session: the second is refused, the first's
    status is not touched."""
    with Store(tmp_path / "data") as store:
        sid = new_session(store)
        store.set_status(sid, "running")  # this (live) process, fresh heartbeat
        with pytest.raises(runs.StoreError, match="in another process"), runs.Run(store, sid):
            pass
        assert store.status(sid) == "running"


# -- the CLI and the worker record alike ------------------------------------------------------


def test_cli_run_keeps_the_engine_reason_and_sets_the_status_once(
    tiny_model_dir, images, tmp_path, monkeypatch
):
    """Guards `set_status` after `run_end` wiping the reason that `run_end` wrote."""
    finals: list[str] = []
    original = Store.set_status

    def counting(self: Store, sid: str, status: str, *args: Any, **kwargs: Any) -> None:
        if status not in ("queued", "running"):
            finals.append(status)
        original(self, sid, status, *args, **kwargs)

    monkeypatch.setattr(Store, "set_status", counting)
    data = tmp_path / "data"
    argv = adapt_argv(tiny_model_dir("llava"), images, tmp_path / "run", data, "--rounds", "1")
    assert main(argv) == 0
    session = only_session(data)
    assert session["status"] == "done"
    assert session["reason"] == "done: all rounds finished"
    assert finals == ["done"]
    assert (
        json.loads((tmp_path / "run" / runs.SESSION_FILE).read_text())["session_id"]
        == (session["id"])
    )


def test_guard_stop_is_recorded_alike_by_cli_and_worker(
    tiny_model_dir, images, tmp_path, monkeypatch
):
    """Guards guard-stopped runs reading "done" from the CLI and "stopped" from the worker."""
    import ttrv.guard

    def tripped(*args: Any, **kwargs: Any) -> ttrv.guard.Decision:
        return ttrv.guard.Decision(True, False, "forced by the test", "")

    monkeypatch.setattr(ttrv.guard, "decide", tripped)
    model = tiny_model_dir("llava")
    data = tmp_path / "cli"
    assert main(adapt_argv(model, images, tmp_path / "run", data, "--rounds", "1")) == 0
    from_cli = only_session(data)

    cfg = AdaptConfig.from_dict(from_cli["config"])
    with Store(tmp_path / "app") as store:
        sid = store.create_session("w", cfg.to_dict(), cfg.model.model, cfg.task.kind)
        store.add_images(sid, load_items([images])[0])
        jobs_mod.submit(store, "adapt", {}, sid)
        run_until_idle(Worker(store))
        from_worker = store.get_session(sid)
    for session in (from_cli, from_worker):
        assert session["status"] == "stopped", session["error"]
        assert session["reason"].startswith("guard_stopped: forced by the test")
    assert from_cli["reason"] == from_worker["reason"]


def test_cli_run_beats_while_a_step_runs(tiny_model_dir, images, tmp_path, monkeypatch):
    """Guards a CLI run with no heartbeat: the app took a long step (or a slow model load)
    for a dead process and marked the live run interrupted."""
    import ttrv.adapt

    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.05)
    data = tmp_path / "data"
    seen: list[tuple[str, str]] = []
    real_step = ttrv.adapt.run_step

    def slow_step(*args: Any, **kwargs: Any) -> Any:
        with Store(data) as store:
            sid = store.list_sessions()[0]["id"]
            first = store.get_session(sid)["heartbeat"]
            time.sleep(0.5)
            seen.append((first, store.get_session(sid)["heartbeat"]))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ttrv.adapt, "run_step", slow_step)
    argv = adapt_argv(tiny_model_dir("llava"), images, tmp_path / "run", data, "--rounds", "1")
    assert main(argv) == 0
    assert seen and all(after > before for before, after in seen), seen


def test_disk_full_while_storing_a_checkpoint(
    tiny_model_dir, images, tmp_path, monkeypatch, capsys
):
    """Guards a full disk giving a traceback, a session left running, a `.tmp-*` folder that
    export then shipped, and `shutil.Error` hiding the errno (no disk-full message)."""

    def full_disk(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        Path(dst).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    data = tmp_path / "data"
    argv = adapt_argv(tiny_model_dir("llava"), images, tmp_path / "run", data, "--rounds", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: The disk is full" in err and "Traceback" not in err
    session = only_session(data)
    assert session["status"] == "failed" and session["error"].startswith("The disk is full")
    leftovers = [p for p in data.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    monkeypatch.undo()
    with Store(data) as store:
        archive = store.export_session(session["id"], tmp_path / "s.zip")
    assert not [n for n in zipfile.ZipFile(archive).namelist() if ".tmp-" in n]


# -- kill -9 and resume -----------------------------------------------------------------------

KILLED_CLI = """
import os, signal, sys
sys.path.insert(0, {root!r})
import ttrv.events

real_fanout = ttrv.events.fanout


def fanout(*sinks):
    forward = real_fanout(*sinks)

    def sink(kind, data):
        if kind == {kind!r} and not {after!r} and data.get("step") == {step!r}:
            os.kill(os.getpid(), signal.SIGKILL)  # between the step's rollouts and the step
        forward(kind, data)
        if kind == {kind!r} and {after!r}:
            os.kill(os.getpid(), signal.SIGKILL)

    return sink


ttrv.events.fanout = fanout
from ttrv.cli import main

sys.exit(main(sys.argv[1:]))
"""


def killed_cli(argv: list[str], kind: str, step: int | None = None, after: bool = False) -> None:
    """Run `python -m ttrv <argv>` in a subprocess that kill -9s itself at an engine event:
    before `kind` (with that step) reaches any sink, or right after every sink had it."""
    script = KILLED_CLI.format(root=str(ROOT), kind=kind, step=step, after=after)
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300,
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.slow
def test_killed_cli_run_resumes_into_the_same_session(tiny_model_dir, images, tmp_path):
    """Guards `--resume --store` making a new session with only the steps after the resume
    point and no "before" answers, orphan rollouts of the step being written when killed,
    and a killed CLI run staying "running": kill -9, resume, and the one session ends done
    with every step and the uninterrupted run's weights."""
    model = tiny_model_dir("llava")
    rounds = ("--rounds", "3", "--no-guard")
    assert main(adapt_argv(model, images, tmp_path / "whole", tmp_path / "d1", *rounds)) == 0

    out, data = tmp_path / "run", tmp_path / "d2"
    argv = adapt_argv(model, images, out, data, *rounds)
    killed_cli(argv, "step", step=3)  # round 1's checkpoint (step 2) is on disk
    killed = only_session(data)
    with Store(data) as store:
        assert orphan_rollouts(store, killed["id"]) == 0
        assert [m["step"] for m in store.metrics(killed["id"])] == [0, 1, 2]

    resumed_argv = [*argv, "--resume", str(out / "checkpoints" / "round-1")]
    assert main(resumed_argv) == 0
    session = only_session(data)  # the same session, not a second one
    assert session["id"] == killed["id"]
    assert session["status"] == "done" and session["reason"] == "done: all rounds finished"
    with Store(data) as store:
        sid = session["id"]
        assert [m["step"] for m in store.metrics(sid)] == list(range(6))
        assert orphan_rollouts(store, sid) == 0
        assert len(store.dump(sid)["rollouts"]) == 6 * 2 * 4  # steps x images x N
        answers = store.answers(sid)
        assert len(answers) == 4 and all(a["before"] is not None for a in answers)
        (resumed,) = store.events(sid, kind="resumed")
        # the dead CLI run was detected (pid gone) before the session was continued
        assert resumed["data"]["previous_status"] == "interrupted"
        assert resumed["data"]["step"] == 2
    whole, again = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(out / "adapter")
    assert whole.keys() == again.keys()
    assert all(np.array_equal(whole[k].numpy(), again[k].numpy()) for k in whole)


@pytest.mark.slow
def test_cli_killed_after_run_end_is_not_done(tiny_model_dir, images, tmp_path):
    """Guards a CLI killed after its run-end event reading "done" with no adapter on disk."""
    model = tiny_model_dir("llava")
    out, data = tmp_path / "run", tmp_path / "data"
    argv = adapt_argv(model, images, out, data, "--rounds", "1")
    killed_cli(argv, "run_end", after=True)
    assert not (out / "adapter").exists()
    with Store(data) as store:
        sid = only_session(data)["id"]
        assert store.get_session(sid)["status"] == "running"  # its process is gone...
        runs.mark_interrupted(store)  # ...which any later run (CLI or app) notices first
        assert store.get_session(sid)["status"] == "interrupted"
    assert main([*argv, "--resume", str(out / "checkpoints" / "round-1")]) == 0
    session = only_session(data)
    assert session["status"] == "done" and (out / "adapter" / "adapter_model.safetensors").exists()


# -- a read-only store ------------------------------------------------------------------------

BROWSE = """
import json, sys
sys.path.insert(0, {root!r})
from sessions import Store, StoreError
store = Store({data!r})
out = {{"read_only": store.read_only, "sessions": store.list_sessions()}}
out["metrics"] = store.metrics(out["sessions"][0]["id"])
try:
    store.create_session("x", {{}}, "m", "open")
except StoreError as e:
    out["write_error"] = str(e)
print(json.dumps(out))
"""


def test_read_only_data_dir_opens_for_browsing(tmp_path):
    """Guards a read-only store reported as "not a readable SQLite database"."""
    # Under a world-readable temporary folder: as root the check runs as `nobody`, since
    # root may write anywhere and a read-only folder is not read-only for it.
    parent = Path(tempfile.mkdtemp(prefix="ttrv-ro-"))
    data = parent / "data"
    try:
        with Store(data) as store:
            sid = new_session(store)
            store.sink(sid)("step", {"step": 0, "round": 0, "loss": 0.25})
        for p in [parent, *parent.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        command = [sys.executable, "-c", BROWSE.format(root=str(ROOT), data=str(data))]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot drop write access")
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen["read_only"] is True
        assert [s["id"] for s in seen["sessions"]] == [sid]
        assert [m["loss"] for m in seen["metrics"]] == [0.25]
        assert "read-only" in seen["write_error"]
    finally:
        for p in [parent, *parent.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(stat.S_IRWXU | (stat.S_IRGRP | stat.S_IXGRP if p.is_dir() else 0))
        shutil.rmtree(parent, ignore_errors=True)


def test_read_only_open_never_writes(tmp_path):
    """The read-only connection refuses writes and leaves the database file's bytes as
    they were (SQLite may add its WAL index files beside it where it can)."""
    from sessions.schema import connect

    with Store(tmp_path / "data") as store:
        new_session(store)
    path = tmp_path / "data" / "sessions.db"
    before = path.read_bytes()
    db = connect(path, read_only=True)
    assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("DELETE FROM sessions")
    db.close()
    assert path.read_bytes() == before


def test_worker_resume_without_a_checkpoint_fails_the_session(tmp_path):
    """Guards a regression of moving the end into `runs.Run`: an adaptation that fails
    before its run takes the session over must not leave the session "queued"."""
    with Store(tmp_path / "data") as store:
        sid = new_session(store)
        job = jobs_mod.submit(store, "adapt", {"resume": True}, sid)
        run_until_idle(Worker(store))
        assert jobs_mod.get(store, job)["status"] == "failed"
        session = store.get_session(sid)
        assert session["status"] == "failed" and "No checkpoint to resume from" in session["error"]


def test_a_read_only_store_starts_no_worker(tmp_path, monkeypatch):
    """Guards the app failing to start (or polling a failing write forever) on a data
    directory it may only browse."""
    with Store(tmp_path / "data") as store:
        monkeypatch.setattr(store, "read_only", True)
        worker = Worker(store).start()
        assert worker._thread is None
