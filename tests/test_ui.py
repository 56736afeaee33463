"""The workbench through its HTTP API (gradio_client), with the real worker in-process.

One app per module on a free port with a temporary data directory. The model is the
bundled demo model when it has been built, else a tiny LLaVA built here; the demo images
are the bundled ones when present, else eight drawn digits.
"""

from __future__ import annotations

import csv
import html
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

from ttrv.config import BUNDLED_MODEL

# Small and quick: N=4 rollouts, 2 images per step, guard off (a random tiny model would
# trip it), no skipping of converged images (so long runs stay long).
FAST = {
    "rollout__n_rollouts": 4,
    "rollout__n_train": 4,
    "rollout__max_new_tokens": 4,
    "optim__images_per_step": 2,
    "optim__rounds": 1,
    "optim__skip_converged": False,
    "guard__guard": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_demo_dir(folder: Path, n: int = 8) -> Path:
    """`n` drawn digits plus labels.csv, laid out like demo/digits."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(image).text((22, 16), str(i % 10), fill=255, font_size=30)
        image.save(folder / f"digit_{i}.png")
        rows.append([f"digit_{i}.png", str(i % 10)])
    with (folder / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["file", "label"], *rows])
    return folder


def demo_and_model(tmp: Path, tiny_model_dir) -> tuple[Path, str]:
    from ui.workbench import DEMO_DIR

    demo = DEMO_DIR if (DEMO_DIR / "labels.csv").is_file() else make_demo_dir(tmp / "demo")
    built = (Path(BUNDLED_MODEL) / "config.json").is_file()
    return demo, BUNDLED_MODEL if built else str(tiny_model_dir("llava"))


# -- pure helpers: forms, charts, draft ---------------------------------------------------------


def test_forms_are_derived_from_every_config_field():
    """A config field added to a dataclass appears in the UI with a fitting component,
    its help text as info; no field is copied by hand."""
    import dataclasses

    import gradio as gr

    from ttrv.config import SECTIONS, field_choices, field_type
    from ui import forms

    with gr.Blocks():
        built = {s: forms.build_section(s) for s in SECTIONS}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            comp = built[section][forms.key(section, f.name)]
            assert f.metadata["help"] in comp.info
            typ = field_type(cls, f.name)
            if field_choices(cls, f.name):
                assert isinstance(comp, gr.Radio | gr.Dropdown)
            elif typ is bool:
                assert isinstance(comp, gr.Checkbox)
            elif typ in (int, float):
                assert isinstance(comp, gr.Number | gr.Slider), f.name
            else:
                assert isinstance(comp, gr.Textbox)


def test_form_values_are_validated_with_fix_it_messages():
    from ttrv.config import ConfigError
    from ui.forms import config_from_values

    cfg = config_from_values(
        {"rollout__n_rollouts": 8.0, "rollout__n_train": 8, "optim__rounds": "3"}
    )
    assert cfg.rollout.n_rollouts == 8 and cfg.optim.rounds == 3 and cfg.lora.rank == 8
    for values, message in (
        ({"rollout__n_rollouts": 2.5}, "whole number"),
        ({"rollout__max_new_tokens": 5000}, "must be <= 4096"),
        ({"optim__rounds": None}, "is empty"),
        ({"rollout__n_rollouts": 4, "rollout__n_train": 8}, "must be between 1 and N"),
        ({"nope__x": 1}, "Unknown setting"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_values(values)


def test_progress_counts_steps_and_estimates_the_rest():
    from ui import charts

    assert charts.total_steps(24, rounds=2, images_per_step=5) == 10
    steps = [{"step": i, "round": 0, "seconds": 2.0} for i in range(4)]
    config = {"optim": {"rounds": 2, "images_per_step": 5}}
    p = charts.progress(steps, config, n_images=24, status="running")
    assert (p.done, p.total, p.round, p.eta_s) == (4, 10, 1, 12.0)
    assert charts.progress(steps, config, 24, "stopped").eta_s is None
    done = charts.progress(steps, config, 24, "done")  # converged images were skipped
    assert (done.done, done.total, done.fraction) == (4, 4, 1.0)
    html_text = charts.progress_html(p, "adapting", elapsed_s=75)
    assert "Step 4 / 10" in html_text and "ETA 0:12" in html_text and "elapsed 1:15" in html_text


def test_progress_total_shrinks_as_images_converge_and_says_why():
    """With converged images skipped, the expected total follows what will run (12 planned,
    8 expected once half the images converged in round 1) instead of jumping to the done
    count at the end; the note names the plan and the schedule that did not finish."""
    from ui import charts

    config = {"optim": {"rounds": 3, "images_per_step": 2, "skip_converged": True,
                        "schedule": "cosine"}}  # fmt: skip
    round1 = [{"step": i, "round": 0, "seconds": 1.0} for i in range(4)]
    converged = {"a": 0, "b": 1, "c": 2, "d": 3}  # 4 of 8 images, all in round 1
    p = charts.progress(round1, config, 8, "running", converged)
    assert (p.done, p.total, p.planned, p.converged) == (4, 8, 12, 4)
    round2 = [*round1, {"step": 4, "round": 1, "seconds": 1.0}]
    p = charts.progress(round2, config, 8, "running", {**converged, "e": 4})
    assert p.total == 8  # round 2 keeps its 2 steps; round 3 covers the 3 left: 2 steps
    assert charts.progress(round2, config, 8, "running", {}).total == 12  # nothing skipped
    note = charts.plan_note(p, config)
    assert "12 steps were planned; 5 image(s) converged" in note
    assert "cosine learning-rate schedule" in note and "stops at step 8" in note
    assert charts.plan_note(charts.progress(round2, config, 8, "running", {}), config) == ""
    assert "12 steps were planned" in charts.progress_html(p, "adapting", note=note)


def test_elapsed_adds_up_over_resumed_jobs():
    """Elapsed counts every adapt job of the session, so a resumed run does not restart at
    0:01."""
    from ui.adapt_tab import run_seconds

    jobs = [
        {"started": "2026-01-01T10:00:00+00:00", "finished": "2026-01-01T10:01:00+00:00"},
        {"started": "2026-01-01T11:00:00+00:00", "finished": "2026-01-01T11:00:30+00:00"},
        {"started": None, "finished": None},  # queued, never started
    ]
    assert run_seconds(jobs) == 90
    assert run_seconds([]) is None


def test_reward_components_sign_note_and_a_one_value_histogram():
    """The rollout table splits each reward into frequency and entropy term; the sign note
    explains batch-scope advantages; when every rollout scored the same the histogram bar
    is narrow and centred, not a block from x-0.5 to x+0.5."""
    from ui import charts

    rollouts = [
        {"answer": "7", "reward": 0.9375 - 0.1, "advantage": -1.15, "trained": True,
         "components": {"frequency": 0.9375, "neg_entropy": -0.133, "valid": 1.0}}
        for _ in range(15)
    ] + [{"answer": "1", "reward": 0.0625 - 0.1, "advantage": -3.0, "trained": True,
          "components": {"frequency": 0.0625, "neg_entropy": -0.133, "valid": 1.0}}]  # fmt: skip
    top = charts.rollout_groups(rollouts)[0]
    assert top["frequency"] == pytest.approx(0.9375)
    assert top["entropy_term"] == pytest.approx(-0.1)
    assert charts.entropy_term({"reward": -0.5, "components": {"neg_entropy": -0.5}}) == -0.5
    assert charts.entropy_term({"reward": 1.0, "components": {"majority": 1.0}}) is None
    batch = charts.sign_note({"reward": {"reward": "ttrv", "advantage_scope": "auto"}})
    assert "batch scope" in batch and "not pushed away" in batch
    assert "group scope" in charts.sign_note({"reward": {"reward": "majority"}})

    same = [{"answer": "7", "reward": 1.0} for _ in range(16)]
    fig = charts.reward_figure(same)
    assert fig.data[0].xbins.size <= 0.05 and fig.layout.xaxis.range == (0.5, 1.5)
    assert "all 16 rollouts scored 1" in fig.layout.title.text
    spread = charts.reward_figure(rollouts)
    assert spread.data[0].xbins.size == spread.data[1].xbins.size  # bins shared by answers


def test_run_log_lists_jobs_and_events_in_time_order():
    """The run log interleaves the session's jobs and its logged events by time, with job
    errors and guard decisions spelled out."""
    from ui.charts import run_log

    jobs = [{"id": 3, "kind": "adapt", "status": "failed", "error": "Out of memory.",
             "request": {"resume": True}, "created": "2026-01-01T10:00:00",
             "started": "2026-01-01T10:00:01", "finished": "2026-01-01T10:00:09"}]  # fmt: skip
    events = [
        {"kind": "run_start", "created": "2026-01-01T10:00:02", "data": {"images": [1, 2]}},
        {"kind": "guard", "created": "2026-01-01T10:00:05",
         "data": {"action": "rollback", "step": 4, "reason": "answers collapsed"}},
    ]  # fmt: skip
    lines = run_log(events, jobs).splitlines()
    assert lines == [
        "- `10:00:00` adapt job 3 (resume) queued",
        "- `10:00:01` adapt job 3 (resume) started",
        "- `10:00:02` run started on 2 images",
        "- `10:00:05` guard **rollback** at step 4: answers collapsed",
        "- `10:00:09` adapt job 3 (resume) failed: Out of memory.",
    ]
    assert run_log([], []) == "Nothing logged yet."


def test_cli_command_reproduces_the_forms_settings(tmp_path):
    """The command line shown for the current settings parses back, through the CLI's own
    parser, into the same config; only settings that differ from the defaults appear."""
    import shlex

    from ttrv.cli import build_parser, config_from_args
    from ui.exports import cli_command, image_args
    from ui.forms import config_from_values
    from ui.workbench import DEMO_DIR

    cfg = config_from_values({
        "rollout__n_rollouts": 8, "rollout__n_train": 4, "optim__skip_converged": False,
        "task__kind": "multiple_choice", "task__question": "Which digit is shown?",
        "lora__alpha": 32, "model__model": str(tmp_path / "my model"),
    })  # fmt: skip
    images, labels = image_args([{"path": str(p)} for p in sorted(DEMO_DIR.glob("*.png"))],
                                DEMO_DIR)  # fmt: skip
    assert images == [str(DEMO_DIR.resolve())] and labels.endswith("labels.csv")
    command = cli_command(cfg, images, labels)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:4] == ["python", "-m", "ttrv", "adapt"]
    args = build_parser().parse_args(argv[3:])
    assert config_from_args(args) == cfg and args.images == images
    assert "--n-rollouts 8" in command and "--no-skip-converged" in command
    assert "--lora-alpha 32" in command and "--learning-rate" not in command
    upload = tmp_path / "x.png"
    assert image_args([{"path": str(upload)}], DEMO_DIR)[0] == ["IMAGES/"]  # a temp copy


def test_unique_import_names():
    from ui.sessions_tab import unique_name

    assert unique_name("run", ["other"]) == "run"
    assert unique_name("run", ["run", "run (2)"]) == "run (3)"


def test_rollouts_grouped_by_answer_and_filters():
    from ui import charts

    rollouts = [
        {"answer": "7", "reward": 0.5, "advantage": 1.0, "trained": True, "response": "7"},
        {"answer": "7", "reward": 0.5, "advantage": 1.0, "trained": True, "response": "seven"},
        {"answer": "1", "reward": 0.2, "advantage": -1.0, "trained": False, "response": "1"},
        {"answer": "<invalid>", "reward": 0.0, "advantage": -1.0, "trained": True,
         "response": ""},
    ]  # fmt: skip
    groups = charts.rollout_groups(rollouts)
    assert [(g["answer"], g["count"], g["trained"]) for g in groups] == [
        ("7", 2, 2), ("1", 1, 0), ("<invalid>", 1, 1)
    ]  # fmt: skip
    stats = charts.image_stats(rollouts)
    assert stats == {"consensus": 0.5, "invalid": 0.25, "n": 4}
    row = {"flipped": True, "before": "1", "after": "7", "correct_after": False}
    assert charts.matches_filter(row, stats, "changed")
    assert charts.matches_filter(row, stats, "wrong")
    assert not charts.matches_filter(row, stats, "uncertain")  # 0.5 is not below 0.5
    assert not charts.matches_filter(row, stats, "invalid")
    assert len(charts.reward_figure(rollouts).data) == 3
    assert len(charts.curves_figure({"a": [{"step": 0, "reward_mean": 1.0}]}).data) == 9


def test_collapse_warning_fires_only_when_answers_pile_up():
    from ui.charts import collapse_warning

    def rows(before, after):
        return [{"before": b, "after": a} for b, a in zip(before, after, strict=True)]

    assert collapse_warning(rows("0123", "0123")) is None
    warning = collapse_warning(rows("012345", "333335"))
    assert "Collapse risk" in warning and "5 of 6" in warning
    assert "leans to one answer" in collapse_warning(rows("333301", "333301"))
    assert collapse_warning(rows("01", "33")) is None  # too few images to tell


def test_draft_from_a_zip_with_class_folders_and_bad_members(tmp_path):
    """Class sub-folders in an archive become labels; a member that would leave the
    folder, a non-image and a duplicate are reported; thumbnails are written."""
    import zipfile

    from ui import draft

    png = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "blue").save(png)
    other = tmp_path / "b.png"
    Image.new("RGB", (40, 30), "green").save(other)
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(png, "set/cat/a.png")
        zf.write(other, "set/dog/b.png")
        zf.write(png, "set/dog/copy.png")
        zf.writestr("set/dog/readme.png", "text")
        zf.writestr("../evil.png", "x")
    new, messages = draft.add_files([], [str(archive)])
    assert sorted((d["name"], d["label"]) for d in new) == [("a.png", "cat"), ("b.png", "dog")]
    text = "\n".join(messages)
    assert "copy.png" in text and "readme.png" in text and "evil" not in text
    assert all(Path(d["thumb"]).is_file() for d in new)
    again, messages = draft.add_files(new, [str(png)])
    assert len(again) == 2 and "already added" in messages[-1]
    assert draft.remove(again, 0) == again[1:]


def photo(path: Path, size=(640, 480)) -> Path:
    """A colourful photo-like image: nothing like an 8x8 grey digit."""
    image = Image.new("RGB", size, (250, 200, 120))
    draw = ImageDraw.Draw(image)
    for i in range(0, size[0], 40):
        draw.rectangle([i, 0, i + 20, size[1]], fill=(30 + i % 200, 140, 60))
    image.save(path)
    return path


def test_digits_domain_check_tells_photos_from_digits(tmp_path):
    """The bundled model's training digits (and the demo images) pass; a colour photo, a
    wide image and light-on-dark digits are each named for what differs."""
    from ttrv.digits import digit_image, unlike_training_digits
    from ui.workbench import DEMO_DIR

    pixels = [[0] * 8 for _ in range(8)]
    for r in range(1, 7):
        pixels[r][4] = 16  # a "1"
    digit = digit_image(pixels, 128)
    assert unlike_training_digits(digit) == []
    for png in sorted(DEMO_DIR.glob("*.png"))[:6]:
        assert unlike_training_digits(Image.open(png)) == [], png
    shot = Image.open(photo(tmp_path / "cheetah.jpg"))
    reasons = unlike_training_digits(shot.resize((128, 96)), shot.size)
    assert "large (640x480)" in reasons and "in colour" in reasons
    assert "not square (200x40)" in unlike_training_digits(Image.new("RGB", (200, 40), "white"))
    inverted = Image.eval(digit, lambda v: 255 - v)
    assert unlike_training_digits(inverted) == ["dark background"]


def test_model_card_summary_and_domain_warning(tmp_path):
    """The bundled model's card is summarised (what it knows, its accuracy); the domain
    warning names the photos for the digits model only."""
    from ui import draft, model_card

    card = model_card.card_markdown(BUNDLED_MODEL)
    assert "only knows scikit-learn's 8x8 handwritten digits" in card
    assert "Open question, greedy accuracy **92.6%**" in card
    assert "No model card found" in model_card.card_markdown(str(tmp_path / "nothing"))
    hub = model_card.summarize_card(
        "---\nlicense: mit\n---\n# Tiny\n\nA model.\n\n"
        "## Limitations\n- no cats\n| Accuracy (val) | 0.9 |\n"
    )
    assert hub == {"title": "Tiny", "intro": "A model.", "knows": ["no cats"],
                   "numbers": [("Accuracy (val)", "0.9")]}  # fmt: skip

    from ui.workbench import DEMO_DIR

    digits, _ = draft.add_files([], sorted(DEMO_DIR.glob("*.png"))[:3])
    photos, _ = draft.add_files(digits, [photo(tmp_path / "tower.jpg")])
    assert model_card.domain_warning(BUNDLED_MODEL, digits) == ""
    warning = model_card.domain_warning(BUNDLED_MODEL, photos)
    assert "1 of 4 images do not look like" in warning and "tower.jpg (large (640x480)" in warning
    assert model_card.domain_warning("Qwen/Qwen2.5-VL-3B-Instruct", photos) == ""


def test_model_check_says_what_is_wrong(tmp_path, tiny_model_dir):
    """Start's model check: a missing folder, a malformed or uncached hub id (offline), a
    folder without config.json and a text-only model are refused with a reason; a real
    folder passes. The digits model warns about prompts it was not trained on."""
    import json

    from ttrv.config import ModelConfig, TaskConfig
    from ui.checks import check_model, task_notes

    def refused(model: str) -> str:
        with pytest.raises(ValueError) as exc:
            check_model(ModelConfig(model=model))
        return str(exc.value)

    assert "does not exist" in refused(str(tmp_path / "missing"))
    assert "neither an existing folder nor a Hugging Face hub id" in refused("not a repo id")
    assert "not in the local Hugging Face cache" in refused("someone/uncached-vlm")
    assert "no config.json" in refused(str(tmp_path))
    text_only = tmp_path / "gpt"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "does not take images" in refused(str(text_only))
    assert check_model(ModelConfig(model=str(tiny_model_dir("llava")))) == "model folder llava"
    assert task_notes(BUNDLED_MODEL, TaskConfig()) == []
    assert "trained on the question" in task_notes(BUNDLED_MODEL, TaskConfig(question="What?"))[0]
    assert "yes no task" in task_notes(BUNDLED_MODEL, TaskConfig(kind="yes_no"))[0]
    assert task_notes(str(tiny_model_dir("llava")), TaskConfig(question="What?")) == []


def test_run_headline_reads_accuracy_changes_and_guard():
    """The finished run's headline: accuracy before -> after, answers changed, and the
    guard's rollback (or that it was off); nothing while the run is active."""
    from ui.charts import run_headline

    session = {"status": "done", "config": {"guard": {"guard": True}},
               "headline": {"steps": 12, "accuracy_before": 0.5, "accuracy_after": 0.625,
                            "labelled": 8, "compared": 8, "flipped": 2}}  # fmt: skip
    text = run_headline(session, [])
    assert "**Run done** after 12 steps" in text and "50.0% → 62.5%" in text
    assert "**2 of 8** answers changed" in text and "guard: no rollback" in text
    rollback = {"kind": "guard", "data": {"action": "rollback", "step": 6, "reason": "collapse",
                                          "rolled_back_to": "the unadapted model"}}  # fmt: skip
    text = run_headline(session, [rollback])
    assert "rolled back to the unadapted model** at step 6 (collapse)" in text
    assert "Flip review" in text  # 2 answers changed: the way to settle it is named
    reviewed = {"kind": "review_applied", "data": {"decision": "revert"}}
    assert "flip review: **revert** applied" in run_headline(session, [rollback, reviewed])
    off = {**session, "config": {"guard": {"guard": False}}}
    assert "guard: off" in run_headline(off, [])
    assert run_headline({**session, "status": "running"}, []) == ""
    # before and during a run: the watch-pool note and the forecast
    plan = [
        {"kind": "run_start", "data": {"split": {"note": "Adapting on 80 of 100 images"}}},
        {"kind": "forecast", "data": {"message": "Little to gain: greedy already is the vote"}},
    ]
    live = run_headline({**session, "status": "running"}, plan)
    assert "Watch pool: Adapting on 80 of 100" in live and "Forecast: Little to gain" in live


def test_progress_counts_only_the_images_adapted_on():
    """A session of 100 images holds 20 out as the guard's watch pool: 80 are trained on."""
    from ui import charts

    config = {"optim": {"rounds": 1, "images_per_step": 4}}
    assert charts.adapted_images(100, config) == 80
    assert charts.progress([], config, 100, "running").total == 20
    off = {**config, "guard": {"guard": False}}
    assert charts.progress([], off, 100, "running").total == 25


# -- the app through its API --------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    import torch

    from sessions import jobs
    from sessions.store import Store
    from sessions.worker import Worker
    from ui.workbench import create_app, launch_options

    tmp = tmp_path_factory.mktemp("ui")
    demo_dir, model = demo_and_model(tmp, tiny_model_dir)
    store = Store(tmp / "data")
    worker = Worker(store, poll_s=0.1).start()
    demo = create_app(store, demo_dir=demo_dir)
    torch.set_num_threads(1)
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=free_port(),
                **launch_options(store, demo_dir))  # fmt: skip
    yield SimpleNamespace(url=demo.local_url, store=store, model=model, demo_dir=demo_dir)
    for session in store.list_sessions():  # a failed test may leave a run going
        if session["status"] in ("queued", "running"):
            jobs.request_stop(store, session["id"])
    worker.shutdown(timeout=30)
    demo.close()
    store.close()


