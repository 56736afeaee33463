"""Running on a chosen set of devices: the config's rules, the accelerate command, the plan
of a model split over GPUs (on the meta device, so no GPU is needed), and the app's worker
running a session data parallel under `accelerate launch` (gloo CPU processes here):
the same adapter as one process, events once, stop, resume with it, and a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sessions import Store
from sessions import jobs as jobs_mod
from sessions.runs import mark_interrupted
from sessions.worker import LAUNCH_LOG, Worker
from tests.test_distributed import assert_same_weights, dp_config, lora_weights
from tests.test_engine import loaded_model, make_items
from tests.test_worker import new_session
from ttrv.adapt import adapt
from ttrv.config import AdaptConfig, ConfigError, ModelConfig
from ttrv.distributed import Single
from ttrv.images import load_items
from ttrv.launch import launch_command
from ttrv.lora import ADAPTER_FILE
from ttrv.placement import (
    GIB,
    PlacementError,
    _ranges,
    check_gpus,
    gpu_budgets,
    placement_summary,
    split_plan,
)

ROOT = Path(__file__).resolve().parent.parent

# -- the config ------------------------------------------------------------------------------


def test_device_settings_are_checked_with_messages_that_say_what_to_do():
    assert ModelConfig(gpus=" 2, 0 ").gpu_list() == [2, 0]
    assert ModelConfig(gpus="0,1").data_parallel() == 2
    assert ModelConfig(gpus="0,1", placement="split").data_parallel() == 1
    assert ModelConfig(device="cpu", processes=3).data_parallel() == 3
    refused = {
        "gpus='a'": (dict(gpus="a"), "CUDA indices"),
        "twice": (dict(gpus="1,1"), "twice"),
        "cpu": (dict(gpus="0", device="cpu"), "device is cpu"),
        "split of one": (dict(gpus="0", placement="split"), "at least two"),
        "both counts": (dict(gpus="0,1", processes=2), "leave processes at 1"),
        "cap unsplit": (dict(gpus="0,1", max_memory_gib=4), "set placement to split"),
    }
    for kwargs, words in refused.values():
        with pytest.raises(ConfigError, match=words):
            ModelConfig(**kwargs)


def test_gpus_this_machine_lacks_are_named():
    with pytest.raises(PlacementError, match="no CUDA GPU"):
        check_gpus(ModelConfig(gpus="0"), available=0)
    with pytest.raises(PlacementError, match=r"GPU 2 is not on this machine; it has 2 \(0, 1\)"):
        check_gpus(ModelConfig(gpus="0,2"), available=2)
    check_gpus(ModelConfig(gpus="1,0"), available=2)  # no error
    with pytest.raises(PlacementError, match="processes is 3 but this machine has 2 GPU"):
        check_gpus(ModelConfig(processes=3), available=2)
    check_gpus(ModelConfig(processes=3, device="cpu"), available=2)  # CPU processes


# -- the launcher command ----------------------------------------------------------------------


def test_launch_command_gives_each_gpu_a_process_or_shares_the_cores(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    argv, env = launch_command(ModelConfig(gpus="1,3"), ["adapt", "x"], cuda_available=True,
                               port=1234)  # fmt: skip
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert argv[argv.index("--num_processes") + 1] == "2" and "--gpu_ids" not in argv
    assert env == {"CUDA_VISIBLE_DEVICES": "1,3"}
    assert argv[argv.index("--main_process_port") + 1] == "1234"
    assert argv[-4:] == ["-m", "ttrv", "adapt", "x"]
    # Under a scheduler's CUDA_VISIBLE_DEVICES the indices are of the GPUs this process
    # sees: 0 and 1 here are physical 5 and 7 (or their UUIDs), never physical 0 and 1.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,2")
    _, env = launch_command(ModelConfig(gpus="0,1"), [], cuda_available=True)
    assert env == {"CUDA_VISIBLE_DEVICES": "5,7"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb")
    assert launch_command(ModelConfig(gpus="1"), [], cuda_available=True)[1] == {
        "CUDA_VISIBLE_DEVICES": "GPU-bb"
    }
    argv, env = launch_command(ModelConfig(device="cpu", processes=3), ["adapt"],
                               cuda_available=True, cpu_count=8)  # fmt: skip
    assert "--gpu_ids" not in argv and argv[argv.index("--num_processes") + 1] == "3"
    assert env == {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "2"}
    # auto without CUDA runs on the CPU; auto with CUDA on the first GPUs
    assert launch_command(ModelConfig(processes=2), [], cuda_available=False)[1] != {}
    assert launch_command(ModelConfig(processes=2), [], cuda_available=True)[1] == {}


# -- a model split over GPUs -------------------------------------------------------------------


def real_config(name: str):
    from bench.host_ops import real_config as read

    return read(ROOT / "bench" / "configs" / f"{name}.json")


def planned_bytes(config, plan, quantization: str, skip: list[str]) -> dict[int, int]:
    """Bytes of weights the plan puts on each GPU, at their loaded sizes."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForImageTextToText

    from ttrv.placement import quantized_weights

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.tie_weights()
    special = quantized_weights(model, quantization, skip)
    sizes = compute_module_sizes(model, dtype=torch.bfloat16, special_dtypes=special)
    out: dict[int, int] = {}
    for name, device in plan.items():
        out[device] = out.get(device, 0) + sizes[name]
    return out


