"""Data parallelism on CPU: gloo groups of 2 and 3 processes adapt as one process does.

The groups are forked from the test process (the imports are inherited, so a group starts
in well under a second) and joined through accelerate's `PartialState`, exactly as
`accelerate launch` starts them (WORLD_SIZE, RANK, MASTER_ADDR/PORT, ACCELERATE_USE_CPU);
one test runs the real `accelerate launch ... -m ttrv adapt` command.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_engine import loaded_model, make_items, small_config
from ttrv.adapt import adapt, trainable_params
from ttrv.config import AdaptConfig
from ttrv.distributed import Accelerated, Single, shard_range
from ttrv.images import load_items
from ttrv.keyed import KeyedSampler, gumbel_noise, hashed_vocab, row_keys
from ttrv.lora import ADAPTER_FILE
from ttrv.tasks import Item

ROOT = Path(__file__).resolve().parent.parent
# Weights of a P-process run against one process's, after the same 2 steps at lr 0.05 (the
# weights reach ~0.14). Not bitwise: each process's forward covers its own images (other
# padding, other summation order) and gradients are summed over processes, so they differ
# by float rounding (~1e-7 absolute, ~1e-6 relative: measured). Adam divides by the
# gradient's own size, so where a gradient is itself at rounding level (< 1e-7) that
# rounding decides a visible part of the update. Measured: in-process groups at most
# 1.0e-5 (10 of 16,384 weights beyond 1e-6 with 3 processes); the CLI under accelerate
# (other images, the packed training forward) 7.0e-4, in 7 weights whose gradients were
# below 1e-7. So the bound on the worst weight is loose (4% of the learning rate) and
# the share of weights that may differ at all is tight: a lost or doubled gradient
# share would move most weights by about the learning rate.
WEIGHT_ATOL = 2e-3
WEIGHT_SHARE_ABOVE_1E6 = 0.005  # at most this share of weights may differ by more than 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lora_weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_params(model).items()}


def _member(
    rank: int,
    size: int,
    port: int,
    folder: Path,
    cfg: AdaptConfig,
    items: list[Item],
    out: Path,
    stop_after: int | None,
    resume: Path | None,
) -> None:
    """One process of a gloo group: adapt, then leave its weights, events and result in
    `out/rank-<r>.*` for the test to read."""
    code = 0
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
            ACCELERATE_USE_CPU="1",
        )  # fmt: skip
        # A fork inherits accelerate's process-wide state: a parent that made an Accelerator
        # (TRL's trainer in tests/test_speed_equivalence.py) would leave it "one process".
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        dist = Accelerated()
        loaded = loaded_model(folder, cfg)
        events: list[tuple[str, dict[str, Any]]] = []
        steps = []

        def sink(kind: str, data: dict[str, Any]) -> None:
            events.append((kind, data))
            if kind == "step":
                steps.append(data["step"])

        def stop() -> bool:  # only the main process's answer may count
            return stop_after is not None and (rank != 0 or len(steps) >= stop_after)

        result = adapt(loaded, items, cfg, sink, stop, output_dir=out, resume_from=resume,
                       dist=dist)  # fmt: skip
        save_file(lora_weights(loaded.model), out / f"rank-{rank}.safetensors")
        (out / f"rank-{rank}.json").write_text(
            json.dumps(
                {
                    "status": result.status,
                    "steps": result.steps,
                    "checkpoint": str(result.checkpoint),
                    "events": events,
                    "after": result.after,
                }
            )
        )
        dist.close()
    except BaseException:  # noqa: BLE001 - reported to the test through the file
        (out / f"rank-{rank}.error").write_text(traceback.format_exc())
        code = 1
    os._exit(code)  # no pytest teardown in a forked child


def run_group(
    size: int,
    folder: Path,
    cfg: AdaptConfig,
    items: list[Item],
    out: Path,
    stop_after: int | None = None,
    resume: Path | None = None,
) -> list[dict[str, Any]]:
    """Adapt in `size` forked processes; each rank's weights and record."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_member,
                    args=(r, size, port, folder, cfg, items, out, stop_after, resume))
        for r in range(size)
    ]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    errors = [e.read_text() for e in sorted(out.glob("rank-*.error"))]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * size
    ranks = []
    for r in range(size):
        record = json.loads((out / f"rank-{r}.json").read_text())
        record["weights"] = load_file(out / f"rank-{r}.safetensors")
        ranks.append(record)
    return ranks