def handle_file(path):
    from gradio_client import handle_file

    return handle_file(path)


def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False, download_files=False)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start(c, app, **overrides):
    status, *rest = c.predict(session_name="", **{"model__model": app.model, **FAST, **overrides},
                              api_name="/start")  # fmt: skip
    return html.unescape(status), *rest


@pytest.mark.slow
def test_load_demo_images(app):
    """One click loads the demo images with their labels; a second click adds nothing."""
    c = client(app)
    gallery, summary, table, status = c.predict(api_name="/load_demo")
    n = len(list(app.demo_dir.glob("*.png")))
    assert f"Added {n} image(s)" in status
    assert f"**{n} images** ready" in summary and f"{n} labelled" in summary
    assert len(gallery) == n
    assert all(row[1] != "" for row in table["data"])  # every image got its label
    *_, summary, _, status = c.predict(api_name="/load_demo")
    assert "already added" in status and f"**{n} images**" in summary


@pytest.mark.slow
def test_bad_uploads_are_reported_and_the_rest_kept(app, tmp_path):
    """A text file, a truncated PNG and an empty file are named in the message; the good
    image is added."""
    from gradio_client import handle_file

    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "empty.jpg").write_bytes(b"")
    files = [handle_file(str(tmp_path / n)) for n in ("good.png", "notes.png", "broken.png",
                                                       "empty.jpg")]  # fmt: skip
    c = client(app)
    gallery, summary, _, status, box = c.predict(files, None, api_name="/add_files")
    assert "Added 1 image(s)" in status
    for name in ("notes.png", "broken.png", "empty.jpg"):
        assert name in status
    assert "/tmp/" not in status.split("Skipped")[1]  # names the user knows, not temp paths
    assert len(gallery) == 1 and "**1 image**" in summary
    assert box is None  # the upload box is emptied, so the next drop holds only new files
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "next.png")
    gallery, _, _, status, _ = c.predict([handle_file(str(tmp_path / "next.png"))], None,
                                         api_name="/add_files")  # fmt: skip
    assert "Added 1 image(s)" in status and "notes.png" not in status and len(gallery) == 2


