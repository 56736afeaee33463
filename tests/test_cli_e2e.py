"""The CLI end to end on a tiny model: adapt writes events, answers, adapter; answer reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ttrv", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    return folder


@pytest.mark.slow
def test_adapt_then_answer(tiny_model_dir, images, tmp_path):
    model = str(tiny_model_dir("llava"))
    out = tmp_path / "run"
    proc = run(
        "adapt", str(images), "--model", model, "--out", str(out), "--kind", "multiple_choice",
        "--options", "cat,dog,bird", "--n-rollouts", "4", "--n-train", "2",
        "--max-new-tokens", "3", "--images-per-step", "2", "--rounds", "1", "--reward", "random",
        "--store", "--data-dir", str(tmp_path / "data"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr  # the corrupt file was skipped with a warning
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("step") == 2 and kinds.count("answers") >= 2
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers["before"]) == len(answers["after"]) == 3
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "greedy answers changed" in proc.stdout

    from sessions import Store

    sessions = Store(tmp_path / "data").list_sessions()
    assert len(sessions) == 1 and sessions[0]["status"] == "done"

    proc = run("answer", str(images), "--model", model, "--adapter", str(out / "adapter"),
               "--kind", "multiple_choice", "--options", "cat,dog,bird", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 3 and all("answer" in x for x in lines)


def test_missing_model_is_a_clear_error(images, tmp_path):
    proc = run("adapt", str(images), "--model", "no-such-org/no-such-model", "--out",
               str(tmp_path / "x"))  # fmt: skip
    assert proc.returncode == 1
    assert "no-such-org/no-such-model" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_image_set_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("adapt", str(empty), "--out", str(tmp_path / "x"))
    assert proc.returncode == 1
    assert "no usable images" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_cli_warns_when_the_digits_model_is_asked_other_wording(tmp_path, capsys):
    """The app's note on other wording is printed by the CLI too (before any model loads:
    here the only image is missing, so the command stops right after)."""
    from ttrv.cli import main

    missing = str(tmp_path / "none.png")
    assert main(["answer", missing, "--question", "What number is this?"]) == 1
    err = capsys.readouterr().err
    assert "warning: The digits model was trained on the question" in err
    assert main(["answer", missing]) == 1  # the trained wording: no warning
    assert "warning: The digits model" not in capsys.readouterr().err


@pytest.mark.slow
def test_resume_continues_the_run_with_its_own_settings(tiny_model_dir, images, tmp_path, capsys):
    """`adapt IMAGES --resume CKPT` alone continues the run it belongs to: its model, task
    and settings from the run's config.json (not the defaults: the bundled model would not
    even take this adapter), in its own folder; a flag given now overrides one setting
    and is said."""
    from ttrv.cli import main

    out = tmp_path / "run"
    assert main(["adapt", str(images), "--model", str(tiny_model_dir("llava")), "--out", str(out),
                 "--kind", "multiple_choice", "--options", "cat,dog,bird", "--n-rollouts", "4",
                 "--n-train", "2", "--max-new-tokens", "3", "--images-per-step", "2",
                 "--rounds", "1", "--reward", "random"]) == 0  # fmt: skip
    capsys.readouterr()
    # as a run killed after its checkpoint leaves it: a step logged past that point
    with (out / "events.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "step", "step": 2, "killed": True}) + "\n")
    assert main(["adapt", str(images), "--resume", str(out / "checkpoints" / "round-1"),
                 "--rounds", "2"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: resuming with optim.rounds = 2 (the run had 1)" in err
    assert err.count("warning: resuming") == 1  # nothing else differs
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["rounds"] == 2 and config["task"]["options"] == "cat,dog,bird"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "step"] == [0, 1, 2, 3]  # once each
    assert not any(e.get("killed") for e in events)
    warnings = [e["message"] for e in events if e["kind"] == "warning"]
    assert "resuming with optim.rounds = 2 (the run had 1)" in warnings


def test_run_summary_says_in_words_how_it_ended_and_what_was_kept(tmp_path):
    from ttrv.cli import _summary_text

    base = {"steps": 6, "changed": 0, "images": 24, "accuracy_before": None, "review": None,
            "rolled_back_to": None}  # fmt: skip
    done = _summary_text({**base, "status": "done", "reason": "all rounds finished"}, tmp_path)
    assert done.startswith("finished after 6 steps: all rounds finished") and "kept:" not in done
    assert "planned steps" not in done
    early = _summary_text({**base, "status": "done", "reason": "all rounds finished",
                           "planned_steps": 12}, tmp_path)  # fmt: skip
    assert "(6 of the 12 planned steps were not needed" in early
    reason = "invalid answers rose from 12% to 36%. Rolled back to the unadapted model."
    tripped = {**base, "status": "guard_stopped", "reason": reason, "rolled_back_to": 0}
    text = _summary_text(tripped, tmp_path)
    assert text.startswith(f"rolled back by the guard after 6 steps: {reason}")
    assert "kept: nothing - the saved adapter answers as the unadapted model" in text
    partial = _summary_text({**tripped, "rolled_back_to": 4}, tmp_path)
    assert "kept: the weights after step 4" in partial
    # a review after the guard restored the unadapted model has nothing to keep
    reviewed = {**tripped, "review": {"verdict": {"message": "0 flips"}, "applied": "keep"}}
    text = _summary_text(reviewed, tmp_path)
    assert "review applied: keep the adapter" not in text
    assert "nothing to keep or revert (the guard already restored" in text


def test_a_new_run_never_overwrites_an_earlier_run_folder(tmp_path, capsys):
    """`--out` naming a folder that already holds a run is refused before anything is
    read or written (it replaced that run's adapter and mixed the two runs' logs)."""
    from ttrv.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "events.jsonl").write_text('{"kind": "run_start"}\n')
    assert main(["adapt", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "events.jsonl").read_text() == '{"kind": "run_start"}\n'


def test_review_with_labels_that_name_no_image_says_so(images, tmp_path, capsys):
    from ttrv.cli import main

    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nother.png,3\n")
    assert main(["adapt", str(images), "--labels", str(labels), "--review", "5", "--out",
                 str(tmp_path / "r")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no row of" in err and "names one of these images" in err


def test_cli_warns_as_the_app_does_about_images_unlike_the_digits(tmp_path, capsys):
    from ttrv.cli import _warn_images
    from ttrv.config import AdaptConfig
    from ttrv.images import load_items

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "noise.png"
    )
    Image.new("RGB", (8, 8), "white").save(tmp_path / "plain.png")
    items, _ = load_items([str(tmp_path)])
    _warn_images(items, AdaptConfig())  # the bundled digits model
    err = capsys.readouterr().err
    assert "1 of 2 images do not look like" in err and "noise.png (in colour" in err
    other = AdaptConfig.from_dict({"model": {"model": str(tmp_path)}})
    _warn_images(items, other)  # another model: the digits check does not apply
    assert capsys.readouterr().err == ""