def dp_config(folder: Path) -> AdaptConfig:
    """2 steps of 4 images; the second step has 2 images, so with 3 processes one process
    has nothing to sample or train (it must still take part in every collective)."""
    cfg = small_config(folder, rounds=1, images_per_step=4)
    cfg.rollout.n_rollouts, cfg.rollout.n_train = 6, 4
    return cfg


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    diff = torch.cat([(got[k] - want[k]).abs().reshape(-1) for k in want])  # [n weights]
    worst, share = float(diff.max()), float((diff > 1e-6).float().mean())
    assert worst <= WEIGHT_ATOL, f"LoRA weights differ from one process's by {worst:.2e}"
    assert share <= WEIGHT_SHARE_ABOVE_1E6, f"{share:.2%} of LoRA weights differ by > 1e-6"


def steps_of(events: list) -> list[dict[str, Any]]:
    return [d for k, d in events if k == "step"]


def rollouts_of(events: list) -> list[tuple[str, int, str, float, bool]]:
    return [
        (r["image_id"], r["index"], r["response"], round(r["advantage"], 6), r["trained"])
        for k, d in events
        if k == "rollouts"
        for r in d["rollouts"]
    ]


# -- pure parts ------------------------------------------------------------------------------


def test_shards_cover_the_step_in_order():
    """Gathering the shards in rank order must give back the step's images in order."""
    for n in range(0, 8):
        for size in (1, 2, 3, 5):
            parts = [list(shard_range(n, size, r)) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_keyed_noise_samples_the_softmax():
    """Gumbel-max over the hashed noise must draw tokens with softmax probabilities (a
    biased hash would skew answers), and independently at the next position."""
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    keys = torch.cat([row_keys("7:3", f"img{i}", range(1000)) for i in range(20)])  # [20000, 2]
    vocab = hashed_vocab(5, torch.device("cpu"))
    first = (logits + gumbel_noise(keys, 0, vocab)).argmax(-1)
    second = (logits + gumbel_noise(keys, 1, vocab)).argmax(-1)
    for draws in (first, second):
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        assert torch.allclose(freq, logits.exp(), atol=0.012), freq
    same = float((first == second).float().mean())
    assert same == pytest.approx(float((logits.exp() ** 2).sum()), abs=0.012)  # independent


def test_keyed_sampler_keeps_suppressed_tokens_out_and_applies_top_p():
    """-inf logits (suppressed tokens) are never drawn; top-p drops the tail."""
    scores = torch.tensor([[0.0, float("-inf"), -0.1, -9.0]]).repeat(2000, 1)
    keys = row_keys("s", "x", range(2000))
    ids = torch.zeros(2000, 5, dtype=torch.long)
    drawn = KeyedSampler(keys, 1.0, 1.0)(ids, scores).argmax(-1)
    assert 1 not in drawn.tolist() and {0, 2} <= set(drawn.tolist())
    nucleus = KeyedSampler(keys, 1.0, 0.6)(ids, scores).argmax(-1)
    assert set(nucleus.tolist()) <= {0, 2} and 3 not in nucleus.tolist()


def test_rollouts_do_not_depend_on_which_images_share_the_call(tiny_model_dir):
    """Guards process-count invariance at its root: an image's rollouts are the same when
    it is sampled alone as when sampled in one generate call with other images."""
    from ttrv.adapt import make_policy
    from ttrv.rollout import rollout_groups

    folder = tiny_model_dir("llava")
    cfg = dp_config(folder)
    policy = make_policy(loaded_model(folder, cfg))
    items = make_items(3)
    together = rollout_groups(policy, items, cfg.task, cfg.rollout, [[None]] * 3, stream="0:1")
    alone = rollout_groups(policy, items[2:], cfg.task, cfg.rollout, [[None]], stream="0:1")
    assert together[2].responses == alone[0].responses
    assert len(set(together[2].responses + together[0].responses)) > 1  # really sampled
    other = rollout_groups(policy, items[2:], cfg.task, cfg.rollout, [[None]], stream="0:2")
    assert [c.tolist() for c in other[0].completions] != [c.tolist() for c in alone[0].completions]


# -- process groups --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """The reference: the same run in this (one) process."""
    folder = tiny_model_dir("llava")
    cfg = dp_config(folder)
    loaded = loaded_model(folder, cfg)
    events: list = []
    out = tmp_path_factory.mktemp("one")
    result = adapt(loaded, make_items(6), cfg, lambda k, d: events.append((k, d)),
                   output_dir=out, dist=Single())  # fmt: skip
    return {"weights": lora_weights(loaded.model), "events": events, "result": result, "out": out}


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 3])
def test_process_groups_adapt_as_one_process(tiny_model_dir, tmp_path, one_process, size):
    """2 and 3 gloo processes: same LoRA weights after 2 steps (WEIGHT_ATOL), the same
    rollouts, rewards and step records, and every event written once, by rank 0."""
    folder = tiny_model_dir("llava")
    ranks = run_group(size, folder, dp_config(folder), make_items(6), tmp_path)
    want = one_process["weights"]
    moved = max(float(w.abs().max()) for k, w in want.items() if "lora_B" in k)
    assert moved > 0.01  # the steps did update the weights
    for r in ranks:
        assert r["status"] == "done" and r["steps"] == 2
        assert_same_weights(r["weights"], want)
    main, others = ranks[0]["events"], [r["events"] for r in ranks[1:]]
    assert all(ev == [] for ev in others), "only the main process may emit events"
    ref = one_process["events"]
    assert [k for k, _ in main] == [k for k, _ in ref]
    assert rollouts_of(main) == rollouts_of(ref)
    for got, exp in zip(steps_of(main), steps_of(ref), strict=True):
        assert (
            got["tokens"] == exp["tokens"] and got["groups"] == exp["groups"] == [4, 2][got["step"]]
        )
        assert got["loss"] == pytest.approx(exp["loss"], abs=1e-6)
        assert got["grad_norm"] == pytest.approx(exp["grad_norm"], rel=1e-5)
        assert got["reward_mean"] == pytest.approx(exp["reward_mean"], abs=1e-12)
    start = dict(main)["run_start"]
    assert start["processes"] == size and dict(ref)["run_start"]["processes"] == 1
    assert dict(main)["answers"] == dict(ref)["answers"]  # the answers before
    # one writer: the checkpoint of this run is the main process's, complete
    assert (tmp_path / "checkpoints" / "round-1" / "state.json").is_file()