@pytest.mark.slow
def test_invalid_hyperparameters_are_rejected_before_anything_starts(app):
    """ConfigError messages reach the status line and no session is created."""
    c = client(app)
    status, *_ = start(c, app)
    assert "No images to adapt on" in status
    c.predict(api_name="/load_demo")
    status, *_ = start(c, app, rollout__n_rollouts=4, rollout__n_train=10)
    assert "K (n_train=10) must be between 1 and N (n_rollouts=4)" in status
    status, *_ = start(c, app, optim__learning_rate=-1)
    assert re.search(r"learning.rate must be >=? 0", status), status
    status, *_ = start(c, app, rollout__n_rollouts=None)
    assert re.search(r"n.rollouts is empty", status), status
    status, *_ = start(c, app, task__kind="multiple_choice", task__options="")
    assert "without options" in status
    # The model is checked before anything is queued: no failed session is left behind.
    status, *_ = start(c, app, model__model="/nonexistent/model")
    assert "The model folder /nonexistent/model does not exist" in status
    status, *_ = start(c, app, model__model="someone/uncached-vlm")
    assert "not in the local Hugging Face cache" in status
    assert app.store.list_sessions() == []


@pytest.mark.slow
def test_first_screen_warns_about_photos_for_the_digits_model(app, tmp_path):
    """Images added on the first screen are checked against the digits model's training
    data before any run: a photo is named, the demo digits are not."""
    c = client(app)
    c.predict(api_name="/quick_demo")
    assert c.predict(BUNDLED_MODEL, api_name="/domain_check")[0] == ""
    status = c.predict([handle_file(str(photo(tmp_path / "cheetah.jpg")))],
                       api_name="/quick_upload")  # fmt: skip
    assert "Added 1 image(s)" in status
    warning, same = c.predict(BUNDLED_MODEL, api_name="/domain_check")
    assert "1 of 25 images do not look like" in warning and "cheetah.jpg" in warning
    assert warning == same  # the Images tab shows it too
    command, status = c.predict(model__model=BUNDLED_MODEL, rollout__n_rollouts=8,
                                rollout__n_train=4, api_name="/cli_command")  # fmt: skip
    command = command["value"] if isinstance(command, dict) else command  # a shown gr.Code
    assert status == "", status
    assert command.startswith("python -m ttrv adapt \\\n    IMAGES/")  # an upload: no folder
    assert "--n-rollouts 8" in command
    assert c.predict(app.model if app.model != BUNDLED_MODEL else "Qwen/Qwen2.5-VL-3B-Instruct",
                     api_name="/domain_check")[0] == ""  # fmt: skip