@pytest.mark.slow
def test_split_plan_spreads_a_3b_model_over_two_gpus_and_refuses_what_does_not_fit():
    """Qwen2.5-VL-3B (3.75 B parameters, 7.0 GiB in bf16) over two GPUs of 6 GiB each:
    every block on one of the two, none on the CPU or disk, the embeddings (where inputs
    go) and the lm_head tied to them on the first listed, no GPU over its budget; 2 GiB
    each does not fit in bf16; 2.5 GiB each does in 4-bit (3.1 GiB: the vision tower,
    embeddings and lm_head stay bf16, counted so), again within each budget."""
    from ttrv.loading import non_language_modules

    config = real_config("qwen2_5_vl_3b")
    plan = split_plan(config, "none", torch.bfloat16, {0: 6 * GIB, 1: 6 * GIB})
    assert set(plan.values()) == {0, 1}
    assert plan["model.language_model.embed_tokens"] == 0 == plan.get("lm_head", 0)
    layers = {int(k.rsplit(".", 1)[1]): d for k, d in plan.items()
              if k.startswith("model.language_model.layers.")}  # fmt: skip
    if layers:  # whole decoder layers, in order: first GPU then second
        assert sorted(layers.values()) == [layers[i] for i in sorted(layers)]
    assert all(b <= 6 * GIB for b in planned_bytes(config, plan, "none", []).values())
    with pytest.raises(PlacementError, match=r"needs about 7\.\d GiB .* may hold 4\.0 GiB"):
        split_plan(config, "none", torch.bfloat16, {0: 2 * GIB, 1: 2 * GIB})
    skip = non_language_modules(config)
    budget = int(2.5 * GIB)
    plan4 = split_plan(config, "4bit", torch.bfloat16, {2: budget, 3: budget}, skip)
    assert set(plan4.values()) == {2, 3}
    used = planned_bytes(config, plan4, "4bit", skip)
    assert all(b <= budget for b in used.values()), {d: b / GIB for d, b in used.items()}
    # 3.1 GiB in 4-bit would fit 2 x 2 GiB in total, but not block by block: said so
    with pytest.raises(PlacementError, match=r"3\.1 GiB of weights do not divide into GPUs"):
        split_plan(config, "4bit", torch.bfloat16, {2: 2 * GIB, 3: 2 * GIB}, skip)


def test_gpu_budgets_take_the_cap_or_a_share_of_what_is_free():
    cfg = ModelConfig(gpus="0,1", placement="split")
    assert gpu_budgets(cfg, free_gib={0: 10.0, 1: 5.0}) == {0: 8 * GIB, 1: 4 * GIB}
    capped = ModelConfig(gpus="0,1", placement="split", max_memory_gib=3)
    assert gpu_budgets(capped) == {0: 3 * GIB, 1: 3 * GIB}