@pytest.mark.slow
def test_stop_reaches_every_process_and_resumes_with_another_count(
    tiny_model_dir, tmp_path, one_process
):
    """Rank 0 asks to stop after 1 step (the others never do): every process stops before
    step 2; the checkpoint written with 3 processes resumes with 2 and ends on the
    uninterrupted one-process weights."""
    folder = tiny_model_dir("llava")
    cfg, items = dp_config(folder), make_items(6)
    first = run_group(3, folder, cfg, items, tmp_path / "part", stop_after=1)
    assert [(r["status"], r["steps"]) for r in first] == [("stopped", 1)] * 3
    checkpoint = Path(first[0]["checkpoint"])
    assert (checkpoint / "state.json").is_file()
    second = run_group(2, folder, cfg, items, tmp_path / "part", resume=checkpoint)
    assert [(r["status"], r["steps"]) for r in second] == [("done", 2)] * 2
    assert [d["step"] for d in steps_of(second[0]["events"])] == [1]  # only the missing step
    for r in second:
        assert_same_weights(r["weights"], one_process["weights"])


@pytest.mark.slow
def test_accelerate_launch_runs_the_cli_data_parallel(tiny_model_dir, tmp_path):
    """The documented command: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
    --num_processes 2 -m ttrv adapt ...` gives one process's adapter, one events file
    written once, and a summary that records 2 processes."""
    folder = tiny_model_dir("llava")
    cfg = dp_config(folder)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    images = tmp_path / "images"
    images.mkdir()
    for it in make_items(6):
        it.image.save(images / f"{it.name}.png")
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate is a dependency: its launcher must be installed"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}  # fmt: skip
    done = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         env["MASTER_PORT"], "-m", "ttrv", "adapt", str(images), "--config", str(config),
         "--out", str(tmp_path / "dp")],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    lines = (tmp_path / "dp" / "events.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds.count("run_start") == 1 and kinds.count("step") == 2
    assert json.loads(lines[0])["processes"] == 2
    adapter = load_file(tmp_path / "dp" / "adapter" / ADAPTER_FILE)
    # One process on the same files (image ids hash the files, so load them as the CLI does).
    loaded = loaded_model(folder, cfg)
    adapt(loaded, load_items([str(images)])[0], cfg, dist=Single())
    reference = {k.replace(".default", ""): v for k, v in lora_weights(loaded.model).items()}
    assert_same_weights(adapter, reference)
    assert done.stdout.count("events, answers and adapter in") == 1  # printed once