@pytest.mark.slow
def test_adapt_progress_stop_refusals_resume_delete(app, tmp_path):
    """Start -> steps reach the store and the progress view; a second tab's start and a
    delete while running are refused with a message; a reload re-attaches; stop ends the
    run; resume continues from its checkpoint."""
    tab1, tab2 = client(app), client(app)
    tab1.predict(api_name="/load_demo")
    status, *_ = start(tab1, app, optim__rounds=40)
    assert "Started session" in status, status
    sid = app.store.list_sessions()[0]["id"]
    wait_for(lambda: app.store.metrics(sid), 120, "the first step in the store")
    progress, *_ = tab1.predict(api_name="/progress")
    assert "Step " in progress and "data-status='running'" in progress

    status, *_ = start(tab2, app)  # no images in this tab: the active run is the news
    assert "one runs at a time" in status
    tab2.predict(api_name="/load_demo")
    status, *_ = start(tab2, app)
    assert "one runs at a time" in status
    assert len(app.store.list_sessions()) == 1
    header = tab2.predict(api_name="/attach")  # what a reload or a second tab shows
    assert sid in header and "running" in header

    status, *_ = tab1.predict(sid, api_name="/delete_session")
    assert "stop it before deleting" in status
    assert "Stopping after the current step" in tab1.predict(api_name="/stop")
    wait_for(lambda: app.store.get_session(sid)["status"] == "stopped", 60, "the stop")
    steps = len(app.store.metrics(sid))

    status = tab1.predict(api_name="/resume")
    assert "Resuming from step" in status, status
    wait_for(lambda: len(app.store.metrics(sid)) > steps, 60, "a step after resuming")
    tab1.predict(api_name="/stop")
    wait_for(lambda: app.store.get_session(sid)["status"] == "stopped", 60, "the second stop")

    summary, *_ = tab1.predict("all", None, api_name="/inspect_refresh")
    assert f"**{len(app.store.images(sid))} images**" in summary
    image_id = app.store.images(sid)[0]["image_id"]
    _, detail, groups, _, sign = tab1.predict(image_id, api_name="/inspect_image")
    assert "before adaptation" in detail and groups["data"]
    assert groups["headers"][3:5] == ["frequency", "entropy term"] and "batch scope" in sign

    # Ask: base and adapted model side by side, through an "ask" job.
    picture = handle_file(str(sorted(app.demo_dir.glob("*.png"))[0]))
    status, *_ = tab1.predict(picture, "Which digit is shown?", sid, 4, api_name="/ask")
    assert "Asking" in status
    status, base, adapted, *_ = wait_for(
        lambda: (out := tab1.predict(api_name="/ask_poll")) and "Asking" not in out[0] and out,
        60, "the ask job",
    )  # fmt: skip
    assert "Base model" in base and "Adapted model" in adapted and "**" in adapted, status

    # Export, import the archive as a second session, compare the two.
    status, archive = tab1.predict(sid, api_name="/export_session")
    assert "Exported" in status
    status, *_ = tab1.predict(handle_file(archive["value"]["path"]), api_name="/import_session")
    assert "Imported" in status
    copy = next(s["id"] for s in app.store.list_sessions() if s["id"] != sid)
    status, *_ = tab1.predict(handle_file(archive["value"]["path"]), api_name="/import_session")
    name = app.store.get_session(sid)["name"]
    assert f"already exists, so this one is '{name} (3)'" in status  # the copy was (2)
    assert sorted(s["name"] for s in app.store.list_sessions()) == [name, f"{name} (2)",
                                                                    f"{name} (3)"]  # fmt: skip
    third = next(s["id"] for s in app.store.list_sessions() if s["name"] == f"{name} (3)")
    app.store.delete_session(third)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    status, *_ = tab1.predict(handle_file(str(bad)), api_name="/import_session")
    assert "bad.zip" in status and "/tmp/" not in status and "/gradio/" not in status, status
    summary, _, side_by_side = tab1.predict(sid, copy, api_name="/compare")
    assert "| steps |" in summary and len(side_by_side["data"]) == len(app.store.images(sid))

    for session_id in (sid, copy):
        status, *_ = tab1.predict(session_id, api_name="/delete_session")
        assert "Deleted" in status
    assert app.store.list_sessions() == []