def test_placement_summary_names_each_device_its_blocks_and_memory():
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(256, 64)  # 64 KiB in fp32
            self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64, bias=False)
                                              for _ in range(4))  # fmt: skip

    model = Two()
    assert placement_summary(model) == [{"device": "cpu", "parts": ["whole model"],
                                         "mib": 0.1}]  # fmt: skip
    model.layers[2].to("meta")
    model.layers[3].to("meta")
    model.hf_device_map = {"embed": "cpu", "layers.0": "cpu", "layers.1": "cpu",
                           "layers.2": "meta", "layers.3": "meta"}  # fmt: skip
    assert placement_summary(model) == [
        {"device": "cpu", "parts": ["embed", "layers.0-1"], "mib": 0.1},
        {"device": "meta", "parts": ["layers.2-3"], "mib": 0.0},
    ]
    assert _ranges(["a.0", "a.1", "a.3", "b", "c.4", "c.5"]) == ["a.0-1", "a.3", "b", "c.4-5"]


# -- the app's worker, data parallel ---------------------------------------------------------


def dp_session_config(folder: Path, processes: int) -> AdaptConfig:
    cfg = dp_config(folder)
    cfg.model = ModelConfig(model=str(folder), device="cpu", processes=processes)
    return cfg


def image_folder(tmp_path: Path, n: int) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    for it in make_items(n):
        it.image.save(folder / f"{it.name}.png")
    return sorted(folder.iterdir())


def events_of(store: Store, sid: str, kind: str) -> list[dict]:
    return [e["data"] for e in store.events(sid, kind=kind)]


@pytest.mark.slow
def test_worker_runs_a_session_on_two_processes_as_one_process_would(tiny_model_dir, tmp_path):
    """The app's worker starts the run under accelerate (2 gloo processes): the session
    ends done, its events are recorded once, and its adapter equals one process's."""
    folder = tiny_model_dir("llava")
    cfg = dp_session_config(folder, processes=2)
    files = image_folder(tmp_path, 6)
    store = Store(tmp_path / "data")
    sid = new_session(store, cfg, files)
    jobs_mod.submit(store, "adapt", {}, sid)
    worker = Worker(store)
    worker.run_job(jobs_mod.claim_next(store))
    job = jobs_mod.latest(store, "adapt", sid)
    log = (store.adapter_dir(sid) / LAUNCH_LOG).read_text()
    assert store.get_session(sid)["status"] == "done", log[-3000:]
    assert job["status"] == "done" and job["result"]["processes"] == 2
    assert [m["step"] for m in store.metrics(sid)] == [0, 1]
    starts = events_of(store, sid, "run_start")
    assert len(starts) == 1 and starts[0]["processes"] == 2
    answers = store.answers(sid)
    assert len(answers) == 6 and all(a["after"] is not None for a in answers)
    # Its export carries the adapter, not this machine's record of the launch (paths)
    import zipfile

    store.export_session(sid, tmp_path / "dp.zip")
    names = zipfile.ZipFile(tmp_path / "dp.zip").namelist()
    assert "adapters/adapter/adapter_model.safetensors" in names
    assert not [n for n in names if n.rsplit("/", 1)[-1] in (LAUNCH_LOG, "session.json")]
    adapter = load_file(store.adapter_dir(sid) / "adapter" / ADAPTER_FILE)
    loaded = loaded_model(folder, cfg)
    adapt(loaded, load_items([str(f) for f in files])[0], cfg, dist=Single())
    reference = {k.replace(".default", ""): v for k, v in lora_weights(loaded.model).items()}
    assert_same_weights(adapter, reference)