@pytest.mark.slow
def test_load_model_reports_size_and_device(app):
    """The Load button queues a load_model job; its result reads as numbers, and a model
    that does not exist fails with the loader's message."""
    from sessions import jobs
    from ui.model_tab import job_text

    c = client(app)
    assert "Queued" in c.predict(model__model=app.model, api_name="/load_model")[0]
    job = wait_for(lambda: (j := jobs.latest(app.store, "load_model")) and j["finished"] and j,
                   120, "the load_model job")  # fmt: skip
    text = job_text(job)
    assert "parameters" in text and "device **cpu**" in text, text
    info = job["result"]["info"]  # counted with the LoRA adapter a run will train
    assert 0 < info["trainable_params"] < info["total_params"] and "trainable (LoRA)" in text
    c.predict(model__model="/nonexistent/model", api_name="/load_model")
    job = wait_for(lambda: (j := jobs.latest(app.store, "load_model")) and j["finished"] and j,
                   60, "the failing load_model job")  # fmt: skip
    assert "failed" in job_text(job) and "not found" in job_text(job)


def rendered_preview(c, **kwargs):
    """(prompt, parse) of the Preview button, once its worker job has rendered it."""
    prompt, parsed, *_ = c.predict(image_id=None, api_name="/preview", **kwargs)
    deadline = time.monotonic() + 60
    while "Applying the model's chat template" in parsed:  # the job is pending: poll
        assert time.monotonic() < deadline, "the preview job did not finish"
        time.sleep(0.2)
        polled = c.predict(api_name="/preview_poll")
        if isinstance(polled[1], str):  # else skipped: still pending
            prompt, parsed = polled[:2]
    return prompt, parsed


@pytest.mark.slow
def test_prompt_preview_uses_the_models_chat_template(app):
    """The preview shows the exact text (chat template, image token, the session's template
    with its option format and separator) and the parse; a worker job renders it."""
    from sessions import jobs

    c = client(app)
    c.predict(api_name="/load_demo")
    before = jobs.latest(app.store, "preview")
    prompt, parsed = rendered_preview(c, sample="I think it is 7.", model__model=app.model)
    assert "Which digit is shown?" in prompt and "<image>" in prompt
    assert "**7**" in parsed and "unavailable" not in parsed
    job = jobs.latest(app.store, "preview")
    assert job["status"] == "done" and job["id"] != (before or {}).get("id")
    assert job["result"]["prompt"].strip() == prompt.strip()  # gr.Code strips the end
    prompt, parsed = rendered_preview(
        c, sample="B", model__model=app.model, task__kind="multiple_choice",
        task__options="3,7,1",
    )  # fmt: skip
    assert "A. 3 B. 7 C. 1" in prompt and "**7**" in parsed
    template = dict(
        task__template="Pick one. {options} Letter only.",
        task__option_format="({letter}) {option}",
        task__option_separator=" | ",
    )
    prompt, parsed = rendered_preview(
        c, sample="C", model__model=app.model, task__kind="multiple_choice",
        task__options="3,7,1", **template,
    )  # fmt: skip
    assert "Pick one. (A) 3 | (B) 7 | (C) 1 Letter only." in prompt and "<image>" in prompt
    assert "**1**" in parsed and "the task's template" in parsed
    n = jobs.latest(app.store, "preview")["id"]
    again, _ = rendered_preview(
        c, sample="C", model__model=app.model, task__kind="multiple_choice",
        task__options="3,7,1", **template,
    )  # fmt: skip
    assert again == prompt and jobs.latest(app.store, "preview")["id"] == n  # cached
    # A model without a chat template: the user text, and why.
    prompt, parsed = rendered_preview(c, sample="7", model__model="/nonexistent/model")
    assert prompt.startswith("Which digit is shown?") and "unavailable" in parsed