@pytest.mark.slow
def test_cli_starts_itself_under_accelerate_when_the_config_asks_for_processes(
    tiny_model_dir, tmp_path
):
    """`python -m ttrv adapt --device cpu --processes 2` (no launcher typed) runs as the
    documented `accelerate launch` command does: 2 processes, events written once."""
    cfg = dp_session_config(tiny_model_dir("llava"), processes=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    image_folder(tmp_path, 6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ttrv", "adapt", str(tmp_path / "images"), "--config",
         str(config), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 processes" in done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["processes"] == 2
    kinds = [json.loads(line)["kind"]
             for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]  # fmt: skip
    assert kinds.count("run_start") == 1 and kinds.count("step") == 2


def run_in_thread(worker: Worker, store: Store) -> threading.Thread:
    thread = threading.Thread(target=worker.run_job, args=(jobs_mod.claim_next(store),))
    thread.start()
    return thread


def wait_for_step(store: Store, sid: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not store.metrics(sid):
        assert time.monotonic() < deadline, "no step recorded"
        time.sleep(0.2)


@pytest.mark.slow
def test_launched_run_stops_resumes_and_a_killed_one_fails_with_its_log(tiny_model_dir, tmp_path):
    """A stop request reaches the processes within a step; resume continues to the end
    (40 steps over 20 rounds); a run whose main process is killed (as the kernel kills one
    out of memory) is failed with the last lines of its log."""
    folder = tiny_model_dir("llava")
    cfg = dp_session_config(folder, processes=2)
    # Long enough (40 steps) that a stop or a kill after the first step lands mid-run; no
    # guard or converged images to end it sooner.
    cfg.optim.rounds, cfg.optim.skip_converged, cfg.guard.guard = 20, False, False
    files = image_folder(tmp_path, 6)
    store = Store(tmp_path / "data")
    worker = Worker(store)
    sid = new_session(store, cfg, files)
    jobs_mod.submit(store, "adapt", {}, sid)
    thread = run_in_thread(worker, store)
    wait_for_step(store, sid)
    jobs_mod.request_stop(store, sid)
    thread.join(240)
    session = store.get_session(sid)
    stopped_at = len(store.metrics(sid))
    assert session["status"] == "stopped" and stopped_at < 40, session
    jobs_mod.submit(store, "adapt", {"resume": True}, sid)
    worker.run_job(jobs_mod.claim_next(store))
    assert store.get_session(sid)["status"] == "done"
    assert [m["step"] for m in store.metrics(sid)] == list(range(40))
    assert len(events_of(store, sid, "resumed")) == 1

    killed = new_session(store, cfg, files)
    jobs_mod.submit(store, "adapt", {}, killed)
    thread = run_in_thread(worker, store)
    wait_for_step(store, killed)
    assert len(worker._children) == 1
    os.kill(store.get_session(killed)["pid"], signal.SIGKILL)  # the recording process dies
    thread.join(120)
    session = store.get_session(killed)
    assert session["status"] == "failed"
    assert "before recording its end" in session["error"] and LAUNCH_LOG in session["error"]
    assert jobs_mod.latest(store, "adapt", killed)["status"] == "failed"
    assert not worker._children

    # A stop asked while the processes start (the session still "queued") is not lost.
    early = new_session(store, cfg, files)
    jobs_mod.submit(store, "adapt", {}, early)
    thread = run_in_thread(worker, store)
    assert jobs_mod.request_stop(store, early) == "Stopping as soon as the run has started."
    thread.join(120)
    session = store.get_session(early)
    assert session["status"] == "stopped", session
    assert len(store.metrics(early)) <= 1 and not worker._children

    # The app closing takes the run's processes with it; the session is then interrupted
    # (resumable), as an in-process run is when the app dies.
    closed = new_session(store, cfg, files)
    jobs_mod.submit(store, "adapt", {}, closed)
    thread = run_in_thread(worker, store)
    wait_for_step(store, closed)
    pid = store.get_session(closed)["pid"]
    worker.shutdown()
    thread.join(120)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the run's main process outlived the app"
        time.sleep(0.2)
    assert closed in mark_interrupted(store)
    assert store.get_session(closed)["status"] == "interrupted"


# -- the app: choosing devices -----------------------------------------------------------------


def test_start_checks_the_devices_and_says_where_the_run_goes():
    from ui.checks import check_devices

    assert check_devices(ModelConfig(), gpus_here=0) == ""
    assert check_devices(ModelConfig(device="cpu", processes=2), gpus_here=0) == (
        "2 data-parallel processes on the CPU"
    )
    assert check_devices(ModelConfig(gpus="1,0"), gpus_here=2) == (
        "2 processes, one per GPU (1, 0)"
    )
    assert check_devices(ModelConfig(gpus="0,1", placement="split"), gpus_here=2) == (
        "one copy split over GPUs 0, 1"
    )
    with pytest.raises(ValueError, match="GPU 3 is not on this machine"):
        check_devices(ModelConfig(gpus="3"), gpus_here=2)
    # device cuda on a machine without one: refused before a session exists
    with pytest.raises(ValueError, match="device is cuda but this machine has no CUDA GPU"):
        check_devices(ModelConfig(device="cuda", processes=2), gpus_here=0)
    assert check_devices(ModelConfig(processes=2), gpus_here=0).endswith("on the CPU")
    assert check_devices(ModelConfig(processes=2), gpus_here=4).endswith("first 2 GPUs")


def test_model_tab_lists_this_machines_devices_and_where_a_split_model_sits():
    from ui.model_tab import devices_text, job_text

    assert "no CUDA GPU" in devices_text([], 2) and "2 CPU cores" in devices_text([], 2)
    gpus = [{"index": 0, "name": "H200", "total_gib": 139.8},
            {"index": 1, "name": "H200", "total_gib": 139.8}]  # fmt: skip
    text = devices_text(gpus, 16)
    assert "**0** H200 (140 GiB)" in text and "**1** H200" in text
    placement = [{"device": "cuda:0", "parts": ["model.visual", "model.language_model.layers.0-17"],
                  "mib": 3500.0},
                 {"device": "cuda:1", "parts": ["model.language_model.layers.18-35"],
                  "mib": 3300.4}]  # fmt: skip
    job = {"status": "done", "request": {"model": {"model": "Qwen/Qwen2.5-VL-3B-Instruct"}},
           "result": {"info": {"device": "cuda:0", "placement": placement}}}  # fmt: skip
    shown = job_text(job)
    assert "- **cuda:0**: model.visual, model.language_model.layers.0-17 (3500 MiB)" in shown
    assert "- **cuda:1**: model.language_model.layers.18-35 (3300 MiB)" in shown
    one = {**job, "result": {"info": {"device": "cpu", "placement": placement[:1]}}}
    assert "cuda:1" not in job_text(one)


def test_session_runs_refuse_other_arguments_and_a_missing_store(tmp_path, capsys):
    from ttrv.cli import main

    assert main(["adapt", "--session", "abc", "--rounds", "2", "--name", "x"]) == 2
    assert "--name, --rounds cannot go with it" in capsys.readouterr().err
    assert main(["adapt", "--session", "abc", "--data-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "No session store in" in err and "sessions.db" in err
    assert not (tmp_path / "none").exists()  # nothing created on the way


def test_an_interrupted_run_says_how_to_continue(tmp_path):
    from ttrv.cli import _resume_hint, build_parser

    args = build_parser().parse_args(["adapt", "a.png", "b", "--out", str(tmp_path)])
    assert "no checkpoint was saved yet" in _resume_hint(args)
    for tag in ("round-1", "round-2"):
        (tmp_path / "checkpoints" / tag).mkdir(parents=True)
        (tmp_path / "checkpoints" / tag / "state.json").write_text("{}")
        time.sleep(0.01)
    hint = _resume_hint(args)
    assert hint.endswith(f"python -m ttrv adapt a.png b --resume {tmp_path}/checkpoints/round-2")


def test_a_run_whose_app_is_gone_stops_after_its_step(tiny_model_dir, tmp_path, monkeypatch,
                                                      capsys):  # fmt: skip
    """The worker names itself in TTRV_WATCH_PID; once that process is gone the run stops
    at its next step boundary ("stopped", resumable) and says why, instead of training on
    unseen."""
    from ttrv.cli import main
    from ttrv.launch import WATCH_PID_ENV, watched_process_gone

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv(WATCH_PID_ENV, str(os.getpid()))
    assert not watched_process_gone()
    monkeypatch.setenv(WATCH_PID_ENV, str(gone.pid))
    assert watched_process_gone()
    cfg = dp_session_config(tiny_model_dir("llava"), processes=1)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    image_folder(tmp_path, 6)
    out = tmp_path / "run"
    assert main(["adapt", str(tmp_path / "images"), "--config", str(config), "--out",
                 str(out)]) == 0  # fmt: skip
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    # the stop is asked before every step: gone from the start, the run takes none
    assert [e["kind"] for e in events].count("step") == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"
    assert any("The app that started this run is gone" in e.get("message", "") for e in events)