def test_the_ui_process_never_imports_transformers(tmp_path):
    """Issue 11: the UI must not load processors. Importing every ui module, building the
    app and clicking Preview (which only queues a job: no worker runs here) leaves
    transformers, torch and peft unimported."""
    import subprocess
    import sys

    script = f"""
import pkgutil, importlib, sys
import ui
for m in pkgutil.iter_modules(ui.__path__):
    importlib.import_module("ui." + m.name)
from sessions.store import Store
from ui.workbench import create_app, launch_options
from gradio_client import Client
store = Store({str(tmp_path / "data")!r})
demo = create_app(store)
demo.launch(prevent_thread_lock=True, quiet=True, server_port={free_port()},
            **launch_options(store))
prompt, parsed, *_ = Client(demo.local_url, verbose=False).predict(
    image_id=None, sample="7", api_name="/preview")
assert "Applying the model's chat template" in parsed, parsed
assert prompt.startswith("Which digit is shown?"), prompt
print("imported:", sorted(m for m in ("transformers", "torch", "peft") if m in sys.modules))
demo.close()
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported: []" in out.stdout.splitlines(), out.stdout


@pytest.mark.slow
def test_settings_presets_save_and_load(app):
    """Issue 12: the settings form saved under a (sanitised) name as JSON in the data
    directory and loaded back into every form field; a bad or hand-broken file, an empty
    name and settings the dataclasses refuse are each a clear message."""
    import json

    from ui import presets

    c = client(app)
    settings = {
        "model__model": app.model, "rollout__n_rollouts": 8, "rollout__n_train": 4,
        "task__kind": "multiple_choice", "task__options": "3,7,1",
        "task__template": "Pick one. {options}", "optim__learning_rate": 3e-4,
        "guard__guard": False,
    }  # fmt: skip
    status, pick = c.predict(name="  digits / mc: lr*3 ", **settings, api_name="/save_preset")
    name = presets.clean_name("  digits / mc: lr*3 ")
    assert name == "digits - mc- lr-3" and f"Saved preset {name!r}" in html.unescape(status)
    path = app.store.data_dir / "presets" / f"{name}.json"
    saved = json.loads(path.read_text())
    assert saved["rollout"]["n_rollouts"] == 8
    assert saved["task"]["template"] == "Pick one. {options}"
    assert pick["value"] == name and [name, name] in pick["choices"]
    status, _ = c.predict(name=name, **settings, api_name="/save_preset")
    assert "Replaced preset" in status

    api = c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    keys = [p["parameter_name"] for p in api["/save_preset"]["parameters"]][1:]
    status, *values = c.predict(name, api_name="/load_preset")
    assert f"Loaded preset {name!r}" in html.unescape(status) and len(values) == len(keys)
    loaded = dict(zip(keys, values, strict=True))
    for k, v in settings.items():
        assert loaded[k] == v, k
    assert loaded["lora__rank"] == 8  # the rest of the form too: the defaults saved with it

    status, *_ = c.predict(name="  /// ", **settings, api_name="/save_preset")
    assert "Give the preset a name" in status
    status, *_ = c.predict(name="x", **{**settings, "rollout__n_train": 9},
                           api_name="/save_preset")  # fmt: skip
    assert "must be between 1 and N" in status and not (path.parent / "x.json").exists()
    (path.parent / "broken.json").write_text("{not json")
    (path.parent / "wrong.json").write_text(json.dumps({"rollout": {"n_rollouts": 2,
                                                                    "n_train": 8}}))  # fmt: skip
    (path.parent / "odd.json").write_text(json.dumps({"rollouts": {"n_rollouts": 2}}))
    for bad, message in (("broken", "cannot be read as JSON"),
                         ("wrong", "holds settings this version refuses"),
                         ("odd", "unknown sections ['rollouts']"),
                         ("missing", "There is no preset 'missing'")):  # fmt: skip
        status, *values = c.predict(bad, api_name="/load_preset")
        assert message in html.unescape(status), status
        assert all(v is None or isinstance(v, dict) for v in values)  # forms untouched
    assert presets.names(app.store.data_dir) == ["broken", name, "odd", "wrong"]


@pytest.mark.slow
def test_finished_run_headline_and_why_it_ended_early(app):
    """A run whose images converge ends early: the Adapt tab says why, its step total is
    what ran (not the plan), and the headline gives accuracy before -> after, answers
    changed and the guard outcome."""
    c = client(app)
    c.predict(api_name="/quick_demo")
    status, *_ = start(c, app, optim__rounds=3, optim__skip_converged=True)
    assert "Started session" in status, status
    sid = app.store.list_sessions()[0]["id"]
    wait_for(lambda: app.store.get_session(sid)["status"] == "done", 120, "the run to finish")
    progress, _, _, _, headline, log, *_ = c.predict(api_name="/progress")
    done = len(app.store.metrics(sid))
    assert f"data-done='{done}' data-total='{done}'" in progress
    h = app.store.get_session(sid)["headline"]
    assert f"**Run done** after {done} steps" in headline
    assert f"**{h['flipped']} of {h['compared']}** answers changed" in headline
    assert "accuracy **" in headline and "guard: off" in headline
    assert "run started on 24 images" in log and "checkpoint saved at step" in log
    assert f"run ended **done** after {done} steps" in log and "adapt job" in log
    # The answers CSV: one row per image, as the store has them.
    status, button = c.predict(sid, api_name="/answers_csv")
    assert "answers of 24 images" in status
    with open(button["value"]["path"], newline="") as f:
        rows = list(csv.DictReader(f))
    stored = app.store.answers(sid)
    assert [(r["image"], r["before"], r["after"]) for r in rows] == [
        (a["name"], a["before"], a["after"]) for a in stored
    ]
    votes = dict(v.split(":") for v in rows[0]["votes"].split("; "))
    assert sum(map(int, votes.values())) == int(rows[0]["rollouts"]) == 4
    assert app.store.converged_images(sid)  # the model agrees on some digits at once
    assert "steps were planned" in html.unescape(progress)

    # Inspect, filtered by an answer (before or after) and by a label (issue 12).
    from ui.inspect_tab import norm

    answer, label = stored[0]["after"], stored[0]["label"]
    summary, *_, pick, _, answers, labels, consensus = c.predict(
        "all", None, answer, label, api_name="/inspect_refresh"
    )
    assert "consensus of each image" in str(consensus)  # the histogram across images
    want = [a["image_id"] for a in stored if norm(label) == norm(a["label"])
            and norm(answer) in (norm(a["before"]), norm(a["after"]))]  # fmt: skip
    assert [v for _, v in pick["choices"]] == want and want
    assert f"{len(want)} image(s) shown with answer {answer!r} and label {label!r}" in (
        html.unescape(summary)
    )
    assert ("any", "") in [tuple(x) for x in answers["choices"]]
    assert answer in [v for _, v in answers["choices"]] and answers["value"] == answer
    assert sorted(v for _, v in labels["choices"] if v) == sorted({a["label"] for a in stored})
    _, *_, pick, _, _, _, _ = c.predict("all", None, "", label, api_name="/inspect_refresh")
    assert len(pick["choices"]) == sum(norm(a["label"]) == norm(label) for a in stored)
    # by consensus at the last sampled step: the histogram's top tenths, as the store has it
    summary, *_, pick, _, _, _, _ = c.predict("all", None, "", "", "9-9",
                                              api_name="/inspect_refresh")  # fmt: skip
    agreed = app.store.inspect_page(sid, consensus=(9, 9))
    assert [v for _, v in pick["choices"]] == [r["image_id"] for r in agreed["rows"]]
    assert f"{agreed['total']} image(s) shown with consensus 90-100%" in html.unescape(summary)
    assert app.store.delete_session(sid) is None


def test_inspect_value_filters():
    """An answer matches before or after (trimmed, case folded); a label only a labelled
    image; empty means any."""
    from ui.inspect_tab import matches_values, value_choices

    row = {"before": "Seven", "after": "7", "label": " 7"}
    assert matches_values(row, "seven ", None) and matches_values(row, "7", "7")
    assert not matches_values(row, "1", "") and not matches_values(row, "", "1")
    assert not matches_values({"before": "7", "after": None, "label": None}, "", "7")
    rows = [row, {"before": "7", "after": "7", "label": None}]
    assert value_choices(rows, ("before", "after")) == [("any", ""), ("7 (2)", "7"),
                                                         ("Seven (1)", "Seven")]  # fmt: skip


def test_progress_shows_fast_steps_with_two_significant_figures():
    from ui.charts import Progress, progress_html

    def shown(step_s: float) -> str:
        return progress_html(Progress(3, 6, 1, 1, step_s, 3.0, "running"), "")

    assert "0.043 s/step" in shown(0.043)  # was "0.0 s/step"
    assert "1.5 s/step" in shown(1.54) and "12 s/step" in shown(12.3)


def test_consensus_chart_puts_first_and_last_steps_side_by_side():
    from ui.charts import answers_figure, consensus_figure

    assert consensus_figure({"first": [0] * 10, "last": [0] * 10}) is None  # no step yet
    fig = consensus_figure({"first": [2] + [0] * 9, "last": [0] * 9 + [2]})
    first, last = fig.data
    assert (first.name, list(first.y)[0], last.name, list(last.y)[-1]) == (
        "first sampled", 2, "last sampled", 2
    )
    assert list(first.x)[0] == "0-10%" and list(first.x)[-1] == "90-100%"
    # a series that is absent keeps the other's colour (after is always the blue one)
    (only_after,) = answers_figure([{"before": None, "after": "A"}]).data
    assert only_after.name == "after" and only_after.marker.color == last.marker.color
